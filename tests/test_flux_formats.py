"""Flux LoRAs in every common naming read to one module set in kohya BFL names; split layers fused exactly."""

import pytest
import torch
from flux_synth import (
    DIVISOR,
    H,
    bfl_path,
    diffusers_layers,
    expected_deltas,
    part_delta,
    random_parts,
    write_bfl_lora_ab,
    write_diffusers,
    write_kohya_diffusers_names,
    write_peft,
)
from safetensors.torch import save_file
from synth import assert_same_delta, make_modules, write_kohya, write_tensors

from lib_loramerge import fluxlayout
from lib_loramerge.arch import detect_arch
from lib_loramerge.errors import LoraMergeError
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.model import LoraModule

ALL_BFL = {name for _, name, _, _ in diffusers_layers().values()}


def test_the_tests_table_covers_every_flux_linear_layer():
    # 10 top-level layers, 10 per double block, 3 per single block
    assert len(ALL_BFL) == 10 + 19 * 10 + 38 * 3 == 314
    assert set(fluxlayout.lora_modules(width_divisor=DIVISOR)) == ALL_BFL


@pytest.mark.parametrize("writer", [write_peft, write_diffusers, write_kohya_diffusers_names],
                         ids=["peft", "diffusers", "kohya-diffusers-paths"])
@pytest.mark.parametrize("lazy", [False, True])
def test_diffusers_namings_read_to_the_bfl_modules_with_fused_qkv_exact(tmp_path, writer, lazy):
    parts = random_parts(seed=1)
    if writer is write_peft:  # PEFT files carry no alpha: scale 1
        parts = {p: (u, d, None) for p, (u, d, _) in parts.items()}
    lora = read_lora(writer(tmp_path / "d.safetensors", parts), lazy=lazy)
    assert lora.arch == "flux" and set(lora.modules) == ALL_BFL
    want = expected_deltas(parts)
    for name, module in lora.modules.items():
        assert module.weight_shape == tuple(want[name].shape), name
        assert_same_delta(module.delta(torch.float64), want[name], rel=1e-6, label=name)
    qkv = lora.modules["lora_unet_double_blocks_0_img_attn_qkv"]
    ranks = [parts[f"transformer_blocks.0.attn.{p}"][1].shape[0] for p in ("to_q", "to_k", "to_v")]
    assert isinstance(qkv, LoraModule) and qkv.rank == sum(ranks)  # factor form, rank r_q + r_k + r_v
    linear1 = lora.modules["lora_unet_single_blocks_5_linear1"]
    assert linear1.weight_shape == (7 * H, H)


def test_a_missing_part_is_a_zero_block_and_scales_fold_exactly(tmp_path):
    only = {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v",
            "single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.2.attn.to_k",
            "transformer_blocks.3.attn.add_k_proj"}
    parts = random_parts(seed=2, only=only)
    lora = read_lora(write_kohya_diffusers_names(tmp_path / "p.safetensors", parts))
    assert set(lora.modules) == {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1",
                                 "lora_unet_single_blocks_2_linear1", "lora_unet_double_blocks_3_txt_attn_qkv"}
    qkv = lora.modules["lora_unet_double_blocks_0_img_attn_qkv"].delta(torch.float64)
    q = part_delta(*parts["transformer_blocks.0.attn.to_q"])
    v = part_delta(*parts["transformer_blocks.0.attn.to_v"])
    assert torch.allclose(qkv[:H], q, atol=1e-12) and torch.allclose(qkv[2 * H:], v, atol=1e-12)
    assert torch.count_nonzero(qkv[H:2 * H]) == 0  # no k part: its rows are untouched
    mlp_only = lora.modules["lora_unet_single_blocks_1_linear1"].delta(torch.float64)
    assert torch.count_nonzero(mlp_only[:3 * H]) == 0
    assert torch.allclose(mlp_only[3 * H:], part_delta(*parts["single_transformer_blocks.1.proj_mlp"]), atol=1e-12)


def test_equal_scales_keep_the_factors_and_their_dtype(tmp_path):
    # (a single block tells Flux from SD3 at this reduced width; at 3072 the double block alone does)
    parts = random_parts(seed=3, vary=False, rank=4, only={"single_transformer_blocks.0.proj_out", *(
        f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v"))})
    parts = {p: (u.bfloat16(), d.bfloat16(), a) for p, (u, d, a) in parts.items()}
    module = read_lora(write_diffusers(tmp_path / "e.safetensors", parts)).modules[
        "lora_unet_double_blocks_0_img_attn_qkv"]
    assert module.dtype == torch.bfloat16 and module.rank == 12 and module.scale == pytest.approx(1.0)
    q_up = parts["transformer_blocks.0.attn.to_q"][0]
    assert torch.equal(module.up[:H, :4], q_up) and torch.count_nonzero(module.up[:H, 4:]) == 0


def bfl_modules(seed=4):
    return make_modules("flux", scope="all", rank=2, alpha=1.0, seed=seed, text_encoder=False,
                        width_divisor=DIVISOR)


@pytest.mark.parametrize("form", ["kohya", "diffusion_model", "transformer", "bare"])
def test_bfl_namings_read_to_the_same_modules(tmp_path, form):
    modules = bfl_modules()
    if form == "kohya":
        path = write_kohya(tmp_path / "k.safetensors", modules)
    else:
        prefix = {"diffusion_model": "diffusion_model.", "transformer": "transformer.", "bare": ""}[form]
        path = write_bfl_lora_ab(tmp_path / "b.safetensors", modules, prefix)
    lora = read_lora(path)
    assert lora.arch == "flux" and set(lora.modules) == ALL_BFL
    for m in modules:
        assert torch.equal(lora.modules[m.name].up, m.up) and torch.equal(lora.modules[m.name].down, m.down)
        assert lora.modules[m.name].alpha == 1.0


def test_bfl_path_helper_matches_the_real_keys():
    keys = {k[: -len(".weight")] for k, _ in fluxlayout.transformer_tensors() if k.endswith(".weight")}
    assert bfl_path("lora_unet_double_blocks_3_img_attn_qkv") == "double_blocks.3.img_attn.qkv" in keys
    assert bfl_path("lora_unet_final_layer_adaLN_modulation_1") == "final_layer.adaLN_modulation.1" in keys
    assert bfl_path("lora_unet_time_in_in_layer") == "time_in.in_layer" in keys


def test_xlabs_reads_onto_double_qkv_proj_and_single_linear1_rows(tmp_path):
    gen = torch.Generator().manual_seed(5)
    sd, want = {}, {}
    for n in (0, 7):
        for stream, layer in (("1", "img"), ("2", "txt")):
            up, down = torch.randn(3 * H, 2, generator=gen), torch.randn(2, H, generator=gen)
            sd[f"double_blocks.{n}.processor.qkv_lora{stream}.down.weight"] = down
            sd[f"double_blocks.{n}.processor.qkv_lora{stream}.up.weight"] = up
            want[f"lora_unet_double_blocks_{n}_{layer}_attn_qkv"] = up.double() @ down.double()
            up, down = torch.randn(H, 2, generator=gen), torch.randn(2, H, generator=gen)
            sd[f"double_blocks.{n}.processor.proj_lora{stream}.down.weight"] = down
            sd[f"double_blocks.{n}.processor.proj_lora{stream}.up.weight"] = up
            want[f"lora_unet_double_blocks_{n}_{layer}_attn_proj"] = up.double() @ down.double()
    up, down = torch.randn(3 * H, 2, generator=gen), torch.randn(2, H, generator=gen)
    sd["single_blocks.4.processor.qkv_lora.down.weight"] = down
    sd["single_blocks.4.processor.qkv_lora.up.weight"] = up
    want["lora_unet_single_blocks_4_linear1"] = torch.cat([up.double() @ down.double(),
                                                           torch.zeros(4 * H, H, dtype=torch.float64)])
    up, down = torch.randn(H, 2, generator=gen), torch.randn(2, 5 * H, generator=gen)
    sd["single_blocks.4.processor.proj_lora.down.weight"] = down
    sd["single_blocks.4.processor.proj_lora.up.weight"] = up
    want["lora_unet_single_blocks_4_linear2"] = up.double() @ down.double()
    path = tmp_path / "x.safetensors"
    save_file(sd, str(path))
    lora = read_lora(path)
    assert lora.arch == "flux" and lora.format == "xlabs" and set(lora.modules) == set(want)
    for name, delta in want.items():
        assert_same_delta(lora.modules[name].delta(torch.float64), delta, rel=1e-6, label=name)


def test_lokr_and_loha_on_kohya_flux_names(tmp_path):
    gen = torch.Generator().manual_seed(6)
    w1, w2 = torch.randn(4, 4, generator=gen), torch.randn(3 * H // 4, H // 4, generator=gen)
    a1, b1 = torch.randn(H, 2, generator=gen), torch.randn(2, 5 * H, generator=gen)
    a2, b2 = torch.randn(H, 2, generator=gen), torch.randn(2, 5 * H, generator=gen)
    path = write_tensors(tmp_path / "ly.safetensors", {
        "lora_unet_double_blocks_2_img_attn_qkv": {"lokr_w1": w1, "lokr_w2": w2},
        "lora_unet_single_blocks_9_linear2": {"hada_w1_a": a1, "hada_w1_b": b1, "hada_w2_a": a2, "hada_w2_b": b2,
                                              "alpha": torch.tensor(2.0)},
    })
    lora = read_lora(path)
    assert lora.arch == "flux"
    kron = torch.kron(w1.double(), w2.double())
    assert_same_delta(lora.modules["lora_unet_double_blocks_2_img_attn_qkv"].delta(torch.float64), kron)
    hada = (a1.double() @ b1.double()) * (a2.double() @ b2.double())  # alpha / rank = 2 / 2
    assert_same_delta(lora.modules["lora_unet_single_blocks_9_linear2"].delta(torch.float64), hada)


def test_norm_out_halves_are_swapped_onto_ada_ln_modulation(tmp_path):
    parts = random_parts(seed=7, only={"norm_out.linear", "single_transformer_blocks.0.proj_out"})
    lora = read_lora(write_peft(tmp_path / "n.safetensors", {p: (u, d, None) for p, (u, d, _) in parts.items()}))
    delta = lora.modules["lora_unet_final_layer_adaLN_modulation_1"].delta(torch.float64)
    up, down, _ = parts["norm_out.linear"]
    dense = up.double() @ down.double()  # diffusers rows: scale, then shift
    assert torch.allclose(delta[:H], dense[H:]) and torch.allclose(delta[H:], dense[:H])


def test_text_encoders_of_a_diffusers_flux_file_become_te1_and_te3(tmp_path):
    parts = random_parts(seed=8, only={"transformer_blocks.0.attn.to_q"})
    sd = {f"transformer.{p}.lora_A.weight": d for p, (u, d, _) in parts.items()}
    sd.update({f"transformer.{p}.lora_B.weight": u for p, (u, d, _) in parts.items()})
    gen = torch.Generator().manual_seed(9)
    sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.randn(2, 768, generator=gen)
    sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.randn(768, 2, generator=gen)
    sd["text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight"] = torch.randn(2, 4096, generator=gen)
    sd["text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight"] = torch.randn(4096, 2, generator=gen)
    path = tmp_path / "te.safetensors"
    save_file(sd, str(path))
    lora = read_lora(path)
    assert lora.arch == "flux"
    assert set(lora.modules) == {"lora_unet_double_blocks_0_img_attn_qkv",
                                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                 "lora_te3_encoder_block_0_layer_0_SelfAttention_q"}
    assert all(lora.modules[n].is_text_encoder for n in lora.modules if n.startswith("lora_te"))


def test_arch_from_shapes_overrules_lying_metadata(tmp_path):
    full = fluxlayout.lora_modules(text_encoders=("clip", "t5"))  # real widths, shapes only
    info = detect_arch(full, {"ss_base_model_version": "sd_1.5"})
    assert info.arch == "flux" and len(info.notes) == 1 and "sd_1.5" in info.notes[0] and "Flux" in info.notes[0]
    assert detect_arch(full, {"ss_base_model_version": "sdxl_base_v1-0"}).notes[0].startswith("metadata says SDXL")
    assert detect_arch(full, {"modelspec.architecture": "flux-1-dev/lora"}).notes == []
    lora = read_lora(write_kohya(tmp_path / "lie.safetensors", bfl_modules(),
                                 metadata={"ss_base_model_version": "sd_1.5", "ss_v2": "False"}))
    assert lora.arch == "flux" and any("sd_1.5" in n for n in lora.arch_notes)


def test_flux_detection_refuses_shapes_that_are_not_flux():
    assert detect_arch({"lora_unet_double_blocks_0_img_attn_qkv": (100, 96)}, {}).arch == "unknown"
    deep = detect_arch({"lora_unet_double_blocks_25_img_attn_proj": (96, 96)}, {})
    assert deep.arch == "unknown" and "19 double" in deep.notes[0]
    mixed = detect_arch({"lora_unet_double_blocks_0_img_attn_proj": (96, 96),
                         "lora_unet_single_blocks_0_linear1": (7 * 128, 128)}, {})
    assert mixed.arch == "unknown" and "hidden widths" in mixed.notes[0]


def test_a_split_part_of_the_wrong_height_is_refused_by_name(tmp_path):
    gen = torch.Generator().manual_seed(10)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, H, generator=gen),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(H + 1, 2, generator=gen),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, H, generator=gen),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(H, 2, generator=gen)},
              str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraMergeError, match=r"bad\.safetensors.*to_q.*97 output rows, but its place in "
                                             r"lora_unet_double_blocks_0_img_attn_qkv has 96"):
        read_lora(tmp_path / "bad.safetensors")


def test_the_cli_reports_a_bad_flux_file_in_one_line(tmp_path, capsys):
    from lib_loramerge.cli import main

    gen = torch.Generator().manual_seed(14)
    save_file({"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.randn(2, H, generator=gen),
               "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": torch.randn(H, 2, generator=gen)},
              str(tmp_path / "short.safetensors"))
    assert main(["info", str(tmp_path / "short.safetensors")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "short.safetensors" in err[0] and "proj_mlp" in err[0] and "linear1" in err[0]


def test_lycoris_modules_on_split_layers_fuse_through_their_exact_factors(tmp_path):
    gen = torch.Generator().manual_seed(12)
    w1, w2 = torch.randn(4, 4, generator=gen), torch.randn(H // 4, H // 4, generator=gen)
    a1, b1 = torch.randn(H, 2, generator=gen), torch.randn(2, H, generator=gen)
    a2, b2 = torch.randn(H, 2, generator=gen), torch.randn(2, H, generator=gen)
    path = write_tensors(tmp_path / "lyc.safetensors", {
        "lycoris_single_transformer_blocks_3_attn_to_q": {"lokr_w1": w1, "lokr_w2": w2},
        "lycoris_single_transformer_blocks_3_attn_to_v": {"hada_w1_a": a1, "hada_w1_b": b1, "hada_w2_a": a2,
                                                          "hada_w2_b": b2, "alpha": torch.tensor(1.0)},
    })
    lora = read_lora(path)
    assert lora.arch == "flux" and set(lora.modules) == {"lora_unet_single_blocks_3_linear1"}
    got = lora.modules["lora_unet_single_blocks_3_linear1"].delta(torch.float64)
    want = torch.zeros(7 * H, H, dtype=torch.float64)
    want[:H] = torch.kron(w1.double(), w2.double())
    want[2 * H:3 * H] = 0.5 * (a1.double() @ b1.double()) * (a2.double() @ b2.double())  # alpha 1 / rank 2
    assert_same_delta(got, want)


def test_dora_on_a_split_layer_is_refused_by_name(tmp_path):
    gen = torch.Generator().manual_seed(13)
    path = write_tensors(tmp_path / "dora.safetensors", {
        "lora_transformer_single_transformer_blocks_0_attn_to_q": {
            "lora_down.weight": torch.randn(2, H, generator=gen), "lora_up.weight": torch.randn(H, 2, generator=gen),
            "dora_scale": torch.rand(1, H, generator=gen) + 0.5},
        "lora_transformer_single_transformer_blocks_0_attn_to_k": {
            "lora_down.weight": torch.randn(2, H, generator=gen), "lora_up.weight": torch.randn(H, 2, generator=gen)},
    })
    with pytest.raises(LoraMergeError, match=r"dora\.safetensors.*DoRA module on a split Flux layer"):
        read_lora(path)
