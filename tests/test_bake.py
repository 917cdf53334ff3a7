"""Baking into SD1/SD2/SDXL checkpoints with the real key layouts (narrow widths)."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from synth import assert_same_delta, make_modules, write_kohya

from lib_loramerge import sdlayouts
from lib_loramerge.blocks.presets import PresetBook
from lib_loramerge.blocks.weights import parse_block_weights
from lib_loramerge.cli import main
from lib_loramerge.errors import LoraMergeError
from lib_loramerge.jobs import RECIPE_KEY, bake_to_file
from lib_loramerge.model import LoraModel, LoraModule
from lib_loramerge.ops.merge import MergeInput, MergeOptions, merge_loras
from lib_loramerge.synthetic import write_random_checkpoint

NARROW = {"sd1": 8, "sd2": 8, "sdxl": 16}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    return {arch: write_random_checkpoint(folder / f"{arch}.safetensors", arch, width_divisor=d, dtype=torch.float32,
                                          seed=3, metadata={"modelspec.title": f"base {arch}"})
            for arch, d in NARROW.items()}


def lora(modules, arch, name="x"):
    from pathlib import Path
    return LoraModel(modules={m.name: m for m in modules}, arch=arch, path=Path(f"{name}.safetensors"))


def expected_slice(arch, name, tensors):
    """(key, rows) of a module's layer, worked out from the layout tables (not the key map)."""
    te_prefixes = {te.lora_prefix: te for te in sdlayouts.TEXT_ENCODERS[arch]}
    for prefix, te in te_prefixes.items():
        if name.startswith(prefix):
            rest = name[len(prefix):]
            layer, part = rest.split("_layers_")[1].split("_", 1)
            if te.kind == "clip":
                path = f"text_model.encoder.layers.{layer}." + {"self_attn_q_proj": "self_attn.q_proj",
                                                                  "self_attn_k_proj": "self_attn.k_proj",
                                                                  "self_attn_v_proj": "self_attn.v_proj",
                                                                  "self_attn_out_proj": "self_attn.out_proj",
                                                                  "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}[part]
                return te.ckpt_prefix + path + ".weight", None
            base = f"{te.ckpt_prefix}transformer.resblocks.{layer}."
            if part in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj"):
                key = base + "attn.in_proj_weight"
                w = tensors[key].shape[1]
                i = "qkv".index(part[10])
                return key, (i * w, (i + 1) * w)
            return base + {"self_attn_out_proj": "attn.out_proj.weight", "mlp_fc1": "mlp.c_fc.weight",
                           "mlp_fc2": "mlp.c_proj.weight"}[part] + "", None
    return None


def ldm_key_of(arch, name, divisor):
    """The checkpoint key of a UNet module, by regenerating the layout's kohya names."""
    for key, shape in sdlayouts.unet_tensors(arch, divisor):
        if key.endswith(".weight") and len(shape) >= 2:
            path = key[: -len(".weight")]
            if sdlayouts.kohya_unet_name(arch, path) == name or sdlayouts.kohya_unet_name(arch, path, True) == name:
                return sdlayouts.UNET_CKPT_PREFIX + key
    return None


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_every_module_kind_lands_on_its_key_or_slice(tmp_path, checkpoints, arch):
    d = NARROW[arch]
    only = "transformer_blocks_0_|proj_in|resnets_0|in_layers|skip_conn|upsamplers|_op$|conv_in|conv_out|time_emb|layers_(0|1)_"
    mods = make_modules(arch, scope="all", rank=3, alpha=1.5, only=only, width_divisor=d, seed=5)
    src = lora(mods, arch)
    out = tmp_path / "baked.safetensors"
    job = bake_to_file(checkpoints[arch], [MergeInput(src, unet=0.7, te=-1.2)], out, dtype=torch.float32)
    assert job.report.unmatched == [] and job.report.modules_baked == len(mods)
    before, after = load_file(checkpoints[arch]), load_file(out)
    assert after.keys() == before.keys()
    touched = set()
    for m in mods:
        strength = -1.2 if m.is_text_encoder else 0.7
        te = expected_slice(arch, m.name, before)
        key, rows = te if te else (ldm_key_of(arch, m.name, d), None)
        assert key is not None, m.name
        diff = after[key] - before[key]
        if rows:
            diff = diff[rows[0]:rows[1]]
        assert_same_delta(diff.reshape(m.weight_shape), strength * m.delta(), rel=2e-5, label=m.name)
        touched.add(key)
    for key in before.keys() - touched:
        assert torch.equal(after[key], before[key]), key
    kinds = {m.kind for m in mods}
    assert kinds == ({"linear", "conv1x1", "conv"})
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == f"base {arch}"
    recipe = json.loads(meta[RECIPE_KEY])
    assert recipe["checkpoint"]["sha256"] == hashlib.sha256(checkpoints[arch].read_bytes()).hexdigest()
    assert recipe["inputs"][0]["unet"] == 0.7 and recipe["inputs"][0]["te"] == -1.2


def test_bake_then_minus_gives_back_the_original(tmp_path, checkpoints):
    mods = make_modules("sd1", scope="locon", rank=4, width_divisor=8, only="down_blocks_1|layers_3_")
    once = bake_to_file(checkpoints["sd1"], [MergeInput(lora(mods, "sd1"), unet=0.8, te=0.5)],
                        tmp_path / "once.safetensors", dtype=torch.float32).path
    back = bake_to_file(once, [MergeInput(lora(mods, "sd1"), unet=-0.8, te=-0.5)],
                        tmp_path / "back.safetensors", dtype=torch.float32).path
    original, restored = load_file(checkpoints["sd1"]), load_file(back)
    for key, value in original.items():
        if value.is_floating_point():
            torch.testing.assert_close(restored[key], value, atol=1e-6, rtol=1e-5)
        else:
            assert torch.equal(restored[key], value)


def test_block_weights_behave_as_in_merge(tmp_path, checkpoints):
    mods = make_modules("sd1", scope="attention", rank=2, width_divisor=8, only="attn1_to_q|layers_0_self_attn_q")
    weights = parse_block_weights("0.5,1,0,1,0.25,1,1,2,1,1,0,1,1,1,-1,1,1", "sd1", PresetBook())
    inp = MergeInput(lora(mods, "sd1"), unet=0.9, te=0.4, block_ratio=weights.ratio)
    baked = bake_to_file(checkpoints["sd1"], [inp], tmp_path / "b.safetensors", dtype=torch.float32)
    merged = {m.name: m for m in merge_loras([inp], MergeOptions(mode="concat", dtype=torch.float32)).modules}
    before, after = load_file(checkpoints["sd1"]), load_file(baked.path)
    for m in mods:
        te = expected_slice("sd1", m.name, before)
        key = te[0] if te else ldm_key_of("sd1", m.name, 8)
        diff = (after[key] - before[key]).reshape(m.weight_shape)
        if m.name in merged:
            assert_same_delta(diff, merged[m.name].delta(), rel=2e-5, label=m.name)
        else:
            assert torch.count_nonzero(diff) == 0, m.name  # ratio 0: not baked, as not merged
    assert baked.report.skipped_zero == len(mods) - len(merged) > 0


def test_fp16_output_keeps_integer_buffers_and_keep_keeps_dtypes(tmp_path, checkpoints):
    mods = make_modules("sd1", scope="attention", rank=2, width_divisor=8, only="attn2_to_k")
    half = bake_to_file(checkpoints["sd1"], [MergeInput(lora(mods, "sd1"))], tmp_path / "h.safetensors").path
    tensors = load_file(half)
    ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert tensors[ids].dtype == torch.int64 and torch.equal(tensors[ids], torch.arange(77).reshape(1, 77))
    assert {t.dtype for k, t in tensors.items() if k != ids} == {torch.float16}
    kept = bake_to_file(half, [MergeInput(lora(mods, "sd1"))], tmp_path / "k.safetensors", dtype=None).path
    assert {t.dtype for t in load_file(kept).values()} == {torch.float16, torch.int64}


def test_architecture_mismatch_fails_before_any_work(tmp_path, checkpoints):
    xl = lora(make_modules("sdxl", scope="attention", only="attn2_to_k"), "sdxl")
    out = tmp_path / "x.safetensors"
    with pytest.raises(LoraMergeError, match="the LoRAs are SDXL but the checkpoint is SD1"):
        bake_to_file(checkpoints["sd1"], [MergeInput(xl)], out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unmatched_modules_fail_unless_allowed(tmp_path, checkpoints):
    mods = make_modules("sd1", scope="attention", rank=2, width_divisor=8, only="attn1_to_q")
    bogus = LoraModule("lora_unet_not_a_layer", torch.ones(4, 1), torch.ones(1, 4), 1.0)
    wide = make_modules("sd1", scope="attention", rank=1, only="down_blocks_0_attentions_0_proj_in")[0]  # real width
    src = lora([*mods, bogus, wide], "sd1")
    out = tmp_path / "u.safetensors"
    with pytest.raises(LoraMergeError, match=r"2 LoRA modules have no matching layer.*--allow-unmatched"):
        bake_to_file(checkpoints["sd1"], [MergeInput(src)], out)
    assert not out.exists()
    job = bake_to_file(checkpoints["sd1"], [MergeInput(src)], out, allow_unmatched=True)
    whys = {m: w for _, m, w in job.report.unmatched}
    assert whys["lora_unet_not_a_layer"] == "no such layer in the checkpoint"
    assert "does not fit the checkpoint's [40, 40, 1, 1]" in whys[wide.name]
    assert job.report.modules_baked == len(mods)


def test_inpainting_conv_in_is_zero_padded(tmp_path):
    ckpt = tmp_path / "inpaint.safetensors"
    tensors = {k: torch.zeros(s) for k, s in sdlayouts.checkpoint_tensors("sd1", 8) if not k.endswith("position_ids")}
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(40, 9, 3, 3)
    save_file(tensors, str(ckpt))
    conv_in = make_modules("sd1", scope="all", rank=2, width_divisor=8, only="conv_in")[0]
    out = bake_to_file(ckpt, [MergeInput(lora([conv_in], "sd1"))], tmp_path / "o.safetensors", dtype=torch.float32)
    w = load_file(out.path)["model.diffusion_model.input_blocks.0.0.weight"]
    assert_same_delta(w[:, :4], conv_in.delta())
    assert torch.count_nonzero(w[:, 4:]) == 0


def test_old_sd1_text_encoder_keys_and_pickle_checkpoints(tmp_path, checkpoints):
    tensors = load_file(checkpoints["sd1"])
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in tensors.items()}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": old}, path)
    te = make_modules("sd1", scope="attention", rank=2, width_divisor=8, only="layers_0_mlp_fc1")
    job = bake_to_file(path, [MergeInput(lora(te, "sd1"))], tmp_path / "o.safetensors", dtype=torch.float32)
    key = "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight"
    assert_same_delta(load_file(job.path)[key] - old[key], te[0].delta())


def test_sdxl_lora_files_in_either_naming(tmp_path, checkpoints):
    mods = make_modules("sdxl", scope="locon", rank=2, width_divisor=16, diffusers_names=True,
                        only="up_blocks_0_upsamplers|up_blocks_1_attentions_0_proj_in")
    assert {m.name for m in mods} == {"lora_unet_up_blocks_0_upsamplers_0_conv",
                                      "lora_unet_up_blocks_1_attentions_0_proj_in"}
    job = bake_to_file(checkpoints["sdxl"], [MergeInput(lora(mods, "sdxl"))], tmp_path / "o.safetensors",
                       dtype=torch.float32)
    before, after = load_file(checkpoints["sdxl"]), load_file(job.path)
    up = "model.diffusion_model.output_blocks.2.2.conv.weight"  # SDXL's first up block has attention
    assert_same_delta(after[up] - before[up], mods[0].delta() if "upsamplers" in mods[0].name else mods[1].delta())


def test_cli_bake_end_to_end_and_errors(tmp_path, checkpoints, capsys):
    a = write_kohya(tmp_path / "a.safetensors", make_modules("sd1", scope="attention", rank=2, width_divisor=8,
                                                             only="attn1_to_v"))
    out = tmp_path / "baked.safetensors"
    code = main(["bake", "--checkpoint", str(checkpoints["sd1"]), "--models", str(a), "--ratios", "0.6",
                 "--lbws", "OUTALL", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert f"wrote {out}" in stdout and "modules baked:" in stdout and "IN01" not in stdout.split("per block:")[1]
    code = main(["bake", "--checkpoint", str(checkpoints["sd1"]), "--models", str(a), "--out", str(out)])
    assert code == 2 and "exists" in capsys.readouterr().err
    lora_file = tmp_path / "lora_as_ckpt.safetensors"
    code = main(["bake", "--checkpoint", str(a), "--models", str(a), "--out", str(tmp_path / "n.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "not an LDM-format Stable Diffusion checkpoint" in err and str(a) in err
    assert not lora_file.exists() and not (tmp_path / "n.safetensors").exists()
