"""`merge` from the command line: real files out, one-line errors, nothing left behind on failure."""

import json

import pytest
import torch
from synth import make_modules, write_kohya

from lib_loramerge.cli import main
from lib_loramerge.formats.reader import read_lora


@pytest.fixture
def pair(tmp_path):
    a = write_kohya(tmp_path / "a.safetensors",
                    make_modules("sd1", scope="locon", rank=4, seed=1, only="down_blocks_1|layers_1_"))
    b = write_kohya(tmp_path / "b.safetensors", make_modules("sd1", scope="attention", rank=2, seed=2, only="down_blocks_1"),
                    dtype=torch.float16)
    return a, b


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_merge_svd_writes_a_loadable_file_and_reports(tmp_path, pair, capsys):
    out = tmp_path / "m.safetensors"
    code, stdout, err = run(capsys, "merge", "--models", *pair, "--ratios", "0.8", "-0.5", "--te-ratios", "1", "0",
                            "--mode", "svd", "--rank", "3", "--dtype", "bf16", "--device", "cpu", "--out", out)
    assert code == 0, err
    assert f"wrote {out}" in stdout and "energy retained" in stdout
    merged = read_lora(out)
    assert merged.arch == "sd1" and merged.ranks() == [3]
    assert {m.dtype for m in merged.modules.values()} == {torch.bfloat16}
    # te strength 0 for b and b has no TE modules: the TE modules come from a alone
    assert any(n.startswith("lora_te") for n in merged.modules)


def test_merge_json_report(tmp_path, pair, capsys):
    out = tmp_path / "c.safetensors"
    code, stdout, _ = run(capsys, "merge", "--models", *pair, "--mode", "concat", "--out", out, "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["mode"] == "concat" and report["inputs"] == ["a", "b"] and report["modules_out"] > 0
    assert report["ranks_by_kind"]["linear"]["6"] > 0  # 4 + 2 on layers both touch


@pytest.mark.parametrize("extra,reason", [
    (["--mode", "add"], "add mode needs equal ranks"),
    (["--ratios", "1", "2", "3"], "--ratios has 3 values for 2 models"),
    (["--threshold", "1.5"], "threshold must be in (0, 1]"),
    (["--mode", "concat", "--threshold", "0.9"], "svd mode only"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--rank", "0"], "CUDA is not available"
     if not torch.cuda.is_available() else "rank must be at least 1"),
])
def test_user_errors_are_one_line_and_write_nothing(tmp_path, pair, capsys, extra, reason):
    out = tmp_path / "fail.safetensors"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = run(capsys, "merge", "--models", *pair, "--out", out, *extra)
    assert code == 2 and stdout == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and reason in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_existing_output_is_refused_before_work(tmp_path, pair, capsys):
    out = tmp_path / "keep.safetensors"
    out.write_bytes(b"mine")
    code, _, err = run(capsys, "merge", "--models", *pair, "--out", out)
    assert code == 2 and "exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"mine"
    code, _, _ = run(capsys, "merge", "--models", *pair, "--out", out, "--overwrite")
    assert code == 0 and read_lora(out).modules


def test_bad_input_and_mixed_architectures(tmp_path, pair, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage!" * 10)
    code, _, err = run(capsys, "merge", "--models", pair[0], bad, "--out", tmp_path / "o.safetensors")
    assert code == 2 and err.startswith(f"error: {bad}: ")
    xl = write_kohya(tmp_path / "xl.safetensors", make_modules("sdxl", scope="attention", only="attn2_to_k"))
    code, _, err = run(capsys, "merge", "--models", pair[0], xl, "--out", tmp_path / "o.safetensors")
    assert code == 2 and "different models" in err and "a is sd1" in err and "xl is sdxl" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_output_must_be_safetensors(tmp_path, pair, capsys):
    code, _, err = run(capsys, "merge", "--models", *pair, "--out", tmp_path / "o.pt")
    assert code == 2 and "must be a .safetensors file" in err
