"""The resize job shared by the CLI and the UI: one LoRA in, the same LoRA at other ranks out.

The output keeps the source's metadata (training facts, tags, modelspec; ``--metadata`` as for
a merge), with what the resize changes written anew: ``ss_network_dim``/``ss_network_alpha`` (and
``ss_network_module`` when a LyCORIS file becomes a plain LoRA), ``ss_output_name``/``modelspec.title``
(the new file's name, so the WebUI can tell both apart), the hashes (over the new bytes) and the recipe.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .errors import LoraMergeError
from .formats.metadata import RECIPE_KEY, RECIPE_VERSION, OutputMetadata, check_mode, for_output
from .formats.reader import read_lora
from .formats.tensorfile import check_input_path
from .formats.writer import DTYPES, lora_file_size, save_lora
from .info import short_dtype
from .jobs import MergeVerifier, Progress, input_entries, input_hashes, start_output
from .model import LoraModel, LoraModule
from .ops.merge import MergeInput, MergeOptions, MergeReport, MergeResult
from .ops.policies import RankPolicy
from .ops.resize import resize_lora, resize_to_ranks, spectra, threshold_for_size


@dataclass
class ResizeJob:
    path: Path
    report: MergeReport  # the one-input svd merge's report: energy kept per module, ranks by kind
    metadata: dict[str, str]
    arch: str
    policy: str  # what the ranks follow, in words
    ranks: dict[str, int] = field(default_factory=dict)  # module → rank written
    source_ranks: dict[str, int] = field(default_factory=dict)  # module → its rank in the source (factor rank)
    threshold: float | None = None  # --size-mib: the energy threshold chosen
    size_target: int | None = None  # --size-mib, in bytes
    size: int = 0  # bytes written

    def as_dict(self) -> dict:
        return {"out": str(self.path), "arch": self.arch, "policy": self.policy, "threshold": self.threshold,
                "size_target_bytes": self.size_target, "size_bytes": self.size,
                "modules": {n: {"rank": r, "source_rank": self.source_ranks.get(n),
                                "retained": self.report.energy.get(n)} for n, r in self.ranks.items()},
                **self.report.as_dict()}


def source_dtype(lora: LoraModel) -> torch.dtype:
    """The dtype most of the source's modules have, when it is one a LoRA is written in (else fp16)."""
    counts = lora.dtypes()
    common = max(counts, key=counts.get) if counts else "float16"
    return getattr(torch, common) if getattr(torch, common, None) in DTYPES.values() else torch.float16


def kept_metadata(lora: LoraModel, arch: str, mode: str) -> tuple[dict[str, str], OutputMetadata, list[str]]:
    """The source's metadata the output keeps (by ``mode``; never what describes the source's own bytes),
    the output's modelspec facts, and notes on what was dropped."""
    described = for_output([(lora.metadata, lora.name)], arch, mode)
    notes = []
    if "ss_network_args" in lora.metadata and mode in ("merge", "first"):
        notes.append(f"the source's ss_network_args ({lora.metadata['ss_network_args'][:60]}) dropped: they "
                     "described its ranks and algorithm; the output is a plain LoRA/LoCon at new ranks")
    return dict(described.inherited), described, notes


def _recipe(lora: LoraModel, entries: list[dict], policy: str, dtype: torch.dtype, arch: str,
            threshold: float | None, size_mib: float | None, mode: str, rule: RankPolicy | None,
            cap: int | None) -> str:
    """The resize's recipe: ``policy`` in words, ``rank_policy`` (kind, value, cap) or ``size_mib`` and
    ``max_rank`` to replay it."""
    data = {"tool": "sd-webui-lora-merger", "version": __version__, "recipe_version": RECIPE_VERSION,
            "type": "resize", "arch": arch, "policy": policy, "threshold": threshold, "size_mib": size_mib,
            "rank_policy": {"kind": rule.kind, "value": rule.value, "cap": rule.cap} if rule else None,
            "max_rank": cap, "dtype": short_dtype(dtype), "metadata": mode, "inputs": entries}
    previous = lora.metadata.get(RECIPE_KEY)
    if previous:
        try:
            data["source_recipe"] = json.loads(previous)
        except ValueError:
            data["source_recipe"] = previous
    return json.dumps(data, ensure_ascii=False, sort_keys=True)


def _shapes_only(lora: LoraModel, ranks: dict[str, int]) -> list[LoraModule]:
    """Stand-ins with the output's shapes (no values): what :func:`lora_file_size` needs."""
    modules = []
    for name, k in ranks.items():
        out, inp, *kernel = lora.modules[name].weight_shape
        conv = bool(kernel)
        modules.append(LoraModule(name, torch.empty(out, k, *([1, 1] if conv else []), device="meta"),
                                  torch.empty(k, inp, *kernel, device="meta"), alpha=float(k)))
    return modules


def resize_to_file(source: str | os.PathLike, out: str | os.PathLike, policy: RankPolicy | None = None, *,
                   size_mib: float | None = None, cap: int | None = None, device: str = "cpu",
                   dtype: torch.dtype | None = None, overwrite: bool = False, progress: Progress | None = None,
                   notes: Sequence[str] = (), metadata_mode: str = "merge", verify: bool = False,
                   date: str | None = None) -> ResizeJob:
    """Resize ``source`` by ``policy`` — or, with ``size_mib``, by the one energy threshold whose file fits
    (``cap``: at most that rank per module) — and write ``out`` atomically. ``dtype``: default, the source's.
    ``verify``: compare every written module with the source's (within √(1 − kept energy)) before the
    file takes its name; ``date``: modelspec.date (a replay passes the original's)."""
    notes = list(notes)
    check_mode(metadata_mode)
    if (policy is None) == (size_mib is None):
        raise LoraMergeError("give a rank policy or a size target (--size-mib), one of them")
    if policy is not None:
        policy.validate()
    elif not (isinstance(size_mib, (int, float)) and 0 < size_mib < float("inf")):
        raise LoraMergeError(f"--size-mib must be a positive number, got {size_mib!r}")
    if cap is not None and cap < 1:
        raise LoraMergeError(f"rank cap must be at least 1, got {cap}")
    source = check_input_path(source)
    out = start_output(out, overwrite, notes)
    if out.resolve() == source.resolve():
        raise LoraMergeError("the output would replace the LoRA being resized; choose another name", out)
    lora = read_lora(source, lazy=True)
    dtype = dtype or source_dtype(lora)
    hashes = input_hashes([lora])
    started = time.perf_counter()
    job_threshold, budget = None, None
    if policy is not None:
        described = policy.describe()
        result = resize_lora(lora, policy, device=device, dtype=dtype, progress=progress)
    else:
        budget = int(size_mib * 2**20)
        result, job_threshold, described = _resize_to_size(lora, out, size_mib, cap, device, dtype, hashes, progress,
                                                            metadata_mode)
    entries, hash_notes = input_entries([MergeInput(lora)], hashes)
    kept, output, meta_notes = kept_metadata(lora, result.arch, metadata_mode)
    if not output.minimal:
        kept[RECIPE_KEY] = _recipe(lora, entries, described, dtype, result.arch, job_threshold, size_mib,
                                   metadata_mode, policy, cap)
    math_seconds = time.perf_counter() - started
    checker = None
    if verify:  # the source at strength 1 is the target; each module may lose √(1 − kept energy) of it
        checker = MergeVerifier([MergeInput(lora)], MergeOptions(mode="svd", dtype=dtype),
                                MergeResult(result.modules, result.arch, result.report), out)
    saved = save_lora(result.modules, out, dtype=dtype, arch=result.arch, metadata=kept, overwrite=overwrite,
                      facts=output.facts, date=date, minimal=output.minimal, before_publish=checker)
    report = result.report
    if checker:
        report.verification = checker.result
    report.notes[:0] = notes + hash_notes + meta_notes
    report.seconds = math_seconds  # both passes of a size target
    report.timings.update(math=math_seconds, write=time.perf_counter() - started - math_seconds)
    return ResizeJob(path=saved.path, report=report, metadata=saved.metadata, arch=result.arch, policy=described,
                     ranks={m.name: m.rank for m in result.modules},
                     source_ranks={n: m.rank for n, m in lora.modules.items()}, threshold=job_threshold,
                     size_target=budget, size=saved.path.stat().st_size)


def _resize_to_size(lora: LoraModel, out: Path, size_mib: float, cap: int | None, device: str, dtype: torch.dtype,
                    hashes, progress: Progress | None, mode: str):
    """(result, threshold, description): the largest global energy threshold whose file fits ``budget`` bytes.

    Two passes of the merge engine: the spectra first, then the resize at the chosen ranks; the
    file's exact size (header and metadata included) is computed before anything is written.
    """
    budget = int(size_mib * 2**20)
    total = [0]

    def halves(offset: int) -> Progress | None:  # one bar over both passes
        if progress is None:
            return None

        def report(done: int, count: int, what: str) -> None:
            total[0] = count
            progress(offset * count + done, 2 * count, what)
        return report

    values = spectra(lora, device=device, progress=halves(0))
    entries, _ = input_entries([MergeInput(lora)], hashes, placeholder=True)
    arch = lora.arch

    def size_of(threshold: float, ranks: dict[str, int]) -> int:
        modules = _shapes_only(lora, ranks)
        kept, output, _ = kept_metadata(lora, arch, mode)
        if not output.minimal:
            kept[RECIPE_KEY] = _recipe(lora, entries, _size_policy(budget, cap, threshold), dtype, arch, threshold,
                                       size_mib, mode, None, cap)
        return lora_file_size(modules, out, dtype=dtype, arch=arch, metadata=kept, facts=output.facts,
                              minimal=output.minimal)

    threshold, ranks = threshold_for_size(values, size_of, budget, cap)
    result = resize_to_ranks(lora, ranks, device=device, dtype=dtype, progress=halves(1))
    written = {m.name: m.rank for m in result.modules}
    if size_of(threshold, written) > budget:  # a module kept fewer values than planned, changing the header
        raise LoraMergeError(f"internal: the planned file of at most {budget} bytes came out larger; nothing was written")
    return result, threshold, _size_policy(budget, cap, threshold)


def _size_policy(budget: int, cap: int | None, threshold: float) -> str:
    said = f"fit in {budget / 2**20:g} MiB: keep {threshold:.6g} of ‖ΔW‖² per module"
    return said + (f", at most rank {cap}" if cap is not None else "")
