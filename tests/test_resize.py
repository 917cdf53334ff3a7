"""Resizing a LoRA: each policy picks the rank its definition says, size targets fit, metadata is kept."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from synth import make_modules, write_kohya, write_tensors
from test_lycoris import SHAPES, a1111_delta, loha_parts, lokr_parts

from lib_loramerge.cli import main
from lib_loramerge.errors import LoraMergeError
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.formats.safetensors_io import file_data_sha256, read_header
from lib_loramerge.jobs import RECIPE_KEY
from lib_loramerge.jobs_resize import resize_to_file
from lib_loramerge.model import LoraModule
from lib_loramerge.ops.policies import RankPolicy
from lib_loramerge.ops.resize import spectra, threshold_for_size

F64 = torch.float64
# two SD1 layers with hand-made spectra (alpha = rank, so ΔW = up @ down exactly)
A = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # 768 × 768
B = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # 320 × 768
SPECTRA = {A: [4.0, 3.0, 2.0, 1.0], B: [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]}
# A: energy 16 9 4 1 (cumulative .533 .833 .967 1), Σσ 10 (.4 .7 .9 1)
# B: energy 64 16 4 1 .25 .0625 (cumulative .750 .938 .985 .996 .999 1), Σσ 15.75 (.508 .762 .889 .952 .984 1)


def spectral_module(name: str, shape: tuple[int, int], sigma: list[float], seed: int) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(shape[0], len(sigma), generator=g, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(shape[1], len(sigma), generator=g, dtype=F64)).Q
    return LoraModule(name, (u * torch.tensor(sigma, dtype=F64)).float(), v.T.float().contiguous(), float(len(sigma)))


@pytest.fixture
def source(tmp_path):
    modules = [spectral_module(A, (768, 768), SPECTRA[A], 1), spectral_module(B, (320, 768), SPECTRA[B], 2)]
    path = write_kohya(tmp_path / "hand.safetensors", modules, metadata={
        "ss_network_dim": "6", "ss_network_alpha": "Dynamic", "ss_training_comment": "trained by hand",
        "ss_tag_frequency": json.dumps({"tags": {"cat": 3}}), "sshs_model_hash": "0" * 64,
        "modelspec.title": "hand", "ss_output_name": "hand", "ss_base_model_version": "sd_v1"})
    return path, {m.name: m for m in modules}


@pytest.mark.parametrize("policy,ranks", [
    (RankPolicy("rank", 2), (2, 2)),
    (RankPolicy("threshold", 0.9), (3, 2)),
    (RankPolicy("threshold", 0.95), (3, 3)),
    (RankPolicy("sv_fro", 0.95), (3, 2)),  # ‖ΔW_k‖_F ≥ 0.95 ‖ΔW‖_F: energy ≥ 0.9025
    (RankPolicy("sv_cumulative", 0.75), (3, 2)),
    (RankPolicy("sv_ratio", 4.0), (4, 3)),
    (RankPolicy("sv_ratio", 4.0, cap=3), (3, 3)),
    (RankPolicy("sv_fro", 1.0), (4, 6)),  # kohya would stop at len − 1: 3 and 5
])
def test_each_policy_picks_the_rank_its_definition_says(tmp_path, source, policy, ranks):
    path, modules = source
    job = resize_to_file(path, tmp_path / "out.safetensors", policy, dtype=torch.float32)
    assert (job.ranks[A], job.ranks[B]) == ranks
    out = read_lora(job.path)
    for name, k in zip((A, B), ranks, strict=True):
        delta = modules[name].delta().double()
        u, s, vh = torch.linalg.svd(delta)  # the dense reference: its best rank-k approximation
        best = (u[:, :k] * s[:k]) @ vh[:k]
        got = out.modules[name].delta().double()
        assert float((got - best).norm()) <= 1e-5 * float(delta.norm()), name
        kept = float(s[:k].square().sum() / s.square().sum())
        assert job.report.energy[name] == pytest.approx(kept, abs=1e-6)


def test_metadata_is_kept_and_updated(tmp_path, source):
    path, _ = source
    job = resize_to_file(path, tmp_path / "small.safetensors", RankPolicy("rank", 2))
    meta = read_header(job.path).metadata
    assert meta["ss_training_comment"] == "trained by hand" and json.loads(meta["ss_tag_frequency"]) == {"tags": {"cat": 3}}
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2"
    assert meta["ss_output_name"] == meta["modelspec.title"] == "small" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["sshs_model_hash"] == file_data_sha256(job.path) != "0" * 64
    recipe = json.loads(meta[RECIPE_KEY])
    assert recipe["type"] == "resize" and recipe["policy"] == "rank 2"
    assert recipe["inputs"][0]["file"] == "hand.safetensors" and recipe["inputs"][0]["hash"] == file_data_sha256(path)
    assert {m.dtype for m in read_lora(job.path).modules.values()} == {torch.float32}  # the source's dtype
    again = resize_to_file(job.path, tmp_path / "smaller.safetensors", RankPolicy("rank", 1), dtype=torch.bfloat16)
    chained = json.loads(read_header(again.path).metadata[RECIPE_KEY])
    assert chained["source_recipe"]["policy"] == "rank 2"  # a resize of a resize keeps the history
    assert {m.dtype for m in read_lora(again.path).modules.values()} == {torch.bfloat16}


def test_threshold_for_size_takes_the_largest_threshold_that_fits():
    values = {"a": torch.tensor(SPECTRA[A], dtype=F64), "b": torch.tensor(SPECTRA[B], dtype=F64)}

    def size_of(threshold, ranks):  # 100 bytes per rank unit, 10 of header
        return 10 + 100 * sum(ranks.values())

    # thresholds where a rank steps: a .533 .833 .967 1, b .750 .938 .985 .996 .999 1
    for budget, threshold, ranks in [(210, 16 / 30, {"a": 1, "b": 1}), (310, 64 / 85.3125, {"a": 2, "b": 1}),
                                     (410, 25 / 30, {"a": 2, "b": 2}), (509, 25 / 30, {"a": 2, "b": 2}),
                                     (510, 80 / 85.3125, {"a": 3, "b": 2}), (1010, 1.0, {"a": 4, "b": 6})]:
        got_threshold, got_ranks = threshold_for_size(values, size_of, budget)
        assert got_ranks == ranks and got_threshold == pytest.approx(threshold, abs=1e-9), budget
    assert threshold_for_size(values, size_of, 10_000, cap=3)[1] == {"a": 3, "b": 3}
    with pytest.raises(LoraMergeError, match="even rank 1 for every module makes a file of"):
        threshold_for_size(values, size_of, 209)


@pytest.mark.parametrize("mib", [0.6, 1.0, 1.7])
def test_size_target_is_met(tmp_path, mib):
    modules = make_modules("sd1", scope="attention", rank=16, alpha=8.0, seed=4, std=0.05,
                           only="down_blocks_1|mid_block|layers_[0-3]_")
    path = write_kohya(tmp_path / "big.safetensors", modules, dtype=torch.float16)
    job = resize_to_file(path, tmp_path / "fit.safetensors", size_mib=mib)
    budget = int(mib * 2**20)
    assert job.path.stat().st_size == job.size <= budget
    assert len(set(job.ranks.values())) > 1  # one threshold, different ranks per module
    same = resize_to_file(path, tmp_path / "same.safetensors", RankPolicy("threshold", job.threshold))
    assert same.ranks == job.ranks  # the threshold, applied as a policy, gives the same ranks
    # it is the largest threshold that fits: the next one at which some module's rank steps up does not
    steps = sorted({float(f) for v in spectra(read_lora(path)).values()
                    for f in torch.cumsum(v.square(), 0) / v.square().sum()})
    following = next(f for f in steps if f > job.threshold + 1e-6)
    bigger = resize_to_file(path, tmp_path / "bigger.safetensors", RankPolicy("threshold", min(following, 1.0)))
    assert bigger.size > budget
    recipe = json.loads(read_header(job.path).metadata[RECIPE_KEY])
    assert recipe["size_mib"] == mib and recipe["threshold"] == job.threshold


def test_lycoris_inputs_come_out_as_the_best_plain_lora(tmp_path):
    for algo, parts in (("loha", loha_parts()), ("lokr", lokr_parts())):
        path = write_tensors(tmp_path / f"{algo}.safetensors", parts, metadata={
            "ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": algo})})
        job = resize_to_file(path, tmp_path / f"{algo}_r4.safetensors", RankPolicy("rank", 4), dtype=torch.float32)
        out = read_lora(job.path)
        meta = read_header(job.path).metadata
        assert meta["ss_network_module"] == "networks.lora" and "ss_network_args" not in meta
        assert any("ss_network_args" in n for n in job.report.notes)
        for name, module in out.modules.items():
            assert type(module) is LoraModule and module.rank <= 4
            want = a1111_delta(parts[name], SHAPES[name]).reshape(SHAPES[name][0], -1)
            u, s, vh = torch.linalg.svd(want, full_matrices=False)
            best = (u[:, :4] * s[:4]) @ vh[:4]
            got = module.delta().double().reshape(want.shape)
            assert float((got - best).norm()) <= 2e-5 * float(want.norm()), (algo, name)


def test_refusals_are_one_line_and_write_nothing(tmp_path, source):
    path, _ = source
    out = tmp_path / "x.safetensors"
    dora = {"lora_up.weight": torch.ones(320, 1), "lora_down.weight": torch.ones(1, 768),
            "dora_scale": torch.ones(1, 768)}
    dora_path = write_tensors(tmp_path / "dora.safetensors", {B: dora})
    for call, message in [
        (lambda: resize_to_file(path, out, RankPolicy("threshold", 2.0)), r"threshold must be in \(0, 1\]"),
        (lambda: resize_to_file(path, out), "give a rank policy or a size target"),
        (lambda: resize_to_file(path, out, RankPolicy("rank", 2), size_mib=1.0), "give a rank policy or a size target"),
        (lambda: resize_to_file(path, out, size_mib=-1.0), "--size-mib must be a positive number"),
        (lambda: resize_to_file(path, path, RankPolicy("rank", 2), overwrite=True), "would replace the LoRA"),
        (lambda: resize_to_file(dora_path, out, RankPolicy("rank", 1)), "DoRA module"),
        (lambda: resize_to_file(tmp_path / "none.safetensors", out, RankPolicy("rank", 1)), "no such file"),
    ]:
        with pytest.raises(LoraMergeError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    assert not out.exists()


def test_cli_resize(tmp_path, source, capsys):
    path, _ = source
    out = tmp_path / "cli.safetensors"
    code = main(["resize", str(path), "--sv-ratio", "4", "--max-rank", "3", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert stdout.startswith(f"wrote {out} (SD1, resized hand: keep σ ≥ σ_max/4 (sv_ratio), at most rank 3;")
    assert "energy retained (fraction of ‖ΔW‖²): min" in stdout and "per LBW block: BASE" in stdout
    code = main(["resize", str(path), "--size-mib", "2", "--out", str(out), "--overwrite", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["size_bytes"] <= 2 * 2**20 and report["threshold"] is not None
    assert set(report["modules"]) == {A, B} and report["modules"][B]["source_rank"] == 6
    for argv, message in [([], "one of the arguments --rank --threshold --sv-fro --sv-ratio --sv-cumulative --size-mib "
                               "is required"),
                          (["--rank", "2", "--threshold", "0.5"], "not allowed with argument"),
                          (["--rank", "2", "--max-rank", "3"], "goes with a dynamic policy only"),
                          (["--sv-cumulative", "0"], r"sv_cumulative must be in (0, 1]")]:
        code = main(["resize", str(path), "--out", str(tmp_path / "no.safetensors"), *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "no.safetensors").exists()
    save_file({"x": torch.zeros(2)}, str(tmp_path / "notlora.safetensors"))
    code = main(["resize", str(tmp_path / "notlora.safetensors"), "--rank", "2", "--out", str(tmp_path / "n.safetensors")])
    assert code == 2 and "notlora.safetensors" in capsys.readouterr().err
