"""Hostile and broken inputs: each class is refused at its root with one line, and nothing is left behind.

One test (or a few) per class of issue "Hardening against hostile and broken inputs": aliasing
headers, non-finite strengths and results, stray temp files, user errors that used to be internal
errors, pickle bombs, output permissions, what the standalone UI serves, inputs accepted without a
word, and the embedded demo job.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from synth import make_modules, write_kohya

from lib_loramerge.cli import main
from lib_loramerge.errors import LoraMergeError
from lib_loramerge.formats import atomic
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.formats.safetensors_io import read_header
from lib_loramerge.jobs import RECIPE_KEY
from lib_loramerge.synthetic import write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FEW = "down_blocks_1_attentions_0_transformer_blocks_0_attn1|layers_0_self_attn_q"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def raw_safetensors(path: Path, header: dict | bytes, data: bytes) -> Path:
    """A file with exactly this header (a dict, or raw JSON bytes) and data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def lora_pair(tmp_path: Path) -> tuple[Path, Path]:
    a = write_kohya(tmp_path / "a.safetensors", make_modules("sd1", rank=4, seed=1, only=FEW))
    b = write_kohya(tmp_path / "b.safetensors", make_modules("sd1", rank=2, seed=2, only=FEW))
    return a, b


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(atomic.TEMP_SUFFIX) or p.name.endswith(".tmp"))


# ---- 1. aliasing / amplification ------------------------------------------------------------------


def _entry(begin: int, end: int, shape=(4, 4)) -> dict:
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


@pytest.mark.parametrize("entries, data_size, words", [
    ({"m.lora_up.weight": _entry(0, 64), "m.lora_down.weight": _entry(0, 64)}, 64, "overlaps"),  # the same bytes
    ({"m.lora_up.weight": _entry(0, 64), "m.lora_down.weight": _entry(32, 96)}, 96, "overlaps"),
    ({"m.lora_up.weight": _entry(0, 64), "m.lora_down.weight": _entry(72, 136)}, 136, "belong to no tensor"),  # gap
    ({"m.lora_up.weight": _entry(0, 64), "m.lora_down.weight": _entry(64, 128)}, 200, "after the last tensor"),
])
def test_a_header_whose_entries_do_not_tile_the_data_is_refused(tmp_path, capsys, entries, data_size, words):
    path = raw_safetensors(tmp_path / "alias.safetensors", entries, bytes(data_size))
    code, _, err = run(capsys, "merge", "--models", path, "--out", tmp_path / "out.safetensors")
    line = one_error_line(err)
    assert code == 2 and str(path) in line and words in line
    assert not (tmp_path / "out.safetensors").exists()


def test_aliased_checkpoint_tensors_are_refused_before_a_bake(tmp_path, capsys):
    # a few-MB "checkpoint" whose every tensor points at the same bytes would bake into gigabytes
    big = {f"model.diffusion_model.input_blocks.{i}.1.proj_in.weight": _entry(0, 4096, (32, 32)) for i in range(50)}
    ckpt = raw_safetensors(tmp_path / "ckpt.safetensors", big, bytes(4096))
    a, _ = lora_pair(tmp_path)
    code, _, err = run(capsys, "bake", "--checkpoint", ckpt, "--models", a, "--out", tmp_path / "baked.safetensors")
    assert code == 2 and "overlaps" in one_error_line(err)
    assert list(tmp_path.glob("baked*")) == []


def test_a_file_with_more_modules_than_any_lora_is_refused_quickly(tmp_path, capsys):
    tensors = {}
    for i in range(25_000):  # tiny modules: 100k of them took 105 s and 1 GB before the limit
        tensors[f"lora_unet_x{i}.lora_up.weight"] = torch.zeros(1, 1)
        tensors[f"lora_unet_x{i}.lora_down.weight"] = torch.zeros(1, 1)
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path))
    started = time.perf_counter()
    code, _, err = run(capsys, "merge", "--models", path, "--out", tmp_path / "out.safetensors")
    assert code == 2 and "25000 modules" in one_error_line(err) and "limit is 20000" in err
    assert time.perf_counter() - started < 20  # generous: the point is "not minutes"


# ---- 2. non-finite strengths and results -------------------------------------------------------------


@pytest.mark.parametrize("flags, words", [
    (["--ratios", "nan"], "UNet strength must be a finite number"),
    (["--ratios", "inf"], "UNet strength must be a finite number"),
    (["--ratios", "1", "--te-ratios", "-inf"], "TE strength must be a finite number"),
    (["--lbws", "1,1,1,1,1,1,1,nan,1,1,1,1,1,1,1,1,1"], "block weight 'nan' must be a finite number"),
    (["--lbws", "1,1,1,1,1,1,1,inf,1,1,1,1,1,1,1,1,1"], "block weight 'inf' must be a finite number"),
])
def test_non_finite_strengths_are_refused_up_front(tmp_path, capsys, flags, words):
    a, b = lora_pair(tmp_path)
    code, _, err = run(capsys, "merge", "--models", a, *flags, "--out", tmp_path / "out.safetensors")
    assert code == 2 and words in one_error_line(err)
    assert not (tmp_path / "out.safetensors").exists()


def test_non_finite_prompt_strengths_are_refused(tmp_path, capsys):
    a, _ = lora_pair(tmp_path)
    for tag in ("<lora:a:nan>", "<lora:a:1:inf>", "<lora:a:1:lbw=1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,nan>"):
        code, _, err = run(capsys, "merge", "--prompt", tag, "--lora-dir", tmp_path, "--out", tmp_path / "o.safetensors")
        assert code == 2 and "finite number" in one_error_line(err), tag


@pytest.mark.parametrize("mode", ["svd", "concat"])
def test_a_huge_strength_that_overflows_fp16_is_refused_naming_the_module(tmp_path, capsys, mode):
    a, _ = lora_pair(tmp_path)
    code, _, err = run(capsys, "merge", "--models", a, "--ratios", "1e30", "--mode", mode,
                       "--out", tmp_path / "out.safetensors")
    line = one_error_line(err)
    assert code == 2 and "lora_" in line and "beyond the range of fp16" in line
    assert not (tmp_path / "out.safetensors").exists() and leftovers(tmp_path) == []


def test_strengths_that_overflow_float32_are_refused_not_an_internal_error(tmp_path, capsys):
    a, _ = lora_pair(tmp_path)
    for mode in ("svd", "concat"):
        code, _, err = run(capsys, "merge", "--models", a, "--ratios", "1e300", "--mode", mode, "--dtype", "fp32",
                           "--out", tmp_path / "out.safetensors")
        line = one_error_line(err)
        assert code == 2 and "internal" not in line and ("overflows float32" in line or "NaN or Inf" in line), line


def test_a_huge_alpha_gives_a_refusal_not_a_file_full_of_inf(tmp_path, capsys):
    mods = make_modules("sd1", rank=4, seed=1, only=FEW)
    for m in mods:
        m.alpha = 3e38
    path = write_kohya(tmp_path / "alpha.safetensors", mods)
    _, b = lora_pair(tmp_path)
    for inputs, mode in (([path], "svd"), ([path, b], "concat")):  # the scale goes into the factors
        code, _, err = run(capsys, "merge", "--models", *inputs, "--mode", mode, "--out", tmp_path / "out.safetensors")
        line = one_error_line(err)
        assert code == 2 and ("beyond the range of fp16" in line or "overflows float32" in line), line
        assert not (tmp_path / "out.safetensors").exists()


def test_a_bake_whose_result_overflows_is_refused(tmp_path, capsys):
    ckpt = write_random_checkpoint(tmp_path / "c.safetensors", "sd1", width_divisor=8, vae=False)
    lora = write_kohya(tmp_path / "l.safetensors", make_modules("sd1", rank=2, seed=3, only=FEW, width_divisor=8))
    code, _, err = run(capsys, "bake", "--checkpoint", ckpt, "--models", lora, "--ratios", "1e30",
                       "--out", tmp_path / "baked.safetensors")
    line = one_error_line(err)
    assert code == 2 and "model.diffusion_model." in line or "cond_stage_model." in line
    assert "beyond the range of fp16" in line
    assert not (tmp_path / "baked.safetensors").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("mode", ["svd", "concat"])
def test_a_nan_factor_in_an_input_names_its_file_and_module(tmp_path, capsys, mode):
    mods = make_modules("sd1", rank=4, seed=1, only="down_blocks_1_attentions_0_transformer_blocks_0_attn1")
    mods[1].down[0, 0] = float("nan")
    path = write_kohya(tmp_path / "nan.safetensors", mods)
    code, _, err = run(capsys, "merge", "--models", path, "--mode", mode, "--out", tmp_path / "o.safetensors")
    line = one_error_line(err)
    assert code == 2 and str(path) in line and f"{mods[1].name}: down factor holds NaN or Inf" in line


def test_ui_number_boxes_refuse_nan_and_text(tmp_path):
    from lib_loramerge.ui import StandaloneHost
    from lib_loramerge.ui.handlers import LoraRow, MergeRequest, merge

    lora_pair(tmp_path)
    host = StandaloneHost([tmp_path])
    for unet, te, rank in ((float("nan"), 1.0, 0), ("abc", 1.0, 0), (1.0, float("inf"), 0), (1.0, 1.0, "x"),
                           (1.0, 1.0, 2.5)):
        outcome = merge(host, MergeRequest(rows=[LoraRow("a.safetensors", unet, te)], output="o", rank=rank))
        assert not outcome.ok and outcome.message.startswith("error: ") and "internal" not in outcome.message
        assert "\n" not in outcome.message
    assert not (tmp_path / "o.safetensors").exists()


# ---- 3. stray temp files --------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_job_removes_temp_files_of_killed_jobs_and_nothing_else(tmp_path, capsys):
    a, b = lora_pair(tmp_path)
    host = atomic._host()
    stale = tmp_path / f".old.safetensors.{_dead_pid()}@{host}.0123abcd{atomic.TEMP_SUFFIX}"
    stale.write_bytes(b"x" * 4096)
    live = tmp_path / f".live.safetensors.{os.getpid()}@{host}.0123abcd{atomic.TEMP_SUFFIX}"  # this very process
    live.write_bytes(b"y")
    elsewhere = tmp_path / f".net.safetensors.{_dead_pid()}@another-host.0123abcd{atomic.TEMP_SUFFIX}"
    elsewhere.write_bytes(b"z")
    unrelated = tmp_path / ".notes.safetensors.tmp"
    unrelated.write_bytes(b"w")
    code, out, err = run(capsys, "merge", "--models", a, b, "--out", tmp_path / "m.safetensors")
    assert code == 0, err
    assert not stale.exists() and live.exists() and elsewhere.exists() and unrelated.exists()
    assert "removed 1 temp file" in out and "killed" in out


_SLOW_WRITE = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from lib_loramerge import cli
    from lib_loramerge.formats.safetensors_io import TensorSpec, write_safetensors
    cli._install_signal_handlers()
    folder = Path(sys.argv[1])
    def slow():
        (folder / "started").write_text("1")
        time.sleep(60)
        return torch.zeros(4)
    specs = [TensorSpec("a", torch.float32, (1024, 1024), torch.ones(1024, 1024)),
             TensorSpec("b", torch.float32, (4,), slow)]
    try:
        write_safetensors(folder / "out.safetensors", specs)
    except cli.Terminated:
        sys.exit(143)
    except KeyboardInterrupt:
        sys.exit(130)
""")


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_or_sigint_mid_write_leaves_no_temp_file(tmp_path, sig, code):
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITE, str(tmp_path)], cwd=ROOT)
    try:
        for _ in range(600):
            if (tmp_path / "started").exists():
                break
            time.sleep(0.05)
        assert leftovers(tmp_path), "the writer should have a temp file open by now"
        proc.send_signal(sig)
        assert proc.wait(30) == code
    finally:
        proc.kill()
    assert leftovers(tmp_path) == [] and not (tmp_path / "out.safetensors").exists()


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_after_kill_9_the_next_job_clears_the_temp_file(tmp_path, capsys):
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITE, str(tmp_path)], cwd=ROOT)
    for _ in range(600):
        if (tmp_path / "started").exists():
            break
        time.sleep(0.05)
    proc.kill()  # SIGKILL: nothing can clean up
    proc.wait(30)
    left = leftovers(tmp_path)
    assert len(left) == 1 and f".{proc.pid}@" in left[0]
    a, _ = lora_pair(tmp_path)
    code, out, _ = run(capsys, "merge", "--models", a, "--out", tmp_path / "out.safetensors")
    assert code == 0 and leftovers(tmp_path) == [] and "removed 1 temp file" in out


# ---- 4. user errors: exit 2 and one line ------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse names that are not UTF-8")
def test_a_file_name_that_is_not_utf8_works_and_is_shown_escaped(tmp_path, capsys):
    a, b = lora_pair(tmp_path)
    latin1 = Path(os.fsdecode(str(tmp_path).encode() + b"/caf\xe9.safetensors"))
    os.rename(a, latin1)
    code, out, err = run(capsys, "merge", "--models", latin1, b, "--out", tmp_path / "m.safetensors")
    assert code == 0, err
    assert "caf\\xe9" in out
    recipe = json.loads(read_header(tmp_path / "m.safetensors").metadata[RECIPE_KEY])
    assert recipe["inputs"][0]["file"] == "caf\\xe9.safetensors"
    code, _, err = run(capsys, "info", Path(os.fsdecode(str(tmp_path).encode() + b"/missing\xff.safetensors")))
    assert code == 2 and "missing\\xff.safetensors: no such file" in one_error_line(err)
    bad_out = Path(os.fsdecode(str(tmp_path).encode() + b"/out\xe9.safetensors"))
    code, _, err = run(capsys, "merge", "--models", b, "--out", bad_out)
    assert code == 2 and "not valid UTF-8" in one_error_line(err)


@pytest.mark.parametrize("header, words", [
    (b'{"__metadata__": {"k": "\\ud800"}}', "not valid Unicode"),  # lone surrogate in metadata
    (b'{"a\\udc80.lora_up.weight": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}', "not valid Unicode"),
    (b'{"a.lora_up.weight": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 0]}}', "not JSON"),
    (b'{"a.lora_up.weight": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}', "not JSON"),
    (b'{"a.lora_up.weight": {"dtype": "F32", "shape": [1.9, 1], "data_offsets": [0, 4]}}', "whole numbers"),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"a.lora_up.weight": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', "whole numbers"),
])
def test_hostile_headers_are_one_line_errors(tmp_path, capsys, header, words):
    path = raw_safetensors(tmp_path / "h.safetensors", header + b" " * (-len(header) % 8), b"")
    code, _, err = run(capsys, "info", path)
    line = one_error_line(err)
    assert code == 2 and str(path) in line and words in line


def test_devices_other_than_cpu_and_cuda_are_refused(tmp_path, capsys):
    a, _ = lora_pair(tmp_path)
    for device in ("meta", "mps", "xla", "cuda:x", "gpu"):
        code, _, err = run(capsys, "merge", "--models", a, "--device", device, "--out", tmp_path / "o.safetensors")
        assert code == 2 and f"unknown device '{device}'" in one_error_line(err) or "CUDA is not available" in err


def test_a_prompt_lookup_skips_a_broken_unrelated_file_and_says_so(tmp_path, capsys):
    mods = make_modules("sd1", rank=4, seed=1, only=FEW)
    write_kohya(tmp_path / "file_name.safetensors", mods, metadata={"ss_output_name": "alias_name"})
    raw_safetensors(tmp_path / "broken.safetensors", b'{"a": [[[]]]} ', b"")  # nonsense header
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 100)
    code, out, err = run(capsys, "merge", "--prompt", "<lora:alias_name:1>", "--lora-dir", tmp_path,
                         "--out", tmp_path / "o.safetensors")
    assert code == 0, err
    assert "skipped 2 unreadable files" in out
    code, _, err = run(capsys, "merge", "--prompt", "<lora:nobody:1>", "--lora-dir", tmp_path,
                       "--out", tmp_path / "o2.safetensors")
    assert code == 2 and "no LoRA named 'nobody'" in one_error_line(err) and "2 unreadable files skipped" in err


def test_a_pickle_refusal_is_exactly_one_line(tmp_path):
    code = textwrap.dedent("""
        import os, torch, sys
        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned",))
        torch.save({"x.lora_up.weight": torch.ones(2, 1), "e": Evil()}, sys.argv[1])
    """)
    path = tmp_path / "evil.pt"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    r = subprocess.run([sys.executable, "-W", "default", "-m", "lib_loramerge", "info", str(path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == "" and "pwned" not in r.stdout + r.stderr
    assert "needs arbitrary code" in one_error_line(r.stderr)


def test_debug_is_accepted_after_the_sub_command(tmp_path, capsys):
    a, _ = lora_pair(tmp_path)
    code, out, _ = run(capsys, "info", a, "--debug")
    assert code == 0 and "format:" in out
    with pytest.raises(LoraMergeError):  # --debug shows the traceback: the error is raised, not printed
        main(["merge", "--debug", "--models", str(a), "--ratios", "nan", "--out", str(tmp_path / "o.safetensors")])


def test_disk_full_names_the_output_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import errno

    a, _ = lora_pair(tmp_path)
    real_write = os.write
    calls = [0]

    def full(fd, data):
        calls[0] += 1
        if calls[0] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    out = tmp_path / "out.safetensors"
    code, _, err = run(capsys, "merge", "--models", a, "--out", out)
    line = one_error_line(err)
    assert code == 2 and f"{out}: cannot write the output (No space left on device)" in line
    assert atomic.TEMP_SUFFIX not in line and leftovers(tmp_path) == [] and not out.exists()


# ---- 5. pickles that would allocate before being refused -----------------------------------------------


def test_a_compressed_torch_zip_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    plain = tmp_path / "plain.pt"
    torch.save({"x.lora_up.weight": torch.zeros(64 * 1024 * 1024 // 4)}, plain)  # 64 MiB of zeros
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    plain.unlink()
    assert bomb.stat().st_size < 1 << 20

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load must not be reached")

    monkeypatch.setattr(torch, "load", no_load)
    code, _, err = run(capsys, "info", bomb)
    line = one_error_line(err)
    assert code == 2 and "declare" in line and "compressed" in line


def test_an_old_format_pickle_is_refused_before_loading(tmp_path, capsys):
    path = tmp_path / "old.pt"
    torch.save({"x.lora_up.weight": torch.zeros(2, 1)}, path, _use_new_zipfile_serialization=False)
    code, _, err = run(capsys, "info", path)
    assert code == 2 and "pre-zip" in one_error_line(err)


# ---- 6. output permissions --------------------------------------------------------------------------------


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_new_outputs_follow_the_umask_and_overwrites_keep_the_mode(tmp_path, capsys):
    a, b = lora_pair(tmp_path)
    old = os.umask(0o022)
    try:
        out = tmp_path / "m.safetensors"
        assert run(capsys, "merge", "--models", a, b, "--out", out)[0] == 0
        assert out.stat().st_mode & 0o777 == 0o644
        out.chmod(0o640)
        assert run(capsys, "merge", "--models", a, "--out", out, "--overwrite")[0] == 0
        assert out.stat().st_mode & 0o777 == 0o640
        os.umask(0o077)
        assert run(capsys, "merge", "--models", a, "--out", tmp_path / "n.safetensors")[0] == 0
        assert (tmp_path / "n.safetensors").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


# ---- 7. what the standalone UI serves -----------------------------------------------------------------------

_FILE_ROUTE = textwrap.dedent("""
    import os, socket, sys, urllib.error, urllib.request
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from lib_loramerge.ui import StandaloneHost
    from lib_loramerge.ui.server import serve
    loras, secret = Path(sys.argv[2]), Path(sys.argv[3])
    os.chdir(secret.parent)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    app = serve(StandaloneHost([loras]), port, block=False)
    for target in (loras / "a.safetensors", secret, Path(sys.argv[1]) / "README.md"):
        try:
            code = urllib.request.urlopen(f"http://127.0.0.1:{port}/file={target}").status
        except urllib.error.HTTPError as e:
            code = e.code
        print("CODE", code)
    app.close()
""")


@pytest.mark.parametrize("venv", [".venv", ".venv-gradio4"])
def test_the_standalone_ui_serves_none_of_the_users_files(tmp_path, venv):
    from uikit import need

    python = Path(sys.executable) if venv == ".venv" else ROOT / venv / "bin" / "python"
    need(python.exists(), f"{python} not found (bash .ci/setup creates it)")
    probe = subprocess.run([str(python), "-c", "import gradio"], capture_output=True)
    need(probe.returncode == 0, f"gradio is not installed for {python}")
    lora_pair(tmp_path)
    secret = tmp_path / "cwd" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("private")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    r = subprocess.run([str(python), "-c", _FILE_ROUTE, str(ROOT), str(tmp_path), str(secret)], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    codes = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("CODE ")]
    assert codes and all(c in (403, 404) for c in codes), codes


# ---- 8. accepted without a word, before ----------------------------------------------------------------------


def test_a_stored_hash_is_not_trusted_for_the_recipe(tmp_path, capsys):
    a, b = lora_pair(tmp_path)
    lie = "f" * 64
    tensors = dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(a)))
    save_file(tensors, str(a), metadata={"sshs_model_hash": lie})
    code, out, _ = run(capsys, "merge", "--models", a, b, "--out", tmp_path / "m.safetensors")
    assert code == 0 and "stored sshs_model_hash is not the hash of its data" in out
    recipe = json.loads(read_header(tmp_path / "m.safetensors").metadata[RECIPE_KEY])
    from lib_loramerge.formats.hashing import data_sha256

    assert recipe["inputs"][0]["hash"] == data_sha256(a) != lie


def test_an_unknown_lora_with_foreign_modules_does_not_join_an_sd1_merge(tmp_path, capsys):
    a, _ = lora_pair(tmp_path)
    sd3 = tmp_path / "sd3.safetensors"
    save_file({"lora_transformer_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.randn(96, 4),
               "lora_transformer_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.randn(4, 32)}, str(sd3))
    code, _, err = run(capsys, "merge", "--models", a, sd3, "--out", tmp_path / "m.safetensors")
    line = one_error_line(err)
    assert code == 2 and "sd3.safetensors" in line and "joint_blocks" in line and "SD1" in line


def test_an_integer_checkpoint_tensor_is_never_patched(tmp_path, capsys):
    mods = make_modules("sd1", rank=2, seed=1, only="down_blocks_1_attentions_0_proj_in", width_divisor=8)
    lora = write_kohya(tmp_path / "l.safetensors", mods)
    ckpt = write_random_checkpoint(tmp_path / "c.safetensors", "sd1", width_divisor=8, vae=False)
    tensors = dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(ckpt)))
    key = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    tensors[key] = torch.zeros(tensors[key].shape, dtype=torch.int32)
    save_file(tensors, str(ckpt))
    code, _, err = run(capsys, "bake", "--checkpoint", ckpt, "--models", lora, "--out", tmp_path / "b.safetensors")
    assert code == 2 and "not a floating-point tensor" in one_error_line(err)


@pytest.mark.parametrize("name", ["CON.safetensors", "nul.safetensors", "com1.safetensors", "LPT9.x.safetensors",
                                  "a\u202egnp.safetensors", "a\u200b.safetensors"])
def test_output_names_windows_reserves_or_that_hide_text_are_refused(tmp_path, capsys, name):
    a, _ = lora_pair(tmp_path)
    code, _, err = run(capsys, "merge", "--models", a, "--out", tmp_path / name)
    assert code == 2 and ("device name on Windows" in err or "control characters" in err)
    from lib_loramerge.ui import StandaloneHost
    from lib_loramerge.ui.handlers import LoraRow, MergeRequest, merge

    outcome = merge(StandaloneHost([tmp_path]), MergeRequest(rows=[LoraRow("a.safetensors")], output=name))
    assert not outcome.ok and ("device name on Windows" in outcome.message or "control characters" in outcome.message)


# ---- 9. the main job on a fresh machine -----------------------------------------------------------------------


def test_the_demo_merges_two_generated_sd1_loras(tmp_path):
    folder = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "lib_loramerge", "demo", "--out", str(folder)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "$ " in r.stdout and "--mode svd" in r.stdout and "--mode concat" in r.stdout
    svd, concat = read_lora(folder / "demo_merged_svd.safetensors"), read_lora(folder / "demo_merged_concat.safetensors")
    assert svd.arch == concat.arch == "sd1" and svd.ranks() == [16] and concat.ranks() == [24]
    first = read_lora(folder / "demo_style.safetensors")
    assert len(first.modules) == len(svd.modules) == 264  # every attention module of SD1's UNet and CLIP
    again = subprocess.run([sys.executable, "-m", "lib_loramerge", "demo", "--out", str(folder)], capture_output=True,
                           text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stderr  # a rerun replaces its own files
    (folder / "demo_merged_svd.safetensors").write_bytes(b"mine")
    third = subprocess.run([sys.executable, "-m", "lib_loramerge", "demo", "--out", str(folder)], capture_output=True,
                           text=True, cwd=ROOT, timeout=300)
    assert third.returncode == 2 and "not written by the demo" in third.stderr  # a user's file is never replaced


def test_the_readme_starts_with_the_demo_and_tests_as_ci_runs_them():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Standalone: two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert commands[0].startswith("bash .ci/setup && .venv/bin/python -m lib_loramerge demo")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci

