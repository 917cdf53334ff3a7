"""Baking Flux LoRAs into Flux checkpoints (BFL single file and all-in-one; fp32, bf16, fp8)."""

import pytest
import torch
from flux_synth import DIVISOR, random_parts, write_peft
from safetensors.torch import load_file, save_file
from synth import assert_same_delta, make_modules, write_kohya

from lib_loramerge.cli import main
from lib_loramerge.errors import LoraMergeError
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.jobs import bake_to_file
from lib_loramerge.ops.merge import MergeInput
from lib_loramerge.synthetic import write_random_checkpoint

FP8 = torch.float8_e4m3fn


def bfl_key(module: str) -> str:
    """The checkpoint key of a kohya BFL module (the test's own rule: dots where BFL has them)."""
    path = module[len("lora_unet_"):]
    for word in ("double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod",
                 "txt_mod", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "in_layer", "out_layer",
                 "final_layer", "adaLN_modulation"):
        path = path.replace(word, word.replace("_", "~"))
    return path.replace("_", ".").replace("~", "_") + ".weight"


def te_key(module: str) -> str:
    if module.startswith("lora_te1_"):
        rest = module[len("lora_te1_text_model_encoder_layers_"):]
        layer, part = rest.split("_", 1)
        part = {"self_attn_q_proj": "self_attn.q_proj", "self_attn_k_proj": "self_attn.k_proj",
                "self_attn_v_proj": "self_attn.v_proj", "self_attn_out_proj": "self_attn.out_proj",
                "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}[part]
        return f"text_encoders.clip_l.transformer.text_model.encoder.layers.{layer}.{part}.weight"
    rest = module[len("lora_te3_encoder_block_"):]
    block, _, sub, part = rest.split("_", 3)
    return f"text_encoders.t5xxl.transformer.encoder.block.{block}.layer.{sub}.{part.replace('_', '.', 1)}.weight"


def loras(tmp_path, text_encoder=False):
    kohya = read_lora(write_kohya(tmp_path / "k.safetensors", make_modules(
        "flux", scope="all", rank=3, alpha=1.5, seed=21, text_encoder=text_encoder, width_divisor=DIVISOR)))
    parts = random_parts(seed=22)
    diffusers = read_lora(write_peft(tmp_path / "d.safetensors", {p: (u, d, None) for p, (u, d, _) in parts.items()}))
    return [MergeInput(kohya, unet=0.8, te=0.6), MergeInput(diffusers, unet=-0.5)]


def want_tensors(ckpt, inputs, key_of):
    """W + Σ sᵢ ΔWᵢ in float64 for every touched key, from each module's own dense ΔW."""
    base = load_file(str(ckpt))
    want: dict[str, torch.Tensor] = {}
    for inp in inputs:
        for name, module in inp.lora.modules.items():
            key = key_of(name)
            if key not in base:
                continue
            total = want.setdefault(key, base[key].double())
            total += inp.strength(name) * module.delta(torch.float64)
    return base, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP8], ids=["fp32", "bf16", "fp8"])
def test_bake_into_a_bfl_single_file_is_w_plus_the_sum_of_updates(tmp_path, dtype):
    ckpt = write_random_checkpoint(tmp_path / "flux.safetensors", "flux", width_divisor=DIVISOR, dtype=dtype, seed=5)
    inputs = loras(tmp_path)
    job = bake_to_file(ckpt, inputs, tmp_path / "out.safetensors", dtype=None)
    assert job.report.arch == "flux" and job.report.keys_patched == 314 and not job.report.unmatched
    assert job.report.by_block["D00"] == 20 and job.report.by_block["S37"] == 6 and job.report.by_block["OUT"] == 4
    base, want = want_tensors(ckpt, inputs, bfl_key)
    got = load_file(str(tmp_path / "out.safetensors"))
    assert set(got) == set(base) and len(want) == 314
    for key, value in got.items():
        assert value.dtype == dtype, key
        if key not in want:
            assert torch.equal(value.view(torch.uint8), base[key].view(torch.uint8)), key  # copied as it was
            continue
        w = want[key]
        if dtype == torch.float32:
            assert torch.allclose(value.double(), w, rtol=1e-6, atol=1e-7), key
        else:
            # one rounding to the output type: within one ulp of the exact value (bf16 8 bits, e4m3 4 bits),
            # plus float32 arithmetic where W and ΔW cancel (absolute, ~2⁻²⁴ of their size)
            ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-3
            tiny = 1e-8 if dtype == torch.bfloat16 else 2.0**-9
            assert bool(((value.double() - w).abs() <= ulp * w.abs() + tiny).all()), key
        assert not torch.equal(value.double(), base[key].double()), key  # the update is there


def test_fp8_rounds_once_from_fp32(tmp_path):
    ckpt = write_random_checkpoint(tmp_path / "f8.safetensors", "flux", width_divisor=DIVISOR, dtype=FP8, seed=6)
    inputs = loras(tmp_path)[:1]
    bake_to_file(ckpt, inputs, tmp_path / "o.safetensors", dtype=None)
    base = load_file(str(ckpt))
    got = load_file(str(tmp_path / "o.safetensors"))
    name = "lora_unet_double_blocks_7_img_attn_qkv"
    module = inputs[0].lora.modules[name]
    key = bfl_key(name)
    exact = base[key].float() + 0.8 * module.delta(torch.float32)
    cast = exact.to(FP8).float()
    assert (got[key].float() != cast).float().mean() < 1e-3  # ties of a different fp32 order only


def test_bake_into_an_all_in_one_file_reaches_clip_and_t5(tmp_path):
    ckpt = write_random_checkpoint(tmp_path / "aio.safetensors", "flux", width_divisor=DIVISOR,
                                   dtype=torch.float32, seed=7, prefixed=True)
    inputs = loras(tmp_path, text_encoder=True)
    job = bake_to_file(ckpt, inputs, tmp_path / "out.safetensors", dtype=None)
    assert not job.report.unmatched and job.report.by_block["CLIP"] == 72 and job.report.by_block["T5"] == 168

    def key_of(name):
        return te_key(name) if name.startswith("lora_te") else "model.diffusion_model." + bfl_key(name)

    base, want = want_tensors(ckpt, inputs, key_of)
    got = load_file(str(tmp_path / "out.safetensors"))
    assert len(want) == 314 + 72 + 168
    for key in ("text_encoders.t5xxl.transformer.encoder.block.3.layer.1.DenseReluDense.wi_1.weight",
                "text_encoders.clip_l.transformer.text_model.encoder.layers.5.self_attn.v_proj.weight",
                "model.diffusion_model.single_blocks.12.linear1.weight"):
        assert torch.allclose(got[key].double(), want[key], rtol=1e-6, atol=1e-7), key
    for key in want:
        assert torch.allclose(got[key].double(), want[key], rtol=1e-6, atol=1e-7), key


def test_te_modules_do_not_fit_a_transformer_only_file(tmp_path):
    ckpt = write_random_checkpoint(tmp_path / "flux.safetensors", "flux", width_divisor=DIVISOR, seed=8)
    with pytest.raises(LoraMergeError, match="no matching layer.*lora_te1_"):
        bake_to_file(ckpt, loras(tmp_path, text_encoder=True), tmp_path / "o.safetensors")


def test_quantised_and_gguf_checkpoints_are_refused_with_one_line(tmp_path, capsys):
    lora = write_kohya(tmp_path / "l.safetensors", make_modules("flux", rank=2, width_divisor=DIVISOR,
                                                                text_encoder=False))
    nf4 = tmp_path / "nf4.safetensors"
    save_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(64, 1, dtype=torch.uint8),
               "model.diffusion_model.double_blocks.0.img_attn.qkv.weight.absmax": torch.ones(4),
               "model.diffusion_model.img_in.weight": torch.zeros(96, 2)}, str(nf4))
    code = main(["bake", "--checkpoint", str(nf4), "--models", str(lora), "--out", str(tmp_path / "o.safetensors")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "nf4.safetensors" in err[0] and "quantised" in err[0]
    gguf = tmp_path / "flux1-dev-Q4_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    code = main(["bake", "--checkpoint", str(gguf), "--models", str(lora), "--out", str(tmp_path / "o.safetensors")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "Q4_0.gguf" in err[0] and ("GGUF" in err[0] or "gguf" in err[0])
    assert not (tmp_path / "o.safetensors").exists()


def test_an_sd_lora_is_refused_by_a_flux_checkpoint(tmp_path):
    ckpt = write_random_checkpoint(tmp_path / "flux.safetensors", "flux", width_divisor=DIVISOR, seed=9)
    sd1 = read_lora(write_kohya(tmp_path / "sd1.safetensors", make_modules("sd1", rank=2, width_divisor=8,
                                                                            only="attn1_to_q")))
    with pytest.raises(LoraMergeError, match="SD1 but the checkpoint is FLUX"):
        bake_to_file(ckpt, [MergeInput(sd1)], tmp_path / "o.safetensors")


def test_cli_bake_keeps_a_flux_files_dtype_by_default(tmp_path, capsys):
    ckpt = write_random_checkpoint(tmp_path / "flux.safetensors", "flux", width_divisor=DIVISOR, dtype=FP8, seed=10)
    lora = write_kohya(tmp_path / "l.safetensors", make_modules("flux", rank=2, width_divisor=DIVISOR,
                                                                text_encoder=False))
    out = tmp_path / "o.safetensors"
    code = main(["bake", "--checkpoint", str(ckpt), "--models", str(lora), "--out", str(out), "--verify"])
    assert code == 0, capsys.readouterr().err
    assert {t.dtype for t in load_file(str(out)).values()} == {FP8}


def test_extract_from_two_flux_checkpoints_recovers_a_baked_lora(tmp_path):
    from lib_loramerge.bake.extract import ExtractOptions
    from lib_loramerge.jobs_extract import extract_to_file

    base = write_random_checkpoint(tmp_path / "base.safetensors", "flux", width_divisor=DIVISOR,
                                   dtype=torch.float32, seed=11)
    lora = read_lora(write_kohya(tmp_path / "l.safetensors", make_modules(
        "flux", rank=2, alpha=2.0, seed=12, text_encoder=False, width_divisor=DIVISOR)))
    tuned = tmp_path / "tuned.safetensors"
    bake_to_file(base, [MergeInput(lora)], tuned, dtype=None)
    job = extract_to_file(base, tuned, tmp_path / "x.safetensors", ExtractOptions(rank=2, dtype=torch.float32))
    got = read_lora(job.path)
    assert got.arch == "flux" and set(got.modules) == set(lora.modules)  # the blocks, as kohya trains
    for name, module in lora.modules.items():
        assert_same_delta(got.modules[name].delta(torch.float64), module.delta(torch.float64), rel=1e-4, label=name)


def test_a_delta_made_by_blocks_of_rows_writes_the_same_bytes(tmp_path, monkeypatch):
    from lib_loramerge.bake import stream

    ckpt = write_random_checkpoint(tmp_path / "flux.safetensors", "flux", width_divisor=DIVISOR, dtype=torch.bfloat16,
                                   seed=13)
    inputs = loras(tmp_path)
    (tmp_path / "whole").mkdir()
    (tmp_path / "blocks").mkdir()
    whole = bake_to_file(ckpt, inputs, tmp_path / "whole" / "o.safetensors", dtype=None).path
    monkeypatch.setattr(stream, "DELTA_BUFFER_BYTES", 1)  # 256 rows at a time: linear1 (672 rows) in three
    blocks = bake_to_file(ckpt, inputs, tmp_path / "blocks" / "o.safetensors", dtype=None).path
    a, b = load_file(str(whole)), load_file(str(blocks))
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
