"""Command line: ``python -m lib_loramerge info|merge|bake|ui …``.

Every user error is one line ``error: <file>: <reason>`` on stderr and exit status 2, with no
traceback (``--debug`` shows it). Anything else is a bug: one line, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

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

    def __init__(self, desc: str, unit: str = "module"):
        self.desc = desc
        self.unit = unit
        self.bar = None

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, disable=None, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _input_specs(args: argparse.Namespace) -> list:
    from .jobs import LoraSpec, specs_from_prompt

    if args.prompt is not None:
        if args.models or args.ratios or args.te_ratios or args.lbws:
            raise LoraMergeError("give either --prompt or --models (with --ratios/--te-ratios/--lbws), not both")
        return specs_from_prompt(args.prompt, args.lora_dir or [])
    if not args.models:
        raise LoraMergeError("no inputs: give --models FILE … or --prompt '<lora:NAME:…>' with --lora-dir")
    n = len(args.models)
    unet = _per_model(args.ratios, n, "--ratios") or [1.0] * n
    te = _per_model(args.te_ratios, n, "--te-ratios") or [None] * n
    lbws = _per_model(args.lbws, n, "--lbws") or [None] * n
    return [LoraSpec(Path(p), unet=u, te=t, lbw=None if w in (None, "-") else w)
            for p, u, t, w in zip(args.models, unet, te, lbws, strict=True)]


def _cmd_merge(args: argparse.Namespace) -> int:
    from .blocks.presets import load_presets
    from .formats.writer import parse_dtype
    from .jobs import check_output, merge_to_file, prepare_inputs
    from .ops.merge import MergeOptions, default_device

    options = MergeOptions(mode=args.mode, rank=args.rank, threshold=args.threshold, clamp=args.clamp,
                           device=args.device or default_device(), dtype=parse_dtype(args.dtype))
    options.validate()
    check_output(args.out, args.overwrite)
    specs = _input_specs(args)
    presets = load_presets(args.presets, args.webui_root) if any(s.lbw for s in specs) else None
    inputs, notes = prepare_inputs(specs, presets, seed=args.lbw_seed)
    progress = _TqdmProgress(f"merge ({args.mode})")
    try:
        job = merge_to_file(inputs, options, args.out, overwrite=args.overwrite, progress=progress, notes=notes)
    finally:
        progress.close()
    if args.json:
        print(json.dumps({"out": str(job.path), "arch": job.arch, **job.report.as_dict()}, indent=2))
    else:
        print(format_merge_report(job.report, job.path, job.arch))
    return 0


def _cmd_bake(args: argparse.Namespace) -> int:
    from .blocks.presets import load_presets
    from .formats.tensorfile import check_input_path
    from .formats.writer import parse_dtype
    from .jobs import bake_to_file, check_output, prepare_inputs
    from .ops.merge import check_device, default_device

    dtype = None if args.dtype.lower() == "keep" else parse_dtype(args.dtype)
    device = args.device or default_device()
    check_device(device)
    check_input_path(args.checkpoint)
    check_output(args.out, args.overwrite)
    specs = _input_specs(args)
    presets = load_presets(args.presets, args.webui_root) if any(s.lbw for s in specs) else None
    inputs, notes = prepare_inputs(specs, presets, seed=args.lbw_seed)
    progress = _TqdmProgress("bake", unit="tensor")
    try:
        job = bake_to_file(args.checkpoint, inputs, args.out, dtype=dtype, device=device, overwrite=args.overwrite,
                           allow_unmatched=args.allow_unmatched, progress=progress, notes=notes)
    finally:
        progress.close()
    if args.json:
        print(json.dumps({"out": str(job.path), **job.report.as_dict()}, indent=2))
    else:
        print(format_bake_report(job.report, job.path))
    return 0


def format_bake_report(report, path) -> str:
    from .arch import PRETTY

    lines = [f"wrote {path} ({PRETTY.get(report.arch, report.arch)} checkpoint {report.checkpoint} + "
             f"{', '.join(report.inputs)})",
             f"modules baked: {report.modules_baked} into {report.keys_patched} tensors"]
    if report.by_block:
        lines.append("  per block: " + ", ".join(f"{b} {n}" for b, n in report.by_block.items()))
    if report.skipped_zero:
        lines.append(f"  {report.skipped_zero} modules skipped: strength or block weight 0")
    if report.unmatched:
        lines.append(f"unmatched modules (not baked): {len(report.unmatched)}")
        lines += [f"  {lora}: {module}: {why}" for lora, module, why in report.unmatched[:10]]
        if len(report.unmatched) > 10:
            lines.append(f"  … and {len(report.unmatched) - 10} more")
    lines += [f"note: {n}" for n in report.notes]
    lines.append(f"time: {report.seconds:.2f} s")
    return "\n".join(lines)


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


def _cmd_ui(args: argparse.Namespace) -> int:
    from .ui.host import StandaloneHost
    from .ui.server import serve

    for folder in [*args.lora_dir, *([args.ckpt_dir] if args.ckpt_dir else [])]:
        if not Path(folder).is_dir():
            raise LoraMergeError("folder not found", folder)
    host = StandaloneHost(args.lora_dir, args.ckpt_dir, device=args.device, webui_root=args.webui_root,
                          preset_files=args.presets or ())
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise LoraMergeError("the ui command needs gradio (pip install 'gradio==3.41.2' or 4.x)") from None
    serve(host, args.port)
    return 0


def _add_input_args(p: argparse.ArgumentParser) -> None:
    """The LoRAs of a merge or bake: files with strengths and block weights, or A1111 prompt tags."""
    p.add_argument("--models", nargs="+", metavar="FILE", help="input LoRA files")
    p.add_argument("--ratios", nargs="+", type=float, metavar="S",
                   help="UNet strength per model (one value: all); default 1. Negative values subtract")
    p.add_argument("--te-ratios", nargs="+", type=float, metavar="S",
                   help="text-encoder strength per model; default: the UNet strength")
    p.add_argument("--lbws", nargs="+", metavar="SPEC",
                   help="block weights per model, as LBW: a preset name or 12/17/20/26 comma-separated values "
                        "(R, U, X, X+d, X-d allowed); '-' for none; one value: all")
    p.add_argument("--presets", action="append", metavar="FILE",
                   help="extra LBW preset file (NAME:v1,…,vN per line); overrides presets of the same name")
    p.add_argument("--webui-root", metavar="DIR",
                   help="A1111/Forge folder: read the presets of an installed sd-webui-lora-block-weight")
    p.add_argument("--lbw-seed", type=int, metavar="N", help="seed for R/U block weights (input i uses N+i)")
    p.add_argument("--prompt", metavar="TAGS",
                   help="instead of --models: A1111 tags such as \"<lora:a:0.8:lbw=OUTALL> <lora:b:0.5:0.3>\"")
    p.add_argument("--lora-dir", action="append", metavar="DIR", help="folder the --prompt names are looked up in")


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
    _add_input_args(p)
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

    p = sub.add_parser("bake", help="bake LoRAs into an SD1/SD2/SDXL checkpoint (W' = W + sum of strength x dW)")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="LDM-format checkpoint (.safetensors or .ckpt)")
    _add_input_args(p)
    p.add_argument("--dtype", default="fp16",
                   help="floating-point tensors of the output: fp16 (default), bf16, fp32, or keep (each as it is)")
    p.add_argument("--device", help="where W + dW is computed: cpu or cuda (default: cuda when available)")
    p.add_argument("--out", required=True, help="output .safetensors checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--allow-unmatched", action="store_true",
                   help="bake even if some LoRA modules have no matching layer (they are listed)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_bake)

    p = sub.add_parser("ui", help="serve the WebUI tab (merge, bake, inspect) on 127.0.0.1 in a browser")
    p.add_argument("--lora-dir", action="append", required=True, metavar="DIR",
                   help="LoRA folder (repeatable); merged LoRAs are saved in the first")
    p.add_argument("--ckpt-dir", metavar="DIR", help="checkpoint folder: bake reads and saves checkpoints here")
    p.add_argument("--port", type=int, default=7870, help="port on 127.0.0.1 (default 7870)")
    p.add_argument("--device", help="default device for the math: cpu or cuda (default: cuda when available)")
    p.add_argument("--webui-root", metavar="DIR", help="A1111/Forge folder: offer an installed LBW's presets too")
    p.add_argument("--presets", action="append", metavar="FILE", help="extra LBW preset file (repeatable)")
    p.set_defaults(func=_cmd_ui)
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
