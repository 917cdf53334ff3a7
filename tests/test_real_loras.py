"""The shared tier: real trained LoRA files and real checkpoint key lists (skipped when absent)."""

import pytest
import yaml
from conftest import REAL_LORAS, requires_real_loras

from lib_loramerge import sdlayouts
from lib_loramerge.cli import main
from lib_loramerge.errors import LoraMergeError
from lib_loramerge.formats.reader import read_lora

pytestmark = requires_real_loras

# file → (format, arch, modules, rank, dtype) for supported files, or the words of the refusal
EXPECTED = {
    "diffusers-attnprocs/sd14_pokemon_wellCh4n.safetensors": ("diffusers-attnprocs", "sd1", 128, 4, "fp32"),
    "diffusers-attnprocs/sd15_weapons_catundchat.safetensors": ("diffusers-attnprocs", "sd1", 128, 4, "fp32"),
    "diffusers-unet/sd15_guitar_timohavdk_2100.safetensors": ("diffusers", "sd1", 128, 4, "fp32"),
    "diffusers-unet/sd21base_naruto_vfph55_bf16.safetensors": ("diffusers", "sd2", 128, 4, "bf16"),
    "cloneofsimo/lora_disney.safetensors": "cloneofsimo lora_diffusion keys",
    "cloneofsimo/lora_disney_inpainting.safetensors": "cloneofsimo lora_diffusion keys",
    "cloneofsimo/analog_svd_rank4.safetensors": "cloneofsimo lora_diffusion keys",
    "cloneofsimo/lora_pop.pt": "bare pickled list of 256 tensors",
    "edge-cases/sd15_timohavdk_new_malformed_kohya_keys.safetensors": "malformed kohya keys",
    "lycoris-lokr/smart_falcon_4_lokr.safetensors": ("kohya", "sd1", 350, 4, "fp16"),
    "lycoris-lokr/smart_falcon_8_lokr.safetensors": ("kohya", "sd1", 350, 8, "fp16"),
}
# file → (algorithm, alphas, effective ranks) where not ("LoRA", ["none"], the declared rank)
LYCORIS = {
    "lycoris-lokr/smart_falcon_4_lokr.safetensors": ("LoKr", [4.0], {"16": 350}),  # kron of two rank-4 sides
    "lycoris-lokr/smart_falcon_8_lokr.safetensors": ("LoKr", [8.0], {"64": 350}),
}
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def manifest(name):
    data = yaml.safe_load((REAL_LORAS / "sd-mecha-manifests" / name).read_text())
    return {k: tuple(v["shape"]) for comp in data["components"].values() for k, v in comp.items()}


def test_every_real_file_is_expected():
    found = {str(p.relative_to(REAL_LORAS)) for p in REAL_LORAS.rglob("*") if p.suffix in LORA_SUFFIXES}
    assert found == set(EXPECTED)


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_info_on_real_files(rel, capsys):
    expected = EXPECTED[rel]
    path = REAL_LORAS / rel
    code = main(["info", str(path), "--json"])
    out, err = capsys.readouterr()
    if isinstance(expected, str):
        assert code == 2 and out == ""
        assert err.startswith(f"error: {path}: ") and expected in err and len(err.splitlines()) == 1
        with pytest.raises(LoraMergeError, match=expected):
            read_lora(path)
        return
    import json
    info = json.loads(out)
    fmt, arch, modules, rank, dtype = expected
    assert (info["format"], info["arch"], info["modules"], info["ranks"], info["dtype"]) == (fmt, arch, modules, [rank], dtype)
    algorithm, alphas, effective = LYCORIS.get(rel, ("LoRA", ["none"], {str(rank): modules}))
    assert (info["algorithm"], info["alphas"], info["effective_ranks"]["counts"]) == (algorithm, alphas, effective)
    assert info["algorithms"] == {algorithm: modules} and info["arch_notes"] == []


def kohya_names(manifest_keys, prefixes):
    return {lp + k[len(p):-len(".weight")].replace(".", "_"): s for k, s in manifest_keys.items()
            for p, lp in prefixes.items() if k.startswith(p) and k.endswith(".weight") and len(s) >= 2}


def test_names_from_diffusers_files_are_real_kohya_names():
    real = kohya_names(manifest("sd1-kohya.yaml"), {"unet.": "lora_unet_", "te.": "lora_te_"})
    for rel, expected in EXPECTED.items():
        if isinstance(expected, tuple) and expected[1] == "sd1":
            lora = read_lora(REAL_LORAS / rel)
            for name, module in lora.modules.items():
                assert name in real, name
                assert module.weight_shape == real[name], name


def test_layouts_match_real_kohya_manifests():
    skip = ("token_embedding", "position_embedding", "text_projection")
    for arch, file, prefixes, diffusers_names in (
        ("sd1", "sd1-kohya.yaml", {"unet.": "lora_unet_", "te.": "lora_te_"}, None),
        ("sdxl", "sdxl-kohya.yaml", {"unet.": "lora_unet_", "te1.": "lora_te1_", "te2.": "lora_te2_"}, None),
        ("sdxl", "sdxl-kohya_but_diffusers.yaml", {"unet.": "lora_unet_", "te1.": "lora_te1_", "te2.": "lora_te2_"}, True),
    ):
        real = {k: s for k, s in kohya_names(manifest(file), prefixes).items() if not any(w in k for w in skip)}
        assert sdlayouts.lora_modules(arch, "all", diffusers_names=diffusers_names) == real, file


def test_checkpoint_layouts_match_real_manifests():
    for arch, file in (("sd1", "sd1-ldm.yaml"), ("sdxl", "sdxl-sgm.yaml")):
        real = {k: s for k, s in manifest(file).items()
                if k.startswith(("model.diffusion_model.", "cond_stage_model.", "conditioner.", "first_stage_model."))}
        assert dict(sdlayouts.checkpoint_tensors(arch, vae=True)) == real, file


def test_every_kohya_module_of_the_real_layouts_finds_its_checkpoint_key():
    from lib_loramerge.bake.keymap import CheckpointLayout, fit_problem

    skip = ("token_embedding", "position_embedding", "text_projection")
    for ckpt_file, arch, kohya_files in (
        ("sd1-ldm.yaml", "sd1", [("sd1-kohya.yaml", {"unet.": "lora_unet_", "te.": "lora_te_"})]),
        ("sdxl-sgm.yaml", "sdxl", [(f, {"unet.": "lora_unet_", "te1.": "lora_te1_", "te2.": "lora_te2_"})
                                   for f in ("sdxl-kohya.yaml", "sdxl-kohya_but_diffusers.yaml")]),
    ):
        layout = CheckpointLayout(manifest(ckpt_file))
        assert layout.arch == arch
        for kohya_file, prefixes in kohya_files:
            modules = {k: s for k, s in kohya_names(manifest(kohya_file), prefixes).items()
                       if not any(w in k for w in skip)}
            targets = {}
            for name, shape in modules.items():
                target = layout.target(name)
                assert target is not None, (kohya_file, name)
                assert fit_problem(shape, target) is None, (kohya_file, name)
                targets.setdefault((target.key, target.rows), name)
            assert len(targets) == len(modules), kohya_file  # no two modules on the same weight


def test_real_diffusers_loras_find_their_layers_in_real_checkpoints():
    from lib_loramerge.bake.keymap import CheckpointLayout, fit_problem

    layout = CheckpointLayout(manifest("sd1-ldm.yaml"))
    for rel, expected in EXPECTED.items():
        if isinstance(expected, tuple) and expected[1] == "sd1":
            for name, module in read_lora(REAL_LORAS / rel).modules.items():
                target = layout.target(name)
                assert target is not None and fit_problem(module.weight_shape, target) is None, (rel, name)
