"""Whole jobs shared by the CLI and the UI: read inputs, merge, write the result with a recipe."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .bake.stream import BakeReport, bake
from .blocks.presets import PresetBook, load_presets
from .blocks.prompt import find_lora, parse_prompt
from .blocks.weights import parse_block_weights
from .checks import check_output_name
from .errors import LoraMergeError, display_path
from .formats.atomic import remove_stale_temp_files
from .formats.hashing import BackgroundHashes
from .formats.reader import read_lora
from .formats.safetensors_io import check_writable_target
from .formats.writer import save_lora
from .info import short_dtype
from .model import LoraModel
from .ops.merge import MergeInput, MergeOptions, MergeReport, merge_loras

RECIPE_KEY = "lora_merger_recipe"
Progress = Callable[[int, int, str], None]


def input_hashes(loras: Sequence[LoraModel]) -> BackgroundHashes:
    """Start hashing the inputs' files (the hash A1111 shows) beside the job; never trusts a stored hash."""
    return BackgroundHashes([lora.path for lora in loras])


def input_entries(inputs: Sequence[MergeInput], hashes: BackgroundHashes, placeholder: bool = False
                  ) -> tuple[list[dict], list[str]]:
    """The recipe's description of each input (file, hash, strengths, block weights), and notes to report.

    A stored ``sshs_model_hash`` that is not the hash of the data means the file was changed
    after it was saved: said in a note, and the computed hash is the one recorded.
    ``placeholder``: zeros of the hashes' length, without waiting for them (a header's first draft).
    """
    entries, notes = [], []
    for i, inp in enumerate(inputs):
        if placeholder:
            path = inp.lora.path
            entries.append({"file": display_path(path.name) if path else inp.lora.name,
                            "hash": "0" * 64 if path is not None and path.is_file() else "",
                            "unet": inp.unet, "te": inp.te_strength, **inp.recipe})
            continue
        digest = hashes.result(i)
        stored = inp.lora.metadata.get("sshs_model_hash")
        if stored and digest and stored != digest:
            notes.append(f"{inp.lora.name}: its stored sshs_model_hash is not the hash of its data (the file was changed "
                         "after saving); the recipe records the real one")
        name = display_path(inp.lora.path.name) if inp.lora.path else inp.lora.name
        entries.append({"file": name, "hash": digest, "unet": inp.unet, "te": inp.te_strength, **inp.recipe})
    return entries, notes


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a bad output path before any work is done."""
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise LoraMergeError("output must be a .safetensors file", out)
    check_output_name(out.name)
    check_writable_target(out, overwrite)
    return out


def start_output(out: str | os.PathLike, overwrite: bool, notes: list[str]) -> Path:
    """At a job's start: check the output, and clear the temp files killed jobs left beside it (noted)."""
    out = check_output(out, overwrite)
    removed = remove_stale_temp_files(out.parent)
    if removed:
        size = sum(n for _, n in removed) / 2**20
        notes.append(f"removed {len(removed)} temp file{'s' if len(removed) > 1 else ''} ({size:.0f} MiB) left in "
                     f"{display_path(out.parent)} by jobs that were killed")
    return out


@dataclass
class MergeJob:
    path: Path
    report: MergeReport
    metadata: dict[str, str]
    arch: str


def merge_recipe(inputs: Sequence[MergeInput], options: MergeOptions, arch: str, entries: list[dict]) -> dict:
    return {
        "tool": "sd-webui-lora-merger", "version": __version__, "arch": arch,
        "mode": options.mode, "rank": options.rank, "threshold": options.threshold, "clamp": options.clamp,
        "dtype": short_dtype(options.dtype), "inputs": entries,
    }


def merge_to_file(inputs: Sequence[MergeInput], options: MergeOptions, out: str | os.PathLike, *,
                  overwrite: bool = False, progress: Progress | None = None,
                  notes: Sequence[str] = ()) -> MergeJob:
    """Merge already-read inputs and write the result atomically (nothing is written on failure)."""
    notes = list(notes)
    out = start_output(out, overwrite, notes)
    hashes = input_hashes([i.lora for i in inputs])
    result = merge_loras(inputs, options, progress)
    started = time.perf_counter()
    entries, hash_notes = input_entries(inputs, hashes)
    result.report.notes[:0] = notes + hash_notes
    recipe = merge_recipe(inputs, options, result.arch, entries)
    meta = {RECIPE_KEY: json.dumps(recipe, ensure_ascii=False, sort_keys=True)}
    saved = save_lora(result.modules, out, dtype=options.dtype, arch=result.arch, metadata=meta, overwrite=overwrite)
    result.report.timings.update(math=result.report.seconds, write=time.perf_counter() - started)
    return MergeJob(path=saved.path, report=result.report, metadata=saved.metadata, arch=result.arch)


@dataclass
class LoraSpec:
    """One input as a user describes it: a file, strengths, optional block weights (LBW spec, x value)."""

    path: Path
    unet: float = 1.0
    te: float | None = None
    lbw: str | None = None
    x: float = 1.0


def specs_from_prompt(prompt: str, lora_dirs: Sequence[str | os.PathLike],
                      notes: list[str] | None = None) -> list[LoraSpec]:
    """``<lora:NAME:TE[:UNET][:lbw=…][:x=…]>`` tags → specs, names resolved as A1111 resolves them.

    Unreadable files skipped during the lookup are listed in ``notes``.
    """
    if not lora_dirs:
        raise LoraMergeError("a prompt needs a LoRA folder to find the files in (--lora-dir)")
    return [LoraSpec(find_lora(t.name, list(lora_dirs), notes), unet=t.unet, te=t.te, lbw=t.lbw, x=t.x)
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
                 notes: Sequence[str] = (), semantics: str = "a1111", source: str | None = None) -> BakeJob:
    """Bake the inputs into ``checkpoint`` and write ``out`` atomically, with a recipe in its metadata.

    ``semantics``: the WebUI whose DoRA rule the bake follows (recorded in the recipe); ``source``:
    where the recipe came from when not the command line (e.g. ``"live bake"``), recorded too.
    """
    notes = list(notes)
    out = start_output(out, overwrite, notes)
    ckpt = Path(checkpoint)
    hashes = input_hashes([i.lora for i in inputs])
    hash_notes: list[str] = []

    def recipe(checkpoint_sha256: str, final: bool = True) -> dict[str, str]:
        entries, found = input_entries(inputs, hashes, placeholder=not final)
        hash_notes[:] = found
        data = {
            "tool": "sd-webui-lora-merger", "version": __version__, "type": "bake",
            "checkpoint": {"file": display_path(ckpt.name), "sha256": checkpoint_sha256},
            "dtype": "keep" if dtype is None else short_dtype(dtype), "inputs": entries, "semantics": semantics,
            **({"source": source} if source else {}),
        }
        return {RECIPE_KEY: json.dumps(data, ensure_ascii=False, sort_keys=True)}

    report, written = bake(ckpt, inputs, out, dtype=dtype, device=device, overwrite=overwrite,
                           allow_unmatched=allow_unmatched, progress=progress,
                           metadata=recipe("0" * 64, final=False), finalize=recipe, semantics=semantics)
    report.notes[:0] = notes + hash_notes
    return BakeJob(path=out, report=report, metadata=written)


def read_inputs(paths: Sequence[str | os.PathLike]) -> list[LoraModel]:
    """Read every input's layout first (factors lazily), so a bad file fails the job before any merging."""
    if not paths:
        raise LoraMergeError("no input LoRAs given")
    return [read_lora(p, lazy=True) for p in paths]
