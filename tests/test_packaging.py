"""The extension layout works as A1111 loads it, and the code stays Python 3.10 compatible."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_scripts_make_the_library_importable_after_load(tmp_path):
    # A1111 imports scripts/*.py with the extension root on sys.path only during the load;
    # later a handler imports a submodule lazily. Simulate both in a clean interpreter.
    code = textwrap.dedent(f"""
        import importlib.util, sys
        root = {str(ROOT)!r}
        sys.path = [p for p in sys.path if p not in ("", root) and "lib_loramerge" not in p]
        sys.path.insert(0, root + "/tests")
        import pathlib, fakewebui  # a stand-in of the WebUI's modules, as the scripts import them
        fakewebui.FakeWebUI(pathlib.Path({str(tmp_path)!r})).install()
        sys.path.remove(root + "/tests")
        sys.path.insert(0, root)
        spec = importlib.util.spec_from_file_location("lora_merger_script", root + "/scripts/lora_merger.py")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        sys.path.remove(root)
        import lib_loramerge.formats.reader  # lazily, after the load
        print(lib_loramerge.formats.reader.__file__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(ROOT))


def python310():
    candidates = [shutil.which("python3.10"), *sorted(map(str, Path.home().glob(".pyenv/versions/3.10*/bin/python3.10")))]
    for exe in filter(None, candidates):
        if subprocess.run([exe, "-c", "pass"], capture_output=True).returncode == 0:
            return exe
    return None


@pytest.mark.skipif(python310() is None, reason="no working python3.10 on this machine")
def test_sources_compile_under_python_3_10():
    files = [str(p) for d in ("lib_loramerge", "scripts", "tests", "bench") for p in (ROOT / d).rglob("*.py")]
    files.append(str(ROOT / "install.py"))
    r = subprocess.run([python310(), "-c", "import sys\n"
                        "for f in sys.argv[1:]: compile(open(f, encoding='utf-8').read(), f, 'exec')", *files],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff not installed")
def test_ruff_clean_for_python_3_10():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    r = subprocess.run([ruff, "check", "--target-version", "py310", str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
