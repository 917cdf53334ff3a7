"""What the tab's buttons do, in plain Python (no gradio): called by the UI, and directly by tests.

Every action returns an :class:`Outcome` whose message is what the user reads. Errors never escape
as tracebacks: a ``LoraMergeError`` becomes its one-line message, anything unexpected one line
"internal error …". The work itself is the library's (``prepare_inputs``, ``merge_to_file``, …).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import reports
from ..arch import PRETTY
from ..blocks.report import block_energy
from ..checks import as_strength
from ..errors import LoraMergeError
from ..jobs import LoraSpec, check_output, merge_to_file, prepare_inputs, specs_from_prompt
from .host import Host

log = logging.getLogger(__name__)

NO_BLOCK_WEIGHTS = "none"
OUTPUT_SUFFIX = ".safetensors"
# characters no file name may hold on Windows (where most WebUIs run), plus control characters
_FORBIDDEN = re.compile(r'[<>:"/\\|?*\x00-\x1f]')

UiProgress = Callable[[int, int, str], None]
ChartRows = list[tuple[str, float]]  # (block ID, value) in LBW's block order


@dataclass
class LoraRow:
    """One row of the tab: a LoRA by its label, strengths, block weights (preset name or values)."""

    lora: str | None
    unet: float | None = 1.0  # None: the field was left empty
    te: float | None = 1.0
    weights: str | None = None

    @property
    def used(self) -> bool:
        return bool(self.lora)

    @property
    def block_weights(self) -> str | None:
        spec = (self.weights or "").strip()
        return None if spec in ("", NO_BLOCK_WEIGHTS) else spec


@dataclass
class MergeRequest:
    rows: list[LoraRow]
    output: str
    mode: str = "svd"
    rank: int | None = None  # None or 0: svd's default (the largest input rank)
    threshold: float | None = None  # None or 0: off
    dtype: str = "fp16"
    device: str = "cpu"
    overwrite: bool = False
    metadata: str = "merge"  # what the output keeps of the inputs' metadata (formats.metadata.MODES)
    verify: bool = False  # re-read the written file and compare every module with its target
    method: str = "sum"  # ops.methods.METHODS
    t: float = 0.5  # slerp
    density: float | None = None  # ties/dare; None or 0: the method's default


@dataclass
class BakeRequest:
    checkpoint: str | None  # the label the checkpoint dropdown shows
    rows: list[LoraRow]
    output: str
    dtype: str = "fp16"  # or "keep": every tensor in its own dtype
    device: str = "cpu"
    overwrite: bool = False
    allow_unmatched: bool = False
    verify: bool = False  # re-read the patched tensors and compare them with W + ΔW


@dataclass
class Outcome:
    ok: bool
    message: str
    path: Path | None = None
    chart: ChartRows | None = None  # merge: energy retained per block (svd only)
    table: list[tuple[str, str]] = field(default_factory=list)  # inspect: (property, value)


def describe_error(error: BaseException) -> str:
    """One line for the user; never a traceback (unexpected errors are logged with theirs)."""
    if isinstance(error, LoraMergeError):
        return f"error: {error}"
    if isinstance(error, MemoryError):
        return "error: out of memory (try the cpu device, a smaller rank, or fewer LoRAs at once)"
    if isinstance(error, OSError):
        where = f"{error.filename}: " if getattr(error, "filename", None) else ""
        return f"error: {where}{error.strerror or error}"
    log.error("lora merger: internal error", exc_info=error)
    return f"internal error ({type(error).__name__}: {' '.join(str(error).split())[:300]}); please report it"


def output_path(name: str | None, folder: Path) -> Path:
    """A bare file name typed by the user → a path in ``folder`` (``.safetensors`` added if missing).

    Refused: empty names, any path separator, '.'/'..', drive letters and other characters a file
    name cannot hold, so an output can only land in the folder the tab says.
    """
    name = (name or "").strip()
    if not name:
        raise LoraMergeError("give an output file name")
    if _FORBIDDEN.search(name) or name in (".", "..") or Path(name).is_absolute() or name.startswith("."):
        raise LoraMergeError(f"output name '{name}' must be a bare file name (no folders, no '..', "
                             "none of < > : \" / \\ | ? *, not starting with '.')")
    if not name.lower().endswith(OUTPUT_SUFFIX):
        name += OUTPUT_SUFFIX
    return folder / name


def _optional_number(value: object, what: str, whole: bool = False) -> float | int | None:
    """A number box's value: empty or 0 means "not set"; anything else must be a finite number."""
    if value is None or value == "":
        return None
    number = as_strength(value, what)
    if whole:
        if number != int(number):
            raise LoraMergeError(f"{what} must be a whole number, got {number:g}")
        number = int(number)
    return number or None


def specs_from_rows(host: Host, rows: list[LoraRow]) -> list[LoraSpec]:
    used = [r for r in rows if r.used]
    if not used:
        raise LoraMergeError("choose at least one LoRA")
    files = host.loras()
    specs = []
    for row in used:
        path = files.get(row.lora)
        if path is None:
            raise LoraMergeError(f"LoRA '{row.lora}' is not in the LoRA folders any more (refresh the list)")
        if row.unet is None or row.te is None:
            raise LoraMergeError(f"{row.lora}: give both strengths (UNet and TE)")
        specs.append(LoraSpec(path, unet=as_strength(row.unet, f"{row.lora}: UNet strength"),
                              te=as_strength(row.te, f"{row.lora}: TE strength"), lbw=row.block_weights))
    return specs


def job_progress(host: Host, ui_progress: UiProgress | None) -> Callable[[int, int, str], None]:
    """The jobs' progress callback: the host first (it raises on interrupt), then the UI's bar."""

    def report(done: int, total: int, what: str) -> None:
        host.job_progress(done, total, what)
        if ui_progress is not None:
            ui_progress(done, total, what)

    return report


def waiting(ui_progress: UiProgress | None) -> Callable[[str], None] | None:
    """What a job shows while it waits for the WebUI's running generation (or the standalone UI's job)."""
    if ui_progress is None:
        return None
    return lambda message: ui_progress(0, 1, message)


def merge(host: Host, request: MergeRequest, ui_progress: UiProgress | None = None) -> Outcome:
    """Merge the used rows into ``request.output`` in the host's LoRA folder."""
    try:
        from ..formats.writer import parse_dtype
        from ..ops.merge import MergeOptions

        out = output_path(request.output, host.lora_output_dir())
        check_output(out, request.overwrite)
        from ..ops.methods import method_spec

        method = method_spec(request.method or "sum", request.t, _optional_number(request.density, "density"))
        options = MergeOptions(mode=request.mode, rank=_optional_number(request.rank, "rank", whole=True),
                               threshold=_optional_number(request.threshold, "energy threshold"),
                               device=request.device or host.device(), dtype=parse_dtype(request.dtype),
                               method=method)
        options.validate()
        specs = specs_from_rows(host, request.rows)
        if method is not None:
            method.validate(request.mode, len(specs))
        presets = host.presets() if any(s.lbw for s in specs) else None

        def job():
            inputs, notes = prepare_inputs(specs, presets)
            return merge_to_file(inputs, options, out, overwrite=request.overwrite,
                                 progress=job_progress(host, ui_progress), notes=notes,
                                 metadata_mode=request.metadata, verify=bool(request.verify))

        done = host.run_job(f"LoRA merge → {out.name}", job, on_wait=waiting(ui_progress))
        done.report.notes += host.lora_written(done.path) + _flux_note(host, done.arch, "LoRA")
        chart = None
        if done.report.energy:
            pooled = block_energy(done.report.energy, done.report.target_energy, done.arch)
            if pooled is not None:
                chart = [(b, v) for b, v in pooled.retained.items() if v is not None]
        return Outcome(True, reports.format_merge_report(done.report, done.path, done.arch), path=done.path, chart=chart)
    except Exception as e:  # noqa: BLE001 (every failure becomes a message)
        return Outcome(False, describe_error(e))


def _flux_note(host: Host, arch: str, what: str) -> list[str]:
    if arch == "flux" and host.runs_flux() is False:
        return [f"a Flux {what}: this WebUI (A1111) cannot generate with Flux; use it in Forge (or ComfyUI)"]
    return []


def bake(host: Host, request: BakeRequest, ui_progress: UiProgress | None = None) -> Outcome:
    """Bake the used rows into the chosen checkpoint; the result goes to the host's checkpoint folder."""
    try:
        from ..formats.writer import parse_dtype
        from ..jobs import bake_to_file
        from ..ops.merge import check_device

        folder = host.checkpoint_dir()
        if folder is None:
            raise LoraMergeError("baking needs a checkpoint folder (start the ui with --ckpt-dir)")
        if not request.checkpoint:
            raise LoraMergeError("choose a checkpoint to bake into")
        checkpoint = host.checkpoints().get(request.checkpoint)
        if checkpoint is None:
            raise LoraMergeError(f"checkpoint '{request.checkpoint}' is not in the list any more (refresh the list)")
        out = output_path(request.output, folder)
        if out.resolve() == checkpoint.resolve():
            raise LoraMergeError("the output would replace the checkpoint being read; choose another name", out)
        check_output(out, request.overwrite)
        dtype = None if request.dtype == "keep" else parse_dtype(request.dtype)
        device = request.device or host.device()
        check_device(device)
        specs = specs_from_rows(host, request.rows)
        presets = host.presets() if any(s.lbw for s in specs) else None

        def job():
            inputs, notes = prepare_inputs(specs, presets)
            return bake_to_file(checkpoint, inputs, out, dtype=dtype, device=device, overwrite=request.overwrite,
                                allow_unmatched=request.allow_unmatched, progress=job_progress(host, ui_progress),
                                notes=notes, semantics=host.semantics(), verify=bool(request.verify))

        done = host.run_job(f"LoRA bake → {out.name}", job, on_wait=waiting(ui_progress))
        done.report.notes += host.checkpoint_written(done.path) + _flux_note(host, done.report.arch, "checkpoint")
        return Outcome(True, reports.format_bake_report(done.report, done.path), path=done.path)
    except Exception as e:  # noqa: BLE001 (every failure becomes a message)
        return Outcome(False, describe_error(e))


@dataclass
class LiveRequest:
    """Bake into the loaded model: the rows to apply; for Save, the file name, dtype and overwrite flag."""

    rows: list[LoraRow] = field(default_factory=list)
    output: str = ""
    dtype: str = "fp16"
    overwrite: bool = False
    allow_unmatched: bool = False
    verify: bool = False  # Save: re-read the patched tensors of the written file


def live_status(host: Host) -> str:
    """One line for the panel: what is baked into the loaded model now."""
    if not host.supports_live_bake:
        return "The loaded model: only inside a WebUI."
    bake = host.live_bake()
    if bake is None:
        return "No live bake: the loaded model has its own weights."
    return (f"Live bake active: {bake.label} — {bake.report.modules_baked} modules in {bake.report.keys_patched} "
            f"weights; the originals take {bake.snapshot_bytes / 2**20:.0f} MiB of CPU memory (hash "
            f"{bake.recipe_hash}).")


def _revert_active(host: Host) -> str | None:
    from ..bake import live

    bake = host.live_bake()
    if bake is None:
        return None
    live.revert(host.live_model(), bake)
    host.set_live_bake(None)
    return bake.label


def live_apply(host: Host, request: LiveRequest, ui_progress: UiProgress | None = None) -> Outcome:
    """Patch the loaded model with the rows (reverting an active live bake first)."""
    try:
        from ..bake import live

        specs = specs_from_rows(host, request.rows)
        presets = host.presets() if any(s.lbw for s in specs) else None

        def job():
            inputs, notes = prepare_inputs(specs, presets)
            reverted = _revert_active(host)
            bake = live.apply(host.live_model(), inputs, allow_unmatched=request.allow_unmatched,
                              progress=job_progress(host, ui_progress))
            host.set_live_bake(bake)
            bake.report.notes[:0] = notes + ([f"reverted the previous live bake first ({reverted})"] if reverted else [])
            return bake

        bake = host.run_job("LoRA bake into the loaded model", job, on_wait=waiting(ui_progress))
        lines = [f"baked into the loaded model ({bake.report.checkpoint}): {bake.label}",
                 f"modules baked: {bake.report.modules_baked} into {bake.report.keys_patched} weights "
                 f"({bake.report.seconds:.1f} s); originals kept on the CPU: {bake.snapshot_bytes / 2**20:.0f} MiB",
                 *[f"note: {n}" for n in bake.report.notes],
                 "Generate now: prompt <lora:…> tags stack on the baked weights. Revert restores the model exactly."]
        return Outcome(True, "\n".join(lines))
    except Exception as e:  # noqa: BLE001
        return Outcome(False, describe_error(e))


def live_revert(host: Host, ui_progress: UiProgress | None = None) -> Outcome:
    try:
        reverted = host.run_job("LoRA bake: revert", lambda: _revert_active(host), on_wait=waiting(ui_progress))
        if reverted is None:
            return Outcome(True, "nothing to revert: no live bake is active on the loaded model")
        return Outcome(True, f"reverted: the loaded model has its own weights again (was: {reverted})")
    except Exception as e:  # noqa: BLE001
        return Outcome(False, describe_error(e))


def live_save(host: Host, request: LiveRequest, ui_progress: UiProgress | None = None) -> Outcome:
    """Write the live bake as a checkpoint: the streaming file bake of the loaded checkpoint's file."""
    try:
        from ..formats.writer import parse_dtype
        from ..jobs import bake_to_file

        bake = host.live_bake()
        if bake is None:
            raise LoraMergeError("no live bake to save: apply one first")
        folder = host.checkpoint_dir()
        source = host.loaded_checkpoint_file()
        if folder is None or source is None:
            raise LoraMergeError("the loaded model's checkpoint file is not known; bake into a file instead")
        out = output_path(request.output, folder)
        if out.resolve() == source.resolve():
            raise LoraMergeError("the output would replace the loaded checkpoint; choose another name", out)
        check_output(out, request.overwrite)
        dtype = None if request.dtype == "keep" else parse_dtype(request.dtype)

        def job():  # the file bake (CPU, streaming): exact, no GPU memory, atomic
            return bake_to_file(source, bake.inputs, out, dtype=dtype, device="cpu", overwrite=request.overwrite,
                                allow_unmatched=True, progress=job_progress(host, ui_progress),
                                semantics=host.semantics(), source="live bake", verify=bool(request.verify))

        done = host.run_job(f"LoRA bake: save → {out.name}", job, on_wait=waiting(ui_progress))
        done.report.notes += host.checkpoint_written(done.path)
        return Outcome(True, reports.format_bake_report(done.report, done.path), path=done.path)
    except Exception as e:  # noqa: BLE001
        return Outcome(False, describe_error(e))


def rows_from_prompt(host: Host, prompt: str, max_rows: int) -> list[LoraRow]:
    """``<lora:NAME:TE:UNET:lbw=…>`` tags → rows (labels as the dropdowns show them)."""
    specs = specs_from_prompt(prompt, host.lora_dirs())
    if len(specs) > max_rows:
        raise LoraMergeError(f"the prompt names {len(specs)} LoRAs; the tab has {max_rows} rows")
    labels = {path.resolve(): label for label, path in host.loras().items()}
    rows = []
    for spec in specs:
        if spec.x != 1.0:
            raise LoraMergeError(f"{spec.path.name}: x= is not supported by the tab's rows; use "
                                 "'python -m lib_loramerge merge --prompt …' for it")
        label = labels.get(spec.path.resolve())
        if label is None:  # found by find_lora but not listed: should not happen, say so plainly
            raise LoraMergeError(f"{spec.path}: found but not in the LoRA list (refresh the list)")
        te = spec.unet if spec.te is None else spec.te
        rows.append(LoraRow(label, unet=spec.unet, te=te, weights=spec.lbw or NO_BLOCK_WEIGHTS))
    return rows


def _value_text(value: object, limit: int = 240) -> str:
    text = " ".join(str(value).split())
    return text[:limit] + "…" if len(text) > limit else text


def inspect(host: Host, label: str | None) -> Outcome:
    """A LoRA's facts as (property, value) rows and its ‖ΔW‖ per LBW block."""
    try:
        from ..formats.reader import read_lora
        from ..info import summarize

        if not label:
            raise LoraMergeError("choose a LoRA to inspect")
        path = host.loras().get(label)
        if path is None:
            raise LoraMergeError(f"LoRA '{label}' is not in the LoRA folders any more (refresh the list)")
        s = summarize(read_lora(path))
        kinds = ", ".join(f"{k} ×{n}" for k, n in s["modules_by_kind"].items())
        table = [
            ("file", str(path)),
            ("format", f"{s['format']} ({s['algorithm']})"),
            ("architecture", PRETTY.get(s["arch"], s["arch"]) + "".join(f"; {n}" for n in s["arch_notes"])),
            ("modules", f"{s['modules']} ({s['unet_modules']} {'transformer' if s['arch'] == 'flux' else 'UNet'}, "
                        f"{s['text_encoder_modules']} text encoder); {kinds}"),
            ("ranks", ", ".join(f"{r} ×{n}" for r, n in s["rank_counts"].items())),
            ("alpha", ", ".join(str(a) for a in s["alphas"])),
            ("dtype", s["dtype"]),
            ("metadata", f"{s['metadata_keys']} keys"),
            *[(f"· {k}", _value_text(v)) for k, v in s["metadata"].items()],
            *[("note", _value_text(n)) for n in s["notes"]],
        ]
        blocks = s["blocks"]
        chart = [(b, blocks["norms"][b]) for b in blocks["layout"]] if blocks else None
        if blocks is None:
            table.append(("blocks", "no block chart: the architecture is unknown"))
        return Outcome(True, f"{path.name}: {PRETTY.get(s['arch'], s['arch'])}, {s['modules']} modules",
                       path=path, chart=chart, table=table)
    except Exception as e:  # noqa: BLE001
        return Outcome(False, describe_error(e))
