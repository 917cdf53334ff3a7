"""The extract job shared by the CLI and the UI: two checkpoints in, a LoRA with a recipe out."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .bake.extract import ExtractOptions, ExtractReport, check_pair, extract_lora
from .errors import LoraMergeError, display_path
from .formats.hashing import BackgroundHashes
from .formats.metadata import RECIPE_KEY, RECIPE_VERSION, spec_facts
from .formats.tensorfile import check_input_path
from .formats.writer import save_lora
from .info import short_dtype
from .jobs import Progress, start_output


@dataclass
class ExtractJob:
    path: Path
    report: ExtractReport
    metadata: dict[str, str]
    arch: str


def extract_recipe(base: Path, tuned: Path, hashes: Sequence[str], options: ExtractOptions, arch: str) -> dict:
    return {
        "tool": "sd-webui-lora-merger", "version": __version__, "recipe_version": RECIPE_VERSION, "type": "extract",
        "arch": arch,
        "base": {"file": display_path(base.name), "sha256": hashes[0]},
        "tuned": {"file": display_path(tuned.name), "sha256": hashes[1]},
        "rank": options.rank, "conv_rank": options.conv_rank, "threshold": options.threshold,
        "sv_ratio": options.sv_ratio, "min_diff": options.min_diff, "text_encoder": options.text_encoder,
        "dtype": short_dtype(options.dtype),
    }


def extract_to_file(base: str | os.PathLike, tuned: str | os.PathLike, out: str | os.PathLike,
                    options: ExtractOptions, *, overwrite: bool = False, progress: Progress | None = None,
                    notes: Sequence[str] = (), date: str | None = None) -> ExtractJob:
    """Extract tuned − base into a LoRA at ``out``, written atomically with both checkpoints' sha256 in its recipe."""
    notes = list(notes)
    options.validate()
    base, tuned = check_input_path(base), check_input_path(tuned)
    out = start_output(out, overwrite, notes)
    if out.resolve() in (base.resolve(), tuned.resolve()):
        raise LoraMergeError("the output would replace one of the checkpoints being read; choose another name", out)
    if base.resolve() == tuned.resolve():
        raise LoraMergeError("base and tuned are the same file: their difference is zero", tuned)
    check_pair(base, tuned, options)  # a mismatched pair fails here, before gigabytes are hashed
    hashes = BackgroundHashes([base, tuned], whole=True)  # A1111's checkpoint hash, beside the extraction
    result = extract_lora(base, tuned, options, progress)
    report = result.report
    if not result.modules:
        raise LoraMergeError(f"nothing to extract: no layer differs from the base {base.name} by more than "
                             f"--min-diff {options.min_diff:g}", tuned)
    started = time.perf_counter()
    recipe = extract_recipe(base, tuned, [hashes.result(0), hashes.result(1)], options, result.arch)
    meta = {RECIPE_KEY: json.dumps(recipe, ensure_ascii=False, sort_keys=True),
            "ss_sd_model_name": display_path(base.name)}
    if options.conv_rank is not None:  # kohya's LoCon: conv_dim in the network args
        meta["ss_network_args"] = json.dumps({"conv_dim": str(options.conv_rank), "conv_alpha": str(options.conv_rank)})
    saved = save_lora(result.modules, out, dtype=options.dtype, arch=result.arch, metadata=meta, overwrite=overwrite,
                      facts=spec_facts([], result.arch), date=date)
    report.notes[:0] = notes
    report.timings.update(extract=report.seconds, write=time.perf_counter() - started)
    return ExtractJob(path=saved.path, report=report, metadata=saved.metadata, arch=result.arch)
