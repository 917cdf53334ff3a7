"""Flux LoRAs through the merge engine (add/concat/svd) and LBW's Flux block layout."""

import pytest
import torch
from flux_synth import DIVISOR, H, random_parts, write_peft
from synth import assert_same_delta, make_modules, write_kohya

from lib_loramerge import fluxlayout
from lib_loramerge.blocks.layouts import IDS_FLUX, check_length
from lib_loramerge.blocks.mapping import block_of
from lib_loramerge.blocks.presets import PresetBook, load_presets
from lib_loramerge.blocks.report import block_norms
from lib_loramerge.blocks.weights import parse_block_weights
from lib_loramerge.cli import main
from lib_loramerge.errors import LoraMergeError
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.formats.safetensors_io import read_header
from lib_loramerge.info import format_summary, summarize
from lib_loramerge.ops.merge import MergeInput, MergeOptions, merge_loras

F32 = torch.float32


def flux_file(tmp_path, name, seed, rank=4, text_encoder=True):
    mods = make_modules("flux", scope="all", rank=rank, alpha=rank / 2, seed=seed, text_encoder=text_encoder,
                        width_divisor=DIVISOR)
    return write_kohya(tmp_path / f"{name}.safetensors", mods,
                       metadata={"ss_base_model_version": "sd_1.5", "ss_v2": "False"})  # as trainers write them


# ---------------------------------------------------------------------------------------------
# block IDs: LBW's get_flux_blocks on Forge's keys, one family at a time


def test_the_flux_layout_is_lbws_61_ids():
    assert len(IDS_FLUX) == 61 and IDS_FLUX[:4] == ["CLIP", "T5", "IN", "D00"]
    assert IDS_FLUX[21] == "D18" and IDS_FLUX[22] == "S00" and IDS_FLUX[59] == "S37" and IDS_FLUX[60] == "OUT"


def test_text_encoder_modules_are_clip_and_t5():
    assert block_of("lora_te1_text_model_encoder_layers_11_mlp_fc2", "flux") == "CLIP"
    assert block_of("lora_te3_encoder_block_23_layer_1_DenseReluDense_wo", "flux") == "T5"


@pytest.mark.parametrize("layer", ["img_attn_qkv", "txt_attn_proj", "img_mlp_2", "txt_mod_lin"])
def test_double_block_modules_are_dnn(layer):
    assert block_of(f"lora_unet_double_blocks_0_{layer}", "flux") == "D00"
    assert block_of(f"lora_unet_double_blocks_18_{layer}", "flux") == "D18"


@pytest.mark.parametrize("layer", ["linear1", "linear2", "modulation_lin"])
def test_single_block_modules_are_snn(layer):
    assert block_of(f"lora_unet_single_blocks_7_{layer}", "flux") == "S07"
    assert block_of(f"lora_unet_single_blocks_37_{layer}", "flux") == "S37"


@pytest.mark.parametrize("layer", ["img_in", "txt_in", "time_in_in_layer", "time_in_out_layer", "vector_in_in_layer",
                                   "vector_in_out_layer", "guidance_in_in_layer", "guidance_in_out_layer"])
def test_embedders_are_in(layer):
    assert block_of(f"lora_unet_{layer}", "flux") == "IN"


@pytest.mark.parametrize("layer", ["final_layer_linear", "final_layer_adaLN_modulation_1"])
def test_final_layer_is_out(layer):
    assert block_of(f"lora_unet_{layer}", "flux") == "OUT"


def test_every_flux_module_has_a_block():
    for name in fluxlayout.module_shapes():
        assert block_of(name, "flux") in IDS_FLUX, name


def test_lengths_and_presets_for_flux():
    check_length(61, "flux")
    with pytest.raises(LoraMergeError, match="26 block weights for a Flux LoRA: expected 61"):
        check_length(26, "flux")
    with pytest.raises(LoraMergeError, match="Flux layout, but this is an SD1 LoRA"):
        check_length(61, "sd1")
    weights = parse_block_weights("FLUXALL", "flux", load_presets())
    assert set(weights.ratios) == set(IDS_FLUX) and set(weights.ratios.values()) == {1.0}
    values = ["0"] * 61
    values[IDS_FLUX.index("D03")] = "0.5"
    values[IDS_FLUX.index("T5")] = "X"
    weights = parse_block_weights(",".join(values), "flux", PresetBook(), x=0.25)
    assert weights.ratio("lora_unet_double_blocks_3_img_attn_qkv") == 0.5
    assert weights.ratio("lora_te3_encoder_block_0_layer_0_SelfAttention_q") == 0.25
    assert weights.ratio("lora_unet_single_blocks_3_linear1") == 0.0
    with pytest.raises(LoraMergeError, match="17 block weights for a Flux LoRA: expected 61"):
        parse_block_weights("OUTALL", "flux", load_presets())  # an SD preset
    with pytest.raises(LoraMergeError, match="presets for FLUX: FLUXALL;"):
        parse_block_weights("NOPE", "flux", load_presets())


# ---------------------------------------------------------------------------------------------
# merges


def dense_target(inputs, name):
    total = None
    for inp in inputs:
        module = inp.lora.modules.get(name)
        if module is None:
            continue
        d = inp.strength(name) * module.delta(torch.float64)
        total = d if total is None else total + d
    return total


def test_merge_add_and_concat_of_flux_loras_are_exact(tmp_path):
    a, b = (read_lora(flux_file(tmp_path, n, seed)) for n, seed in (("a", 1), ("b", 2)))
    inputs = [MergeInput(a, unet=0.7, te=0.2), MergeInput(b, unet=-0.4)]
    concat = merge_loras(inputs, MergeOptions(mode="concat", dtype=F32))
    merged = {m.name: m for m in concat.modules}
    assert concat.arch == "flux" and set(merged) == set(a.modules)
    for name in ("lora_unet_double_blocks_4_img_attn_qkv", "lora_unet_single_blocks_30_linear1",
                 "lora_te3_encoder_block_2_layer_1_DenseReluDense_wi_1", "lora_unet_img_in"):
        assert_same_delta(merged[name].delta(torch.float64), dense_target(inputs, name), rel=1e-6,
                          label=name)


def test_merge_add_runs_on_flux_with_the_seeds_factor_sum(tmp_path):
    a, b = (read_lora(flux_file(tmp_path, n, seed, text_encoder=False)) for n, seed in (("a", 15), ("b", 16)))
    result = {m.name: m for m in merge_loras([MergeInput(a, unet=0.6), MergeInput(b, unet=0.3)],
                                             MergeOptions(mode="add", dtype=F32)).modules}
    assert set(result) == set(a.modules)
    name = "lora_unet_single_blocks_20_linear1"
    ma, mb = a.modules[name], b.modules[name]  # equal alphas: U = Σ sᵢUᵢ, D = Σ |sᵢ|Dᵢ
    up = 0.6 * ma.up.double() + 0.3 * mb.up.double()
    down = 0.6 * ma.down.double() + 0.3 * mb.down.double()
    assert_same_delta(result[name].delta(torch.float64), ma.scale * (up @ down), rel=1e-6)


def test_merge_svd_is_the_optimal_truncation(tmp_path):
    a, b = (read_lora(flux_file(tmp_path, n, seed, text_encoder=False)) for n, seed in (("a", 3), ("b", 4)))
    inputs = [MergeInput(a, unet=1.0), MergeInput(b, unet=0.5)]
    k = 3
    result = {m.name: m for m in merge_loras(inputs, MergeOptions(mode="svd", rank=k, dtype=F32)).modules}
    for name in ("lora_unet_double_blocks_0_txt_mlp_0", "lora_unet_single_blocks_11_linear2",
                 "lora_unet_final_layer_adaLN_modulation_1"):
        target = dense_target(inputs, name)
        s = torch.linalg.svdvals(target)
        best = float(s[k:].square().sum().sqrt())  # Eckart–Young: the least error of any rank-k matrix
        got = float((result[name].delta(torch.float64) - target).norm())
        assert result[name].rank == k and got == pytest.approx(best, rel=1e-4, abs=1e-9), name


def test_a_diffusers_and_a_kohya_flux_lora_merge_on_the_same_layers(tmp_path):
    parts = random_parts(seed=11)
    diffusers = read_lora(write_peft(tmp_path / "d.safetensors", {p: (u, d, None) for p, (u, d, _) in parts.items()}))
    kohya = read_lora(flux_file(tmp_path, "k", 12, text_encoder=False))
    inputs = [MergeInput(diffusers), MergeInput(kohya)]
    result = {m.name: m for m in merge_loras(inputs, MergeOptions(mode="concat", dtype=F32)).modules}
    assert set(result) == set(kohya.modules)
    name = "lora_unet_single_blocks_2_linear1"
    assert_same_delta(result[name].delta(torch.float64), dense_target(inputs, name), rel=1e-6)


def test_cli_merge_of_flux_loras_writes_kohya_flux_metadata(tmp_path, capsys):
    a, b = flux_file(tmp_path, "a", 5), flux_file(tmp_path, "b", 6)
    out = tmp_path / "m.safetensors"
    values = ",".join("0" if i == IDS_FLUX.index("S05") else "1" for i in range(61))
    code = main(["merge", "--models", str(a), str(b), "--lbws", values, "FLUXALL", "--mode", "concat",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    meta = read_header(out).metadata
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_network_module"] == "networks.lora_flux" and "ss_v2" not in meta
    merged = read_lora(out)
    assert merged.arch == "flux" and merged.arch_notes[1:] == []  # only the reduced-width note
    # S05 at 0 in the first input: only the second input's update is left there
    src_b = read_lora(b).modules["lora_unet_single_blocks_5_linear2"].delta(torch.float64)
    assert_same_delta(merged.modules["lora_unet_single_blocks_5_linear2"].delta(torch.float64), src_b, rel=1e-3)


def test_cli_prompt_tags_with_a_flux_lbw(tmp_path, capsys):
    flux_file(tmp_path, "style", 7)
    out = tmp_path / "p.safetensors"
    values = ",".join("1" if b.startswith("D") else "0" for b in IDS_FLUX)
    code = main(["merge", "--prompt", f"<lora:style:0.5:lbw={values}>", "--lora-dir", str(tmp_path),
                 "--mode", "concat", "--dtype", "fp32", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    merged = read_lora(out)
    assert all(n.startswith("lora_unet_double_blocks_") for n in merged.modules)  # the rest had ratio 0
    src = read_lora(tmp_path / "style.safetensors").modules["lora_unet_double_blocks_1_img_mlp_0"]
    assert_same_delta(merged.modules["lora_unet_double_blocks_1_img_mlp_0"].delta(torch.float64),
                      0.5 * src.delta(torch.float64), rel=1e-6)


def test_info_describes_a_flux_lora_by_block(tmp_path):
    lora = read_lora(flux_file(tmp_path, "i", 8))
    report = block_norms(lora)
    assert report.layout == IDS_FLUX and report.no_block == []
    assert report.modules["D00"] == 10 and report.modules["S00"] == 3 and report.modules["IN"] == 8
    assert report.modules["OUT"] == 2 and report.modules["CLIP"] == 72 and report.modules["T5"] == 24 * 7
    qkv = lora.modules["lora_unet_double_blocks_0_img_attn_qkv"]
    d00 = sum(float(lora.modules[n].delta(torch.float64).square().sum()) for n in lora.modules
              if n.startswith("lora_unet_double_blocks_0_"))
    assert report.norms["D00"] == pytest.approx(d00 ** 0.5, rel=1e-5) and qkv.weight_shape == (3 * H, H)
    text = format_summary(summarize(lora))
    assert "arch:        Flux" in text and "61 LBW blocks touched" in text and "transformer" in text


# ---------------------------------------------------------------------------------------------
# the tab's handlers


def test_the_tab_lists_inspects_and_merges_flux_loras(tmp_path):
    from lib_loramerge.ui import handlers
    from lib_loramerge.ui.handlers import LoraRow, MergeRequest
    from lib_loramerge.ui.host import StandaloneHost

    folder = tmp_path / "Lora"
    folder.mkdir()
    flux_file(folder, "flux_style", 13)
    flux_file(folder, "flux_face", 14)

    class A1111Host(StandaloneHost):
        def runs_flux(self):
            return False

    host = A1111Host([folder])
    assert set(host.loras()) == {"flux_style.safetensors", "flux_face.safetensors"}
    shown = handlers.inspect(host, "flux_style.safetensors")
    assert shown.ok and shown.message.startswith("flux_style.safetensors: Flux, 554 modules")
    assert [b for b, _ in shown.chart] == IDS_FLUX
    assert dict(shown.table)["modules"].startswith("554 (314 transformer, 240 text encoder)")
    rows = [LoraRow("flux_style.safetensors", unet=1.0, te=1.0, weights="FLUXALL"),
            LoraRow("flux_face.safetensors", unet=0.5, te=0.5), LoraRow(None), LoraRow(None)]
    done = handlers.merge(host, MergeRequest(rows, "both", mode="svd", rank="4", dtype="fp16"))
    assert done.ok, done.message
    assert "Flux" in done.message and "cannot generate with Flux; use it in Forge" in done.message
    assert [b for b, _ in done.chart][:3] == ["CLIP", "T5", "IN"]
    assert read_lora(done.path).arch == "flux"
