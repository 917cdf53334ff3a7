"""The embedded default job: two generated SD1 LoRAs, merged (svd and concat), for a machine with no LoRAs yet.

The two inputs have every attention-layer module of a real SD1 kohya LoRA (UNet and text encoder),
with the real names and shapes, random factors from fixed seeds: the same bytes on every machine.
Each step runs through the command line exactly as a user would type it, and is printed first.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .errors import LoraMergeError, display_path
from .formats.metadata import RECIPE_KEY
from .formats.safetensors_io import read_header

DEMO_KEY = "lora_merger_demo"  # marks files the demo wrote, so a rerun may replace them (and nothing else)
INPUTS = (("demo_style.safetensors", 1, 8), ("demo_subject.safetensors", 2, 16))  # name, seed, rank
OUTPUTS = ("demo_merged_svd.safetensors", "demo_merged_concat.safetensors")


def _is_demo_file(path: Path) -> bool:
    """An input the demo wrote (it carries DEMO_KEY), or a merge whose recipe names exactly the demo's inputs."""
    try:
        meta = read_header(path).metadata
        if DEMO_KEY in meta:
            return True
        inputs = json.loads(meta.get(RECIPE_KEY, "{}")).get("inputs", [])
        return sorted(i.get("file") for i in inputs) == sorted(n for n, _, _ in INPUTS)
    except (LoraMergeError, ValueError, AttributeError, TypeError):
        return False


def prepare_folder(folder: Path) -> None:
    """Make ``folder``; refuse when a file the demo would write exists there and is not the demo's."""
    if folder.exists() and not folder.is_dir():
        raise LoraMergeError("demo folder is a file, not a folder", folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [n for n, _, _ in INPUTS] + list(OUTPUTS):
        path = folder / name
        if path.exists() and not _is_demo_file(path):
            raise LoraMergeError("exists and was not written by the demo; not replaced (choose another --out)", path)


def write_inputs(folder: Path) -> list[Path]:
    """The two demo LoRAs: SD1 kohya layout (attention layers of UNet and text encoder), fp16, fixed seeds."""
    from .formats.writer import save_lora
    from .synthetic import random_modules

    paths = []
    for name, seed, rank in INPUTS:
        modules = random_modules("sd1", scope="attention", rank=rank, alpha=rank / 2, seed=seed, std=0.05)
        path = folder / name
        save_lora(modules, path, dtype=torch.float16, arch="sd1", metadata={DEMO_KEY: "1"}, overwrite=True)
        paths.append(path)
    return paths


def commands(folder: Path, python: str = "python") -> list[list[str]]:
    """The command lines the demo runs (after writing its inputs), as a user would type them."""
    a, b = (str(folder / n) for n, _, _ in INPUTS)
    svd, concat = (str(folder / n) for n in OUTPUTS)
    cli = [python, "-m", "lib_loramerge"]
    return [
        [*cli, "merge", "--models", a, b, "--ratios", "1", "0.5", "--mode", "svd", "--rank", "16",
         "--out", svd, "--overwrite"],
        [*cli, "merge", "--models", a, b, "--ratios", "1", "0.5", "--mode", "concat", "--out", concat, "--overwrite"],
        [*cli, "info", svd],
    ]


def run(folder: Path, main: Callable[[Sequence[str]], int], echo: Callable[[str], None] = print) -> int:
    """Write the inputs, then run each command through ``main`` (the CLI), printing it first."""
    folder = folder.resolve()
    prepare_folder(folder)
    echo(f"# demo: two generated SD1 LoRAs (real layer names and shapes, fixed seeds) in {display_path(folder)}")
    for path in write_inputs(folder):
        echo(f"wrote {display_path(path)}")
    for argv in commands(folder, python=Path(sys.executable).name):
        echo("")
        echo("$ " + shlex.join(argv))
        code = main(argv[3:])
        if code:
            return code
    echo("")
    echo(f"# done: {OUTPUTS[0]} is the best rank-16 approximation of 1·style + 0.5·subject, {OUTPUTS[1]} the exact sum "
         f"(rank 24); open the tab on this folder with: python -m lib_loramerge ui --demo --out {shlex.quote(str(folder))}")
    return 0
