"""`info` on good files, and every kind of bad input: one line on stderr, exit 2, no traceback."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from synth import kohya_state_dict, make_modules, write_kohya

from lib_loramerge.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_json_fields(tmp_path, capsys):
    mods = make_modules("sdxl", scope="locon", rank=4, alpha=2.0, only="input_blocks_4|lora_te")
    path = write_kohya(tmp_path / "x.safetensors", mods, dtype=torch.float16,
                       metadata={"ss_output_name": "mychar", "ss_base_model_version": "sdxl_base_v1-0"})
    code, out, err = run(capsys, "info", str(path), "--json")
    assert code == 0 and err == ""
    info = json.loads(out)
    assert info["format"] == "kohya" and info["arch"] == "sdxl" and info["algorithm"] == "LoCon"
    assert info["modules"] == len(mods) and info["ranks"] == [4] and info["dtype"] == "fp16"
    kernels = [tuple(m.down.shape[2:]) for m in mods]
    assert info["modules_by_kind"] == {"linear": kernels.count(()), "conv1x1": kernels.count((1, 1)),
                                       "conv": kernels.count((3, 3))}
    assert info["alphas"] == [2.0] and info["metadata"]["ss_output_name"] == "mychar"
    assert info["text_encoder_modules"] == 72 + 192


def test_info_text(tmp_path, capsys):
    path = write_kohya(tmp_path / "a.safetensors", make_modules("sd1", scope="attention", rank=2, alpha=None))
    code, out, _ = run(capsys, "info", str(path))
    assert code == 0
    assert "arch:        SD1" in out and "ranks:       2 ×264" in out and "scale 1" in out


def corrupt_files(tmp: "os.PathLike") -> dict:
    from pathlib import Path
    tmp = Path(tmp)
    files = {}
    files["missing"] = (tmp / "nope.safetensors", "no such file")
    d = tmp / "folder.safetensors"
    d.mkdir()
    files["directory"] = (d, "is a directory")
    (tmp / "empty.safetensors").write_bytes(b"")
    files["empty"] = (tmp / "empty.safetensors", "empty file")
    (tmp / "random.safetensors").write_bytes(os.urandom(4096))
    files["random"] = (tmp / "random.safetensors", "not a safetensors file")
    good = write_kohya(tmp / "good.safetensors", make_modules("sd1", scope="attention", only="attn1_to_q"))
    raw = good.read_bytes()
    (tmp / "truncated.safetensors").write_bytes(raw[: len(raw) - 100])
    files["truncated"] = (tmp / "truncated.safetensors", "truncated")
    (tmp / "badjson.safetensors").write_bytes(raw[:8] + b"{" * 8 + raw[16:])
    files["corrupt header"] = (tmp / "badjson.safetensors", "header is not JSON")
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4, 3, 3)}, str(tmp / "ckpt.safetensors"))
    files["checkpoint"] = (tmp / "ckpt.safetensors", "model checkpoint")
    torch.save({"net": make_modules}, tmp / "pickle.ckpt")
    files["unsafe pickle"] = (tmp / "pickle.ckpt", "unsafe")
    (tmp / "notes.txt").write_text("hello")
    files["suffix"] = (tmp / "notes.txt", "unsupported file type '.txt'")
    m = make_modules("sd1", scope="attention", only="attn1_to_q")[:1]
    sd = kohya_state_dict(m)
    sd[f"{m[0].name}.lora_down.weight"] = torch.zeros(3, 320)
    save_file(sd, str(tmp / "misfit.safetensors"))
    files["shapes"] = (tmp / "misfit.safetensors", f"{m[0].name}: up [320, 2] and down [3, 320] do not fit")
    for label, value in (("nan", float("nan")), ("inf", float("inf"))):
        sd = kohya_state_dict(m)
        sd[f"{m[0].name}.lora_up.weight"][0, 0] = value
        save_file(sd, str(tmp / f"{label}.safetensors"))
        files[label] = (tmp / f"{label}.safetensors", "NaN or Inf")
    sd = kohya_state_dict(m)
    sd[f"{m[0].name}.lora_up.weight"] = torch.zeros(320, 0)
    sd[f"{m[0].name}.lora_down.weight"] = torch.zeros(0, 320)
    save_file(sd, str(tmp / "zero.safetensors"))
    files["zero-size"] = (tmp / "zero.safetensors", "zero-size tensor")
    return files


def test_every_bad_input_is_one_line_exit_2(tmp_path, capsys):
    files = corrupt_files(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for label, (path, reason) in files.items():
        code, out, err = run(capsys, "info", str(path))
        assert code == 2, label
        assert out == "", label
        lines = err.splitlines()
        assert len(lines) == 1, (label, err)
        assert lines[0].startswith(f"error: {path}: "), (label, err)
        assert reason in lines[0], (label, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_real_process_exit_codes_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    r = subprocess.run([sys.executable, "-m", "lib_loramerge", "info", str(bad)], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "lib_loramerge", "--debug", "info", str(bad)], capture_output=True,
                       text=True, env=env)
    assert r.returncode != 0 and "Traceback" in r.stderr and "LoraMergeError" in r.stderr


@pytest.mark.parametrize("argv", [["info"], ["nonsense"], ["info", "a", "b"]])
def test_usage_errors_are_one_line(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")


def test_a_real_process_delivers_all_of_its_output_before_it_skips_the_teardown(tmp_path):
    """``python -m lib_loramerge`` ends with os._exit (torch's teardown costs ~0.3 s): what it printed must
    still arrive whole through a pipe, and its exit status must be the job's."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONUNBUFFERED", None)
    path = write_kohya(tmp_path / "a.safetensors", make_modules("sdxl", rank=2))
    r = subprocess.run([sys.executable, "-m", "lib_loramerge", "info", str(path), "--json"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0 and len(r.stdout) > 1000  # a pipe is block-buffered: lost unless flushed
    assert json.loads(r.stdout)["modules"] == len(make_modules("sdxl", rank=2))
