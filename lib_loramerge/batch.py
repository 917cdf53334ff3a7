"""Batch files: several jobs (merge, bake, resize, extract, replay) in one JSON or TOML file, with sweeps.

A job is a table of the command's own options, without the dashes (``models``, ``ratios``, ``out``,
``lbws``, …; ``-`` or ``_`` alike), plus ``command``. ``[defaults]`` apply to every job whose
command has the option. A ``sweep`` table of lists runs the job once per combination of values
(their cartesian product), each ``{name}`` in an option replaced by the value — a whole-string
``"{name}"`` keeps the value's type. Relative paths are relative to the batch file's folder; output
folders are created as needed (and removed again when the job that made them fails).

Each job runs as its command would on the command line (same checks, same atomic writes: a
failed job leaves nothing), the batch goes on past a failure, and ends with a summary table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import math
import os
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .errors import LoraMergeError, display_path
from .replay import read_document

COMMANDS = ("merge", "bake", "resize", "extract", "replay")
POSITIONAL = {"resize": "lora", "replay": "source"}
PATH_OPTIONS = {"models", "out", "checkpoint", "lora-dir", "ckpt-dir", "base", "tuned", "presets", "webui-root",
                "lora", "source"}
MAX_JOBS = 10_000  # a sweep's product is checked before it is expanded
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class BatchJob:
    number: int
    command: str
    argv: list[str]
    label: str  # the job as the summary names it (its sweep values)
    out: Path | None = None
    error: str | None = None  # found while expanding: the job fails without running

    def command_line(self) -> str:
        if self.error:
            return f"(not run: {self.error})"
        return "python -m lib_loramerge " + shlex.join(self.argv)


@dataclass
class BatchOutcome:
    job: BatchJob
    ok: bool
    seconds: float
    message: str  # the output written, or the error


def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    from .cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sub.choices[name] for name in COMMANDS}


def expand_jobs(path: str | os.PathLike) -> list[BatchJob]:
    """The batch file's jobs, sweeps expanded, as command lines; problems become failed jobs, not errors,
    except a file that is no batch at all."""
    path = Path(path)
    doc = read_document(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list) or not doc["jobs"]:
        raise LoraMergeError("not a batch file: it needs a non-empty list 'jobs' (a [[jobs]] table per job)", path)
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise LoraMergeError("'defaults' must be a table of options", path)
    parsers = _command_parsers()
    base = path.parent
    jobs: list[BatchJob] = []
    writers: dict[Path, int] = {}
    for index, spec in enumerate(doc["jobs"], 1):
        for job in _expand(index, spec, defaults, parsers, base, start=len(jobs) + 1):
            if job.out is not None and job.error is None:
                key = job.out.resolve()
                if key in writers:
                    job.error = f"writes {display_path(job.out)}, as job {writers[key]} does"
                else:
                    writers[key] = job.number
            jobs.append(job)
    return jobs


def _expand(index: int, spec: object, defaults: dict, parsers: dict, base: Path, start: int) -> list[BatchJob]:
    where = f"jobs[{index}]"
    if not isinstance(spec, dict):
        return [BatchJob(start, "?", [], where, error=f"{where} is not a table of options")]
    spec = {_option(k): v for k, v in spec.items()}
    command = spec.pop("command", None) or spec.pop("type", None)
    if command not in COMMANDS:
        return [BatchJob(start, str(command), [], where,
                         error=f"{where}: 'command' must be one of {', '.join(COMMANDS)}, not {command!r}")]
    parser = parsers[command]
    known = _options_of(parser)
    options = {_option(k): v for k, v in defaults.items() if _option(k) in known or _option(k) == POSITIONAL.get(command)}
    options.update(spec)
    sweep = options.pop("sweep", None) or {}
    if not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
        return [BatchJob(start, command, [], where, error=f"{where}: 'sweep' must map names to non-empty lists")]
    count = math.prod(len(values) for values in sweep.values())
    if count > MAX_JOBS:
        return [BatchJob(start, command, [], where, error=f"{where}: the sweep makes {count} jobs (at most {MAX_JOBS})")]
    names = list(sweep)
    used = _placeholders(options)
    unknown = used - set(names)
    if unknown:
        return [BatchJob(start, command, [], where, error=f"{where}: {{{sorted(unknown)[0]}}} is no sweep variable")]
    missing = sorted(set(names) - _placeholders(options.get("out", "")))
    if count > 1 and missing:
        return [BatchJob(start, command, [], where,
                         error=f"{where}: 'out' must contain {{{missing[0]}}}, or every value of the sweep would be "
                               "written to the same file")]
    jobs = []
    for n, combo in enumerate(itertools.product(*(sweep[k] for k in names))):
        values = dict(zip(names, combo, strict=True))
        label = where + ("" if not values else " " + ", ".join(f"{k}={v}" for k, v in values.items()))
        job = BatchJob(start + n, command, [], label)
        try:
            filled = {k: _substitute(v, values) for k, v in options.items()}
            job.argv, job.out = _argv(command, filled, parser, known, base)
        except LoraMergeError as e:
            job.error = f"{label}: {e.reason}"
        jobs.append(job)
    return jobs


def _option(key: str) -> str:
    return str(key).strip().lstrip("-").replace("_", "-")


def _options_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s[2:]: a for s, a in parser._option_string_actions.items() if s.startswith("--")}


def _placeholders(value: object) -> set[str]:
    if isinstance(value, str):
        return set(_PLACEHOLDER.findall(value))
    if isinstance(value, list):
        return set().union(*(_placeholders(v) for v in value)) if value else set()
    if isinstance(value, dict):
        return set().union(*(_placeholders(v) for v in value.values())) if value else set()
    return set()


def _substitute(value: object, values: dict[str, object]) -> object:
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value)
        if whole and whole[1] in values:
            return values[whole[1]]
        return _PLACEHOLDER.sub(lambda m: str(values.get(m[1], m[0])), value)
    if isinstance(value, list):
        return [_substitute(v, values) for v in value]
    return value


def _argv(command: str, options: dict, parser: argparse.ArgumentParser, known: dict, base: Path
          ) -> tuple[list[str], Path | None]:
    argv = [command]
    positional = POSITIONAL.get(command)
    if positional is not None:
        if positional not in options:
            raise LoraMergeError(f"'{positional}' is missing (the {command} command's file)")
        argv.append(_path(options.pop(positional), base))
    out = None
    for key, value in options.items():
        if key in ("debug", "json") or value is None:
            continue
        action = known.get(key)
        if action is None:
            raise LoraMergeError(f"'{key}' is no option of {command} (see 'python -m lib_loramerge {command} --help')")
        flag = f"--{key}"
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, (dict, list)) for v in items):
            raise LoraMergeError(f"'{key}' must be a value or a list of values")
        if key in PATH_OPTIONS:
            items = [_path(v, base) for v in items]
        if isinstance(value, bool):
            if isinstance(action, argparse.BooleanOptionalAction):
                argv.append(flag if value else f"--no-{key}")
            elif action.nargs == 0:
                argv += [flag] if value else []
            else:
                raise LoraMergeError(f"'{key}' takes a value, not {str(value).lower()}")
        elif isinstance(action, argparse._AppendAction):
            for v in items:
                argv += [flag, _text(v)]
        elif action.nargs == 0:
            raise LoraMergeError(f"'{key}' is a switch: give true or false")
        else:
            argv += [flag, *(_text(v) for v in items)]
        if key == "out":
            out = Path(items[0])
    return argv, out


def _path(value: object, base: Path) -> str:
    text = str(value)
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else base / path)


def _text(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def run_batch(jobs: Sequence[BatchJob], *, keep_going: bool = True, out: TextIO) -> list[BatchOutcome]:
    """Run the jobs one after another under one progress bar; returns the failed ones (the summary is printed)."""
    from tqdm import tqdm

    from . import cli
    from .cli import build_parser

    outcomes: list[BatchOutcome] = []
    bar = tqdm(total=len(jobs), unit="job", desc="batch", disable=None, leave=False,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} jobs [{elapsed}<{remaining}]")
    try:
        for i, job in enumerate(jobs):
            started = time.perf_counter()
            bar.set_description(f"batch: job {job.number}/{len(jobs)} {job.command}")
            if job.error:
                outcomes.append(BatchOutcome(job, False, 0.0, job.error))
            else:
                def inner(fraction: float, at: int = i) -> None:
                    bar.n = at + min(max(fraction, 0.0), 1.0)
                    bar.refresh()

                printed = io.StringIO()
                made = _make_output_folder(job.out)
                try:
                    args = build_parser().parse_args(job.argv)
                    with cli.outer_progress(inner), contextlib.redirect_stdout(printed):
                        args.func(args)
                    outcomes.append(BatchOutcome(job, True, time.perf_counter() - started,
                                                 display_path(job.out) if job.out else "done"))
                    made = []
                except LoraMergeError as e:
                    outcomes.append(BatchOutcome(job, False, time.perf_counter() - started, str(e)))
                except Exception as e:  # a bug in one job must not lose the others' results
                    outcomes.append(BatchOutcome(job, False, time.perf_counter() - started,
                                                 f"internal error ({type(e).__name__}: {e}); please report it"))
                _remove_empty(made)  # a failed job leaves no folder it made either
                shown = printed.getvalue().rstrip()
                if shown:
                    bar.write(f"── job {job.number}: {job.label}\n{shown}", file=out)
            bar.n = i + 1
            bar.refresh()
            if not outcomes[-1].ok and not keep_going:
                break
    finally:
        bar.close()
    out.write(format_summary(outcomes, len(jobs)) + "\n")
    return [o for o in outcomes if not o.ok]


def _make_output_folder(out: Path | None) -> list[Path]:
    """Create the folders a job's output goes into (a sweep's ``out/{s}/…``); returns those made, deepest first."""
    if out is None:
        return []
    missing = []
    folder = Path(out).parent
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir()
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def format_summary(outcomes: Sequence[BatchOutcome], total: int) -> str:
    rows = [("#", "command", "job", "result", "time", "output / error")]
    for o in outcomes:
        rows.append((str(o.job.number), o.job.command, o.job.label, "ok" if o.ok else "FAILED",
                     f"{o.seconds:.1f} s", o.message))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines = ["  ".join(r[c].ljust(widths[c]) for c in range(5)) + "  " + r[5] for r in rows]
    failed = sum(not o.ok for o in outcomes)
    skipped = total - len(outcomes)
    tail = f"{len(outcomes) - failed} of {total} jobs done, {failed} failed"
    if skipped:
        tail += f", {skipped} not run (--stop-on-error)"
    return "\n".join([*lines, tail])
