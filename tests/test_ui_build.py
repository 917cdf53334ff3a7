"""The tab builds under gradio 3.41.2 (A1111 1.10, in .venv) and 4.40 (Forge, in .venv-gradio4)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from gradio_build import check_build
from uikit import in_ci, need

ROOT = Path(__file__).resolve().parents[1]
GRADIO4_PYTHON = ROOT / ".venv-gradio4" / "bin" / "python"


def test_tab_builds_under_gradio_3_with_the_standalone_host(tmp_path):
    try:
        import gradio
    except ImportError:
        gradio = None
    need(gradio is not None, "gradio is not installed in this environment")
    version = check_build(tmp_path)
    if in_ci():
        assert version == "3.41.2"  # what A1111 1.10 ships; .ci/requirements.txt pins it


def test_tab_builds_under_gradio_4_in_its_own_venv():
    need(GRADIO4_PYTHON.exists(), f"{GRADIO4_PYTHON} not found (bash .ci/setup creates it)")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([str(GRADIO4_PYTHON), str(ROOT / "tests" / "gradio_build.py")], capture_output=True,
                       text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "ok gradio 4.40.0"


def test_the_standalone_ui_command_refuses_missing_folders(tmp_path, capsys):
    from lib_loramerge.cli import main

    assert main(["ui", "--lora-dir", str(tmp_path / "nope")]) == 2
    assert f"error: {tmp_path / 'nope'}: folder not found" in capsys.readouterr().err
