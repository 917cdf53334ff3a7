"""``merge --method`` and ``analyze`` from the command line: real files, recipes, replays, one-line errors."""

import json

import pytest
import torch
from safetensors import safe_open
from synth import make_modules, write_kohya

from lib_loramerge.cli import main
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.jobs import RECIPE_KEY


@pytest.fixture
def trio(tmp_path):
    only = "down_blocks_1_attentions_0|layers_1_self"
    return [write_kohya(tmp_path / f"{x}.safetensors", make_modules("sd1", rank=r, seed=s, only=only))
            for x, r, s in (("a", 4, 1), ("b", 2, 2), ("c", 3, 3))]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def recipe_of(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()[RECIPE_KEY])


def tensors_of(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)


@pytest.mark.parametrize("argv, recorded", [
    (("--method", "slerp", "--t", "0.3"), {"t": 0.3}),
    (("--method", "perpendicular"), {}),
    (("--method", "karcher"), {}),
    (("--method", "norm", "--norm", "spectral", "--norm-target", "max"), {"norm_kind": "spectral", "norm_target": "max"}),
    (("--method", "ties", "--density", "0.4"), {"density": 0.4}),
    (("--method", "dare", "--seed", "11"), {"density": 0.5, "seed": 11}),
    (("--method", "ties-dense"), {"density": 0.2}),
])
def test_merge_with_a_method_records_it_and_replays_byte_identical(tmp_path, trio, capsys, argv, recorded):
    out = tmp_path / "m.safetensors"
    code, stdout, err = run(capsys, "merge", "--models", *trio[:2], "--rank", "3", "--device", "cpu", "--out", out,
                            "--verify", *argv)
    assert code == 0, err
    assert "method: " in stdout and "verified" in stdout
    recipe = recipe_of(out)
    assert recipe["method"] == argv[1] and recipe["method_options"] == recorded
    assert read_lora(out).ranks() == [3]
    code, stdout, err = run(capsys, "replay", out, "--lora-dir", tmp_path, "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(stdout)["byte_identical"] is True


def test_dare_is_reproducible_by_seed(tmp_path, trio, capsys):
    files = []
    for i, seed in enumerate((5, 5, 6)):
        out = tmp_path / f"d{i}.safetensors"
        assert run(capsys, "merge", "--models", *trio, "--method", "dare", "--seed", seed, "--device", "cpu",
                   "--out", out)[0] == 0
        files.append(tensors_of(out))
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])
    assert any(not torch.equal(files[0][k], files[2][k]) for k in files[0])


def test_sum_is_the_default_and_records_no_method(tmp_path, trio, capsys):
    plain, summed = tmp_path / "p.safetensors", tmp_path / "s.safetensors"
    assert run(capsys, "merge", "--models", *trio[:2], "--device", "cpu", "--out", plain)[0] == 0
    assert run(capsys, "merge", "--models", *trio[:2], "--device", "cpu", "--out", summed, "--method", "sum")[0] == 0
    assert "method" not in recipe_of(plain)
    a, b = tensors_of(plain), tensors_of(summed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("argv, message", [
    (("--method", "slerp"), "exactly two LoRAs, got 3"),
    (("--method", "slerp", "--t", "1.5"), "t must be in [0, 1]"),
    (("--method", "slerp", "--t", "nan"), "finite"),
    (("--method", "ties", "--density", "0"), "density must be in (0, 1]"),
    (("--method", "ties", "--mode", "concat"), "(--mode svd)"),
    (("--method", "perpendicular", "--t", "0.2"), "--t does not apply to method perpendicular"),
    (("--method", "ties", "--t", "0.5"), "--t does not apply to method ties"),
    (("--density", "0.3",), "--density does not apply to method sum"),
    (("--method", "norm", "--norm-target", "-2"), "must be positive"),
    (("--method", "norm", "--norm-target", "inf"), "finite"),
    (("--method", "nuslerp",), "invalid choice"),
])
def test_bad_method_input_is_one_line_exit_2(tmp_path, trio, capsys, argv, message):
    out = tmp_path / "bad.safetensors"
    code, stdout, err = run(capsys, "merge", "--models", *trio, "--device", "cpu", "--out", out, *argv)
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("method", ["slerp", "ties", "dare-dense"])
def test_a_factor_with_nan_is_one_line_exit_2(tmp_path, trio, capsys, method):
    modules = make_modules("sd1", rank=2, seed=9, only="down_blocks_1_attentions_0|layers_1_self")
    modules[0].up[0, 0] = float("nan")
    bad = write_kohya(tmp_path / "nan.safetensors", modules)
    out = tmp_path / "o.safetensors"
    code, _, err = run(capsys, "merge", "--models", trio[0], bad, "--method", method, "--device", "cpu", "--out", out)
    assert code == 2 and "NaN" in err and len(err.strip().splitlines()) == 1 and not out.exists()
