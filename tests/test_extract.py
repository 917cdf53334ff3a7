"""Extracting a LoRA from two checkpoints with the real key layouts (narrow widths), against dense references."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from synth import make_modules

from lib_loramerge import sdlayouts
from lib_loramerge.bake.extract import ExtractOptions
from lib_loramerge.bake.keymap import CheckpointLayout
from lib_loramerge.cli import main
from lib_loramerge.errors import LoraMergeError
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.jobs import RECIPE_KEY, bake_to_file
from lib_loramerge.jobs_extract import extract_to_file
from lib_loramerge.model import LoraModel
from lib_loramerge.ops.merge import MergeInput, parallel_map
from lib_loramerge.synthetic import write_random_checkpoint

NARROW = {"sd1": 8, "sd2": 8, "sdxl": 16}
F32 = torch.float32


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bases")
    return {arch: write_random_checkpoint(folder / f"base_{arch}.safetensors", arch, width_divisor=d, dtype=F32, seed=2,
                                          vae=arch == "sd1")
            for arch, d in NARROW.items()}


def as_lora(modules, arch) -> LoraModel:
    return LoraModel(modules={m.name: m for m in modules}, arch=arch, path=Path("x.safetensors"))


def baked(base: Path, modules, arch: str, out: Path) -> Path:
    """tuned = base + ΔW of ``modules`` at strength 1, in fp32."""
    return bake_to_file(base, [MergeInput(as_lora(modules, arch))], out, dtype=F32).path


def dense_delta(module) -> torch.Tensor:
    """A1111's ΔW of a kohya module, (out, in·kh·kw), float64, written out here."""
    up = module.up.double().reshape(module.up.shape[0], -1)
    down = module.down.double().reshape(module.down.shape[0], -1)
    scale = 1.0 if module.alpha is None else module.alpha / down.shape[0]
    return scale * up @ down


def layer_deltas(base: Path, tuned: Path, names) -> dict[str, torch.Tensor]:
    """tuned − base per module in float64, sliced by the checkpoint key map (q/k/v rows included)."""
    b, t = load_file(base), load_file(tuned)
    layout = CheckpointLayout({k: tuple(v.shape) for k, v in b.items()})
    out = {}
    for name in names:
        target = layout.target(name)
        delta = t[target.key].double() - b[target.key].double()
        if target.rows is not None:
            delta = delta[target.rows[0]:target.rows[1]]
        out[name] = delta.reshape(delta.shape[0], -1)
    return out


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_round_trip_gives_back_the_baked_lora_on_every_module(tmp_path, bases, arch):
    lora = make_modules(arch, scope="attention", rank=4, alpha=2.0, seed=7, width_divisor=NARROW[arch])
    tuned = baked(bases[arch], lora, arch, tmp_path / "tuned.safetensors")
    job = extract_to_file(bases[arch], tuned, tmp_path / "extracted.safetensors", ExtractOptions(rank=4, dtype=F32))
    got = read_lora(job.path)
    assert set(got.modules) == {m.name for m in lora} == set(sdlayouts.lora_modules(arch, "attention"))
    for m in lora:
        want, have = dense_delta(m), got.modules[m.name].delta().double().reshape(m.out_features, -1)
        assert float((have - want).norm()) <= 2e-6 * float(want.norm()), m.name
    assert job.report.ranks_by_kind and all(set(r) == {4} for r in job.report.ranks_by_kind.values())
    assert all(q.retained > 1 - 1e-5 and q.excess is None for q in job.report.quality.values())
    meta = job.metadata
    recipe = json.loads(meta[RECIPE_KEY])
    assert recipe["type"] == "extract" and recipe["rank"] == 4 and recipe["dtype"] == "fp32"
    assert recipe["base"] == {"file": bases[arch].name, "sha256": hashlib.sha256(bases[arch].read_bytes()).hexdigest()}
    assert recipe["tuned"]["sha256"] == hashlib.sha256(tuned.read_bytes()).hexdigest()
    assert meta["ss_base_model_version"] == {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[arch]
    assert meta["ss_network_dim"] == "4" and meta["ss_sd_model_name"] == bases[arch].name


def test_locon_round_trip_through_conv_rank(tmp_path, bases):
    lora = make_modules("sd1", scope="locon", rank=3, conv_rank=2, alpha=1.0, seed=8, width_divisor=8)
    assert {m.kind for m in lora} == {"linear", "conv1x1", "conv"}
    tuned = baked(bases["sd1"], lora, "sd1", tmp_path / "tuned.safetensors")
    job = extract_to_file(bases["sd1"], tuned, tmp_path / "locon.safetensors",
                          ExtractOptions(rank=3, conv_rank=2, dtype=F32))
    got = read_lora(job.path)
    assert set(got.modules) == {m.name for m in lora}
    for m in lora:
        have = got.modules[m.name]
        assert have.weight_shape == m.weight_shape and have.rank == (2 if m.kind == "conv" else 3), m.name
        want = dense_delta(m)
        assert float((have.delta().double().reshape(want.shape) - want).norm()) <= 2e-6 * float(want.norm()), m.name
    assert json.loads(job.metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2"}
    # without a conv rank only the attention layers are extracted (the ResNet changes are not kohya's LoRA scope)
    plain = extract_to_file(bases["sd1"], tuned, tmp_path / "plain.safetensors", ExtractOptions(rank=3, dtype=F32))
    assert set(read_lora(plain.path).modules) == set(sdlayouts.lora_modules("sd1", "attention"))


def noisy_tuned(base: Path, lora, arch: str, tmp_path: Path, noise: float) -> Path:
    """base + ΔW(lora) + Gaussian noise on every weight matrix: a fine-tune that is not exactly low rank."""
    tuned = load_file(baked(base, lora, arch, tmp_path / "lowrank.safetensors"))
    g = torch.Generator().manual_seed(11)
    for key, value in tuned.items():
        if value.is_floating_point() and value.ndim >= 2:
            tuned[key] = value + noise * torch.randn(value.shape, generator=g)
    path = tmp_path / "noisy.safetensors"
    save_file(tuned, str(path))
    return path


@pytest.mark.parametrize("rank", [8, 4])
def test_noisy_difference_is_within_one_percent_of_the_optimal_rank_k_error(tmp_path, bases, rank):
    lora = make_modules("sd1", scope="attention", rank=8, alpha=8.0, seed=9, width_divisor=8)
    tuned = noisy_tuned(bases["sd1"], lora, "sd1", tmp_path, noise=0.005)
    job = extract_to_file(bases["sd1"], tuned, tmp_path / "e.safetensors", ExtractOptions(rank=rank, dtype=F32))
    got = read_lora(job.path)
    deltas = layer_deltas(bases["sd1"], tuned, got.modules)
    assert len(deltas) == len(lora)
    resolved = 0
    for name, delta in deltas.items():
        sigma = torch.linalg.svdvals(delta)  # the dense reference
        optimal = float(sigma[rank:].square().sum().sqrt())
        ours = float((delta - got.modules[name].delta().double().reshape(delta.shape)).norm())
        assert ours <= 1.01 * optimal, (name, ours / optimal - 1)
        quality = job.report.quality[name]
        assert quality.retained == pytest.approx(1 - ours**2 / float(sigma.square().sum()), abs=1e-5), name
        if quality.excess is not None:
            resolved += 1
            assert ours / optimal - 1 <= quality.excess + 1e-5, name  # the report does not flatter
    assert resolved == len(deltas)  # the noise makes every module's error measurable
    assert job.report.summary()["excess_max"] < 0.01


def test_dynamic_ranks_keep_what_they_promise(tmp_path, bases):
    lora = make_modules("sd1", scope="attention", rank=8, alpha=8.0, seed=9, width_divisor=8, only="down_blocks_1")
    tuned = noisy_tuned(bases["sd1"], lora, "sd1", tmp_path, noise=0.005)
    job = extract_to_file(bases["sd1"], tuned, tmp_path / "t.safetensors",
                          ExtractOptions(rank=12, threshold=0.9, dtype=F32, text_encoder=False))
    got = read_lora(job.path)
    deltas = layer_deltas(bases["sd1"], tuned, got.modules)
    ranks = set()
    for name, delta in deltas.items():
        m = got.modules[name]
        kept = float(m.delta().double().reshape(delta.shape).square().sum()) / float(delta.square().sum())
        assert kept >= 0.9 - 1e-5 or m.rank == 12, (name, kept)
        ranks.add(m.rank)
    assert len(ranks) > 1 and max(ranks) <= 12  # ranks differ per module
    ratio = extract_to_file(bases["sd1"], tuned, tmp_path / "r.safetensors",
                            ExtractOptions(rank=12, sv_ratio=3.0, dtype=F32, text_encoder=False))
    for m in read_lora(ratio.path).modules.values():
        sigma = torch.linalg.svdvals(m.delta().double().reshape(m.out_features, -1))[:m.rank]
        assert float(sigma[-1]) >= float(sigma[0]) / 3 * (1 - 1e-5) or m.rank == 1, m.name


def test_identical_layers_min_diff_and_text_encoder_switch(tmp_path, bases):
    lora = make_modules("sd1", scope="attention", rank=2, seed=3, width_divisor=8, only="attn2_to_k|layers_0_mlp")
    tuned = baked(bases["sd1"], lora, "sd1", tmp_path / "tuned.safetensors")
    job = extract_to_file(bases["sd1"], tuned, tmp_path / "a.safetensors", ExtractOptions(rank=2, dtype=F32))
    assert set(job.report.quality) == {m.name for m in lora}
    skipped = dict(job.report.skipped)
    assert len(skipped) == len(sdlayouts.lora_modules("sd1", "attention")) - len(lora)
    assert set(skipped.values()) == {"identical in both checkpoints"}
    no_te = extract_to_file(bases["sd1"], tuned, tmp_path / "b.safetensors",
                            ExtractOptions(rank=2, text_encoder=False, dtype=F32))
    assert not any(n.startswith("lora_te") for n in no_te.report.quality) and no_te.report.modules_out > 0
    largest = sorted(float(dense_delta(m).abs().max()) for m in lora)
    out = tmp_path / "none.safetensors"
    with pytest.raises(LoraMergeError, match="nothing to extract: no layer differs"):
        extract_to_file(bases["sd1"], tuned, out, ExtractOptions(rank=2, min_diff=largest[-1] * 1.01))
    assert not out.exists()
    middle = (largest[len(largest) // 2 - 1] + largest[len(largest) // 2]) / 2  # between two modules
    some = extract_to_file(bases["sd1"], tuned, tmp_path / "c.safetensors", ExtractOptions(rank=2, min_diff=middle))
    assert some.report.modules_out == sum(v > middle for v in largest) > 0
    assert sum("≤ --min-diff" in why for _, why in some.report.skipped) == sum(v <= middle for v in largest)


def test_bad_inputs_fail_before_any_work_with_one_line(tmp_path, bases):
    out = tmp_path / "x.safetensors"
    opts = ExtractOptions(rank=2)
    with pytest.raises(LoraMergeError, match="is an SDXL checkpoint but the base base_sd1.safetensors is an SD1 one") as e:
        extract_to_file(bases["sd1"], bases["sdxl"], out, opts)
    assert str(bases["sdxl"]) in str(e.value)
    wide = load_file(bases["sd1"])
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    wide[key] = torch.zeros(wide[key].shape[0], wide[key].shape[1] * 2)
    other = tmp_path / "other.safetensors"
    save_file(wide, str(other))
    with pytest.raises(LoraMergeError, match=r"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q: "
                                             r".*has shape \[40, 80\] here but \[40, 40\] in the base"):
        extract_to_file(bases["sd1"], other, out, opts)
    broken = load_file(bases["sd1"])
    broken[key] = broken[key].clone()
    broken[key][0, 0] = float("nan")
    nan = tmp_path / "nan.safetensors"
    save_file(broken, str(nan))
    with pytest.raises(LoraMergeError, match=f"{nan}: lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
                                             ".*holds NaN or Inf"):
        extract_to_file(bases["sd1"], nan, out, opts)
    lora_file = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(4, 1)}, str(lora_file))
    with pytest.raises(LoraMergeError, match="not an LDM-format Stable Diffusion checkpoint"):
        extract_to_file(bases["sd1"], lora_file, out, opts)
    with pytest.raises(LoraMergeError, match="base and tuned are the same file"):
        extract_to_file(bases["sd1"], bases["sd1"], out, opts)
    with pytest.raises(LoraMergeError, match="would replace one of the checkpoints"):
        extract_to_file(bases["sd1"], other, other, opts, overwrite=True)
    for bad, message in [(ExtractOptions(rank=0), "rank must be a whole number"),
                         (ExtractOptions(threshold=0.9, sv_ratio=2.0), "not both"),
                         (ExtractOptions(threshold=1.5), r"threshold must be in \(0, 1\]"),
                         (ExtractOptions(min_diff=-1.0), "--min-diff must be"),
                         (ExtractOptions(device="tpu"), "unknown device")]:
        with pytest.raises(LoraMergeError, match=message):
            extract_to_file(bases["sd1"], other, out, bad)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors", "nan.safetensors",
                                                                               "other.safetensors"]


def test_interrupt_writes_nothing_and_a_ckpt_base_streams_too(tmp_path, bases):
    lora = make_modules("sd1", scope="attention", rank=2, seed=3, width_divisor=8)
    tuned = baked(bases["sd1"], lora, "sd1", tmp_path / "tuned.safetensors")
    seen = []

    def stop_at_five(done, total, name):
        seen.append(done)
        if done == 5:
            raise KeyboardInterrupt

    out = tmp_path / "stopped.safetensors"
    with pytest.raises(KeyboardInterrupt):
        extract_to_file(bases["sd1"], tuned, out, ExtractOptions(rank=2), progress=stop_at_five)
    assert seen == [1, 2, 3, 4, 5] and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuned.safetensors"]  # no temp file either
    ckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": load_file(bases["sd1"])}, ckpt)
    job = extract_to_file(ckpt, tuned, tmp_path / "from_ckpt.safetensors", ExtractOptions(rank=2, dtype=F32))
    assert job.report.modules_out == len(lora) and any("loaded whole" in n for n in job.report.notes)


def test_parallel_map_window_reads_only_a_few_items_ahead():
    taken = []

    def items():
        for i in range(20):
            taken.append(i)
            yield i

    results = []
    for value in parallel_map(lambda i: i * i, items(), torch.device("cpu"), window=3):
        results.append(value)
        assert len(taken) <= len(results) + 3  # never the whole generator at once
    assert results == [i * i for i in range(20)]


def test_cli_extract_reports_quality_and_fails_in_one_line(tmp_path, bases, capsys):
    lora = make_modules("sd1", scope="attention", rank=3, seed=5, width_divisor=8, only="down_blocks_0|layers_1_")
    tuned = noisy_tuned(bases["sd1"], lora, "sd1", tmp_path, noise=0.002)
    out = tmp_path / "cli.safetensors"
    code = main(["extract", "--base", str(bases["sd1"]), "--tuned", str(tuned), "--rank", "3", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert stdout.startswith(f"wrote {out} (SD1 LoRA: noisy.safetensors − base_sd1.safetensors)")
    assert "energy retained (fraction of ‖ΔW‖²): min" in stdout and "per LBW block: BASE" in stdout
    assert "error over the optimal rank-k error (estimated from the sketch): max" in stdout
    code = main(["extract", "--base", str(bases["sd1"]), "--tuned", str(tuned), "--rank", "3", "--out", str(out),
                 "--overwrite", "--json", "--no-text-encoder", "--dtype", "bf16"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["out"] == str(out) and report["arch"] == "sd1"
    assert report["modules"] and not any(n.startswith("lora_te") for n in report["modules"])
    assert all({"rank", "retained", "excess", "energy", "steps"} <= set(q) for q in report["modules"].values())
    assert {m.dtype for m in read_lora(out).modules.values()} == {torch.bfloat16}
    for argv, message in [(["--rank", "0"], "--rank: must be at least 1"),
                          (["--threshold", "0.5", "--sv-ratio", "2"], "not allowed with argument"),
                          (["--device", "tpu"], "unknown device 'tpu'")]:
        code = main(["extract", "--base", str(bases["sd1"]), "--tuned", str(tuned), "--out",
                     str(tmp_path / "no.safetensors"), *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    code = main(["extract", "--base", str(tmp_path / "missing.safetensors"), "--tuned", str(tuned), "--out",
                 str(tmp_path / "no.safetensors")])
    assert code == 2 and "missing.safetensors: no such file" in capsys.readouterr().err
    assert not (tmp_path / "no.safetensors").exists()
    with safe_open(str(out), "pt") as f:
        assert math.isfinite(float(f.get_tensor(next(iter(f.keys()))).float().sum()))


def test_a_mismatched_pair_is_refused_before_any_checkpoint_is_hashed(tmp_path, bases, monkeypatch):
    import lib_loramerge.jobs_extract as jobs_extract

    started = []
    monkeypatch.setattr(jobs_extract, "BackgroundHashes", lambda paths, whole: started.append(paths))
    with pytest.raises(LoraMergeError, match="extract needs two checkpoints of the same model"):
        extract_to_file(bases["sd2"], bases["sdxl"], tmp_path / "x.safetensors", ExtractOptions(rank=2))
    assert started == []
