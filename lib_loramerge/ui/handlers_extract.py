"""What the Extract and Resize panels' buttons do, in plain Python (no gradio), like :mod:`.handlers`.

Each action returns an :class:`~.handlers.Outcome`; errors become one-line messages; the work is
the library's (``extract_to_file``, ``resize_to_file``), run through the host's job lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import reports
from ..blocks.report import block_energy
from ..errors import LoraMergeError
from ..jobs import check_output
from .handlers import (
    ChartRows,
    Outcome,
    UiProgress,
    _optional_number,
    describe_error,
    job_progress,
    output_path,
    waiting,
)
from .host import Host

SIZE_MIB = "size_mib"
# the Resize panel's policy choices: kohya's names, and a file size
RESIZE_POLICIES = ("rank", "threshold", "sv_fro", "sv_ratio", "sv_cumulative", SIZE_MIB)
SOURCE_DTYPE = "source"


@dataclass
class ExtractRequest:
    base: str | None  # checkpoint labels, as the dropdowns show them
    tuned: str | None
    output: str
    rank: int | None = 32  # None or 0: the default (32)
    conv_rank: int | None = None  # None or 0: attention layers only (no LoCon)
    threshold: float | None = None  # None or 0: fixed rank
    min_diff: float | None = None  # None or 0: skip identical layers only
    text_encoder: bool = True
    dtype: str = "fp16"
    device: str = "cpu"
    overwrite: bool = False


@dataclass
class ResizeRequest:
    lora: str | None
    output: str
    policy: str = "rank"  # one of RESIZE_POLICIES
    value: float | None = None  # the policy's number (a rank, a fraction, a ratio, MiB)
    max_rank: int | None = None  # None or 0: no cap
    dtype: str = SOURCE_DTYPE  # or fp16 / bf16 / fp32
    device: str = "cpu"
    overwrite: bool = False
    metadata: str = "merge"  # what the output keeps of the source's metadata (formats.metadata.MODES)
    verify: bool = False  # re-read the written file and compare every module with its target


def _block_chart(energy: dict[str, float], target_energy: dict[str, float], arch: str) -> ChartRows | None:
    pooled = block_energy(energy, target_energy, arch) if energy else None
    if pooled is None:
        return None
    return [(b, v) for b, v in pooled.retained.items() if v is not None] or None


def _checkpoint(host: Host, label: str | None, which: str) -> Path:
    if not label:
        raise LoraMergeError(f"choose the {which} checkpoint")
    path = host.checkpoints().get(label)
    if path is None:
        raise LoraMergeError(f"checkpoint '{label}' is not in the list any more (refresh the list)")
    return path


def extract(host: Host, request: ExtractRequest, ui_progress: UiProgress | None = None) -> Outcome:
    """Extract tuned − base into ``request.output`` in the host's LoRA folder."""
    try:
        from ..bake.extract import DEFAULT_RANK, ExtractOptions
        from ..formats.writer import parse_dtype
        from ..jobs_extract import extract_to_file

        if host.checkpoint_dir() is None:
            raise LoraMergeError("extraction reads checkpoints: start the ui with --ckpt-dir")
        base = _checkpoint(host, request.base, "base")
        tuned = _checkpoint(host, request.tuned, "tuned")
        out = output_path(request.output, host.lora_output_dir())
        check_output(out, request.overwrite)
        options = ExtractOptions(rank=_optional_number(request.rank, "rank", whole=True) or DEFAULT_RANK,
                                 conv_rank=_optional_number(request.conv_rank, "conv rank", whole=True),
                                 threshold=_optional_number(request.threshold, "energy threshold"),
                                 min_diff=_optional_number(request.min_diff, "minimum difference") or 0.0,
                                 text_encoder=bool(request.text_encoder), device=request.device or host.device(),
                                 dtype=parse_dtype(request.dtype))
        options.validate()

        def job():
            return extract_to_file(base, tuned, out, options, overwrite=request.overwrite,
                                   progress=job_progress(host, ui_progress))

        done = host.run_job(f"LoRA extract → {out.name}", job, on_wait=waiting(ui_progress))
        done.report.notes += host.lora_written(done.path)
        chart = _block_chart(done.report.energy, done.report.target_energy, done.arch)
        return Outcome(True, reports.format_extract_report(done.report, done.path), path=done.path, chart=chart)
    except Exception as e:  # noqa: BLE001 (every failure becomes a message)
        return Outcome(False, describe_error(e))


def resize(host: Host, request: ResizeRequest, ui_progress: UiProgress | None = None) -> Outcome:
    """Resize one LoRA by a policy (or to a file size) into ``request.output`` in the host's LoRA folder."""
    try:
        from ..formats.writer import parse_dtype
        from ..jobs_resize import resize_to_file
        from ..ops.merge import check_device
        from ..ops.policies import RankPolicy

        if not request.lora:
            raise LoraMergeError("choose a LoRA to resize")
        source = host.loras().get(request.lora)
        if source is None:
            raise LoraMergeError(f"LoRA '{request.lora}' is not in the LoRA folders any more (refresh the list)")
        if request.policy not in RESIZE_POLICIES:
            raise LoraMergeError(f"unknown policy '{request.policy}' (choose {', '.join(RESIZE_POLICIES)})")
        value = _optional_number(request.value, request.policy, whole=request.policy == "rank")
        if value is None:
            raise LoraMergeError(f"give a value for {request.policy}")
        cap = _optional_number(request.max_rank, "max rank", whole=True)
        out = output_path(request.output, host.lora_output_dir())
        if out.resolve() == source.resolve():
            raise LoraMergeError("the output would replace the LoRA being resized; choose another name", out)
        check_output(out, request.overwrite)
        policy = None if request.policy == SIZE_MIB else RankPolicy(request.policy, value, cap).validate()
        dtype = None if request.dtype == SOURCE_DTYPE else parse_dtype(request.dtype)
        device = request.device or host.device()
        check_device(device)

        def job():
            return resize_to_file(source, out, policy, size_mib=value if policy is None else None, cap=cap,
                                  device=device, dtype=dtype, overwrite=request.overwrite,
                                  progress=job_progress(host, ui_progress), metadata_mode=request.metadata,
                                  verify=bool(request.verify))

        done = host.run_job(f"LoRA resize → {out.name}", job, on_wait=waiting(ui_progress))
        done.report.notes += host.lora_written(done.path)
        chart = _block_chart(done.report.energy, done.report.target_energy, done.arch)
        return Outcome(True, reports.format_resize_report(done), path=done.path, chart=chart)
    except Exception as e:  # noqa: BLE001 (every failure becomes a message)
        return Outcome(False, describe_error(e))
