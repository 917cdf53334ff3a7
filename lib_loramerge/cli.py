"""Command line: ``python -m lib_loramerge info|merge|bake|ui …``.

Every user error is one line ``error: <file>: <reason>`` on stderr and exit status 2, with no
traceback (``--debug`` shows it). Anything else is a bug: one line, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import LoraMergeError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and a LoraMergeError (so: exit 2, no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise LoraMergeError(f"{message} (see '{self.prog} --help')")


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import format_summary, inspect_lora

    summary = inspect_lora(args.file)
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print(format_summary(summary))
    return 0


def _per_model(values: list[float] | None, n: int, flag: str) -> list[float] | None:
    """One value per model; a single value applies to all."""
    if values is None:
        return None
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise LoraMergeError(f"{flag} has {len(values)} values for {n} models (give one, or one per model)")
    return values


class _TqdmProgress:
    """Module progress on stderr (silent when stderr is not a terminal)."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar = None

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="module", file=sys.stderr, disable=None, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cmd_merge(args: argparse.Namespace) -> int:
    from .formats.writer import parse_dtype
    from .jobs import check_output, merge_to_file, read_inputs
    from .ops.merge import MergeInput, MergeOptions, default_device

    options = MergeOptions(mode=args.mode, rank=args.rank, threshold=args.threshold, clamp=args.clamp,
                           device=args.device or default_device(), dtype=parse_dtype(args.dtype))
    options.validate()
    check_output(args.out, args.overwrite)
    n = len(args.models)
    unet = _per_model(args.ratios, n, "--ratios") or [1.0] * n
    te = _per_model(args.te_ratios, n, "--te-ratios") or [None] * n
    loras = read_inputs(args.models)
    inputs = [MergeInput(lora, unet=u, te=t) for lora, u, t in zip(loras, unet, te, strict=True)]
    progress = _TqdmProgress(f"merge ({args.mode})")
    try:
        job = merge_to_file(inputs, options, args.out, overwrite=args.overwrite, progress=progress)
    finally:
        progress.close()
    if args.json:
        print(json.dumps({"out": str(job.path), "arch": job.arch, **job.report.as_dict()}, indent=2))
    else:
        print(format_merge_report(job.report, job.path, job.arch))
    return 0


def format_merge_report(report, path, arch: str) -> str:
    from .arch import PRETTY

    lines = [f"wrote {path} ({PRETTY.get(arch, arch)}, {report.mode} of {len(report.inputs)} LoRA"
             f"{'s' if len(report.inputs) != 1 else ''}: {', '.join(report.inputs)})",
             f"modules: {report.modules_out} written, {len(report.dropped)} dropped"]
    for kind, ranks in report.ranks_by_kind.items():
        lines.append(f"  {kind}: " + ", ".join(f"rank {r} ×{n}" for r, n in sorted(ranks.items())))
    for name, why in report.dropped[:10]:
        lines.append(f"  dropped {name}: {why}")
    if len(report.dropped) > 10:
        lines.append(f"  … and {len(report.dropped) - 10} more dropped")
    energy = report.energy_summary()
    if energy:
        lines.append(f"energy retained (fraction of ‖ΔW‖²): min {energy['min']:.6f}, mean {energy['mean']:.6f}")
        for w in energy["worst"]:
            lines.append(f"  {w['energy']:.6f}  {w['module']}")
    lines += [f"note: {n}" for n in report.notes]
    lines.append(f"time: {report.seconds:.2f} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lib_loramerge",
                     description="Merge LoRAs exactly, bake them into checkpoints, inspect them.")
    parser.add_argument("--version", action="version", version=f"lib_loramerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("info", help="describe a LoRA file: format, architecture, modules, ranks, metadata")
    p.add_argument("file", help="a LoRA (.safetensors, or .pt/.ckpt read with the safe unpickler)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("merge", help="merge LoRAs into one: concat (exact), svd (best rank-k), add (seed's sum)")
    p.add_argument("--models", nargs="+", required=True, metavar="FILE", help="input LoRA files")
    p.add_argument("--ratios", nargs="+", type=float, metavar="S",
                   help="UNet strength per model (one value: all); default 1. Negative values subtract")
    p.add_argument("--te-ratios", nargs="+", type=float, metavar="S",
                   help="text-encoder strength per model; default: the UNet strength")
    p.add_argument("--mode", choices=("svd", "concat", "add"), default="svd",
                   help="svd: best rank-k approximation of the exact sum (default); concat: exact, rank = sum of "
                        "ranks; add: the seed's factor sum (approximate, equal ranks only)")
    p.add_argument("--rank", type=int, help="svd: output rank cap (default: the largest LoRA/LoCon input rank; with LoHa/LoKr "
                        "inputs only, their largest exact factor rank)")
    p.add_argument("--threshold", type=float,
                   help="svd: per module, the smallest rank keeping this fraction of ‖ΔW‖² (0 < T ≤ 1), capped by --rank")
    p.add_argument("--clamp", type=float, metavar="Q", help="svd: clip factors to this quantile of |values| (off by default)")
    p.add_argument("--dtype", default="fp16", help="output dtype: fp32, fp16 (default) or bf16")
    p.add_argument("--device", help="where the math runs: cpu or cuda (default: cuda when available)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_merge)
    return parser


def main(argv: Sequence[str] | None = None, *, parser_factory: Callable[[], argparse.ArgumentParser] = build_parser) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = parser_factory().parse_args(argv)
        return int(args.func(args) or 0)
    except LoraMergeError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            raise
        print("error: out of memory (try --device cpu, a smaller rank, or fewer inputs at once)", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:
        if debug:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # a bug: say so in one line, keep the traceback for --debug
        if debug:
            raise
        print(f"error: internal error ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
              "rerun with --debug for the traceback and please report it", file=sys.stderr)
        return 1
