"""Whole jobs shared by the CLI and the UI: read inputs, merge, write the result with a recipe."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import LoraMergeError
from .formats.reader import read_lora
from .formats.safetensors_io import check_writable_target, file_data_sha256
from .formats.writer import save_lora
from .info import short_dtype
from .model import LoraModel
from .ops.merge import MergeInput, MergeOptions, MergeReport, merge_loras

RECIPE_KEY = "lora_merger_recipe"
Progress = Callable[[int, int, str], None]


def lora_hash(lora: LoraModel) -> str:
    """The hash A1111 shows for a LoRA: its ``sshs_model_hash`` if stored, else sha256 of its tensor data."""
    stored = lora.metadata.get("sshs_model_hash")
    if stored:
        return stored
    if lora.path is None or not lora.path.is_file():  # built in memory
        return ""
    if lora.path.suffix.lower() == ".safetensors":
        return file_data_sha256(lora.path)
    return hashlib.sha256(lora.path.read_bytes()).hexdigest()


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a bad output path before any work is done."""
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise LoraMergeError("output must be a .safetensors file", out)
    check_writable_target(out, overwrite)
    return out


@dataclass
class MergeJob:
    path: Path
    report: MergeReport
    metadata: dict[str, str]
    arch: str


def merge_recipe(inputs: Sequence[MergeInput], options: MergeOptions, arch: str) -> dict:
    return {
        "tool": "sd-webui-lora-merger", "version": __version__, "arch": arch,
        "mode": options.mode, "rank": options.rank, "threshold": options.threshold, "clamp": options.clamp,
        "dtype": short_dtype(options.dtype),
        "inputs": [{"file": i.lora.path.name if i.lora.path else i.lora.name, "hash": lora_hash(i.lora),
                    "unet": i.unet, "te": i.te_strength, **i.recipe} for i in inputs],
    }


def merge_to_file(inputs: Sequence[MergeInput], options: MergeOptions, out: str | os.PathLike, *,
                  overwrite: bool = False, progress: Progress | None = None) -> MergeJob:
    """Merge already-read inputs and write the result atomically (nothing is written on failure)."""
    out = check_output(out, overwrite)
    result = merge_loras(inputs, options, progress)
    recipe = merge_recipe(inputs, options, result.arch)
    meta = {RECIPE_KEY: json.dumps(recipe, ensure_ascii=False, sort_keys=True)}
    saved = save_lora(result.modules, out, dtype=options.dtype, arch=result.arch, metadata=meta, overwrite=overwrite)
    return MergeJob(path=saved.path, report=result.report, metadata=saved.metadata, arch=result.arch)


def read_inputs(paths: Sequence[str | os.PathLike]) -> list[LoraModel]:
    """Read every input's layout first (factors lazily), so a bad file fails the job before any merging."""
    if not paths:
        raise LoraMergeError("no input LoRAs given")
    return [read_lora(p, lazy=True) for p in paths]
