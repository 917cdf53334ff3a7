"""Whole jobs shared by the CLI and the UI: read inputs, merge, write the result with a recipe."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .bake.stream import BakeReport, bake
from .blocks.presets import PresetBook, load_presets
from .blocks.prompt import find_lora, parse_prompt
from .blocks.weights import parse_block_weights
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
                  overwrite: bool = False, progress: Progress | None = None,
                  notes: Sequence[str] = ()) -> MergeJob:
    """Merge already-read inputs and write the result atomically (nothing is written on failure)."""
    out = check_output(out, overwrite)
    result = merge_loras(inputs, options, progress)
    result.report.notes[:0] = list(notes)
    recipe = merge_recipe(inputs, options, result.arch)
    meta = {RECIPE_KEY: json.dumps(recipe, ensure_ascii=False, sort_keys=True)}
    saved = save_lora(result.modules, out, dtype=options.dtype, arch=result.arch, metadata=meta, overwrite=overwrite)
    return MergeJob(path=saved.path, report=result.report, metadata=saved.metadata, arch=result.arch)


@dataclass
class LoraSpec:
    """One input as a user describes it: a file, strengths, optional block weights (LBW spec, x value)."""

    path: Path
    unet: float = 1.0
    te: float | None = None
    lbw: str | None = None
    x: float = 1.0


def specs_from_prompt(prompt: str, lora_dirs: Sequence[str | os.PathLike]) -> list[LoraSpec]:
    """``<lora:NAME:TE[:UNET][:lbw=…][:x=…]>`` tags → specs, names resolved as A1111 resolves them."""
    if not lora_dirs:
        raise LoraMergeError("a prompt needs a LoRA folder to find the files in (--lora-dir)")
    return [LoraSpec(find_lora(t.name, list(lora_dirs)), unet=t.unet, te=t.te, lbw=t.lbw, x=t.x)
            for t in parse_prompt(prompt)]


def prepare_inputs(specs: Sequence[LoraSpec], presets: PresetBook | None = None,
                   seed: int | None = None) -> tuple[list[MergeInput], list[str]]:
    """Read every input (lazily) and resolve its block weights; returns the inputs and notes to report.

    Random block-weight tokens of input i use seed ``seed + i`` (a fresh seed when None); the
    values actually used go into each input's recipe.
    """
    loras = read_inputs([s.path for s in specs])
    if presets is None and any(s.lbw for s in specs):
        presets = load_presets()
    notes = presets.warnings() if presets else []
    inputs = []
    for i, (spec, lora) in enumerate(zip(specs, loras, strict=True)):
        weights = None
        if spec.lbw:
            try:
                weights = parse_block_weights(spec.lbw, lora.arch, presets, x=spec.x,
                                              seed=None if seed is None else seed + i)
            except LoraMergeError as e:
                raise e.with_path(lora.path) from None
            shown = ",".join(f"{v:g}" for v in weights.values)
            seeded = f" (seed {weights.seed})" if weights.seed is not None else ""
            notes.append(f"{lora.name}: block weights {spec.lbw} = {shown}{seeded}")
        inputs.append(MergeInput(lora, unet=spec.unet, te=spec.te, block_ratio=weights.ratio if weights else None,
                                 recipe=weights.recipe() if weights else {}))
    return inputs, notes


@dataclass
class BakeJob:
    path: Path
    report: BakeReport
    metadata: dict[str, str]


def bake_to_file(checkpoint: str | os.PathLike, inputs: Sequence[MergeInput], out: str | os.PathLike, *,
                 dtype: torch.dtype | None = torch.float16, device: str = "cpu", overwrite: bool = False,
                 allow_unmatched: bool = False, progress: Progress | None = None,
                 notes: Sequence[str] = ()) -> BakeJob:
    """Bake the inputs into ``checkpoint`` and write ``out`` atomically, with a recipe in its metadata."""
    out = check_output(out, overwrite)
    ckpt = Path(checkpoint)

    def recipe(checkpoint_sha256: str) -> dict[str, str]:
        data = {
            "tool": "sd-webui-lora-merger", "version": __version__, "type": "bake",
            "checkpoint": {"file": ckpt.name, "sha256": checkpoint_sha256},
            "dtype": "keep" if dtype is None else short_dtype(dtype),
            "inputs": [{"file": i.lora.path.name if i.lora.path else i.lora.name, "hash": lora_hash(i.lora),
                        "unet": i.unet, "te": i.te_strength, **i.recipe} for i in inputs],
        }
        return {RECIPE_KEY: json.dumps(data, ensure_ascii=False, sort_keys=True)}

    report, written = bake(ckpt, inputs, out, dtype=dtype, device=device, overwrite=overwrite,
                           allow_unmatched=allow_unmatched, progress=progress,
                           metadata=recipe("0" * 64), finalize=recipe)
    report.notes[:0] = list(notes)
    return BakeJob(path=out, report=report, metadata=written)


def read_inputs(paths: Sequence[str | os.PathLike]) -> list[LoraModel]:
    """Read every input's layout first (factors lazily), so a bad file fails the job before any merging."""
    if not paths:
        raise LoraMergeError("no input LoRAs given")
    return [read_lora(p, lazy=True) for p in paths]
