"""Command line: ``python -m lib_loramerge info|merge|analyze|bake|extract|resize|replay|batch|ui …``.

Every user error is one line ``error: <file>: <reason>`` on stderr and exit status 2, with no
traceback (``--debug`` shows it). Anything else is a bug: one line, exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .errors import LoraMergeError, display_path

EXIT_USER_ERROR = 2
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and a LoraMergeError (so: exit 2, no usage dump).

    Negative strengths in any float spelling (``-1e-1``, ``-inf``) are values, not options: argparse's
    own test knows only ``-1`` and ``-0.5``, and would call ``--ratios -1e-1`` a missing argument.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

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


_outer: list[Callable[[float], None]] = []  # a batch's one bar: jobs report their fraction done to it


@contextlib.contextmanager
def outer_progress(report: Callable[[float], None]):
    """While inside, commands report progress as a fraction to ``report`` instead of drawing their own bar."""
    _outer.append(report)
    try:
        yield
    finally:
        _outer.remove(report)


class _TqdmProgress:
    """Module progress on stderr (silent when stderr is not a terminal)."""

    def __init__(self, desc: str, unit: str = "module"):
        self.desc = desc
        self.unit = unit
        self.bar = None

    def __call__(self, done: int, total: int, name: str) -> None:
        if _outer:
            _outer[-1](done / total if total else 1.0)
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, disable=None, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _input_specs(args: argparse.Namespace, notes: list[str]) -> list:
    from .jobs import LoraSpec, specs_from_prompt

    if args.prompt is not None:
        if args.models or args.ratios or args.te_ratios or args.lbws:
            raise LoraMergeError("give either --prompt or --models (with --ratios/--te-ratios/--lbws), not both")
        return specs_from_prompt(args.prompt, args.lora_dir or [], notes)
    if not args.models:
        raise LoraMergeError("no inputs: give --models FILE … or --prompt '<lora:NAME:…>' with --lora-dir")
    n = len(args.models)
    unet = _per_model(args.ratios, n, "--ratios") or [1.0] * n
    te = _per_model(args.te_ratios, n, "--te-ratios") or [None] * n
    lbws = _per_model(args.lbws, n, "--lbws") or [None] * n
    return [LoraSpec(Path(p), unet=u, te=t, lbw=None if w in (None, "-") else w)
            for p, u, t, w in zip(args.models, unet, te, lbws, strict=True)]


def _early_hashes(args: argparse.Namespace, checkpoint: Path | None = None) -> tuple:
    """Start hashing the inputs (for the recipe) now, before torch is imported: the import keeps one core
    busy for a second or so, and the hashes take the other. (LoRAs named by --prompt are found later.)"""
    from .formats.hashing import BackgroundHashes

    loras = BackgroundHashes([Path(m) for m in args.models]) if args.models and args.prompt is None else None
    return loras, None if checkpoint is None else BackgroundHashes([checkpoint], whole=True)


def _cmd_merge(args: argparse.Namespace) -> int:
    early, _ = _early_hashes(args)
    from .blocks.presets import load_presets
    from .formats.writer import parse_dtype
    from .jobs import check_output, merge_to_file, prepare_inputs
    from .ops.merge import MergeOptions, default_device
    from .ops.methods import method_from_args

    method = method_from_args(args)
    options = MergeOptions(mode=args.mode, rank=args.rank, threshold=args.threshold, clamp=args.clamp,
                           device=args.device or default_device(), dtype=parse_dtype(args.dtype), method=method)
    options.validate()
    check_output(args.out, args.overwrite)
    started = time.perf_counter()
    lookup_notes: list[str] = []
    specs = _input_specs(args, lookup_notes)
    if method is not None:
        method.validate(args.mode, len(specs))
    presets = load_presets(args.presets, args.webui_root) if any(s.lbw for s in specs) else None
    inputs, notes = prepare_inputs(specs, presets, seed=args.lbw_seed)
    notes = lookup_notes + notes
    read = time.perf_counter() - started
    progress = _TqdmProgress(f"merge ({args.mode})")
    try:
        job = merge_to_file(inputs, options, args.out, overwrite=args.overwrite, progress=progress, notes=notes,
                            metadata_mode=args.metadata, verify=args.verify, hashes=early)
    finally:
        progress.close()
    job.report.timings = {"read": read, **job.report.timings, "total": time.perf_counter() - started}
    if args.json:
        print(json.dumps({"out": str(job.path), "arch": job.arch, **job.report.as_dict()}, indent=2))
    else:
        from .reports import format_merge_report

        print(format_merge_report(job.report, job.path, job.arch))
    return 0


def _is_flux_checkpoint(path: str) -> bool:
    from .bake.keymap import is_flux_checkpoint
    from .formats.safetensors_io import read_header

    if not str(path).lower().endswith(".safetensors"):
        return False
    try:
        return is_flux_checkpoint(list(read_header(path).entries))
    except (LoraMergeError, OSError):
        return False  # the bake itself reports an unreadable file


def _cmd_bake(args: argparse.Namespace) -> int:
    early, early_checkpoint = _early_hashes(args, Path(args.checkpoint))
    from .blocks.presets import load_presets
    from .formats.tensorfile import check_input_path
    from .formats.writer import parse_dtype
    from .jobs import bake_to_file, check_output, prepare_inputs
    from .ops.merge import check_device, default_device

    if args.dtype is None:  # Flux files (bf16 or fp8) keep their dtypes; SD checkpoints become fp16
        dtype = None if _is_flux_checkpoint(args.checkpoint) else parse_dtype("fp16")
    else:
        dtype = None if args.dtype.lower() == "keep" else parse_dtype(args.dtype)
    device = args.device or default_device()
    check_device(device)
    check_input_path(args.checkpoint)
    check_output(args.out, args.overwrite)
    lookup_notes: list[str] = []
    specs = _input_specs(args, lookup_notes)
    presets = load_presets(args.presets, args.webui_root) if any(s.lbw for s in specs) else None
    inputs, notes = prepare_inputs(specs, presets, seed=args.lbw_seed)
    notes = lookup_notes + notes
    progress = _TqdmProgress("bake", unit="tensor")
    try:
        job = bake_to_file(args.checkpoint, inputs, args.out, dtype=dtype, device=device, overwrite=args.overwrite,
                           allow_unmatched=args.allow_unmatched, progress=progress, notes=notes,
                           semantics=args.semantics, verify=args.verify, hashes=early,
                           checkpoint_hash=early_checkpoint)
    finally:
        progress.close()
    if args.json:
        print(json.dumps({"out": str(job.path), **job.report.as_dict()}, indent=2))
    else:
        from .reports import format_bake_report

        print(format_bake_report(job.report, job.path))
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    from .ui.host import StandaloneHost
    from .ui.server import serve

    lora_dirs = list(args.lora_dir or [])
    if args.demo:
        from . import demo

        folder = Path(args.out)
        if not all((folder / name).is_file() for name, _, _ in demo.INPUTS):
            demo.prepare_folder(folder)
            demo.write_inputs(folder)
        lora_dirs.insert(0, str(folder))
    if not lora_dirs:
        raise LoraMergeError("give a LoRA folder (--lora-dir DIR) or --demo")
    for folder in [*lora_dirs, *([args.ckpt_dir] if args.ckpt_dir else [])]:
        if not Path(folder).is_dir():
            raise LoraMergeError("folder not found", folder)
    host = StandaloneHost(lora_dirs, args.ckpt_dir, device=args.device, webui_root=args.webui_root,
                          preset_files=args.presets or ())
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise LoraMergeError("the ui command needs gradio (pip install 'gradio==3.41.2' or 4.x)") from None
    serve(host, args.port)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(Path(args.out), main)


def _add_input_args(p: argparse.ArgumentParser) -> None:
    """The LoRAs of a merge or bake: files with strengths and block weights, or A1111 prompt tags."""
    p.add_argument("--models", nargs="+", metavar="FILE", help="input LoRA files")
    p.add_argument("--ratios", nargs="+", type=float, metavar="S",
                   help="UNet strength per model (one value: all); default 1. Negative values subtract")
    p.add_argument("--te-ratios", nargs="+", type=float, metavar="S",
                   help="text-encoder strength per model; default: the UNet strength")
    p.add_argument("--lbws", nargs="+", metavar="SPEC",
                   help="block weights per model, as LBW: a preset name or 12/17/20/26 (Flux: 61) comma-separated values "
                        "(R, U, X, X+d, X-d allowed); '-' for none; one value: all")
    p.add_argument("--presets", action="append", metavar="FILE",
                   help="extra LBW preset file (NAME:v1,…,vN per line); overrides presets of the same name")
    p.add_argument("--webui-root", metavar="DIR",
                   help="A1111/Forge folder: read the presets of an installed sd-webui-lora-block-weight")
    p.add_argument("--lbw-seed", type=int, metavar="N", help="seed for R/U block weights (input i uses N+i)")
    p.add_argument("--prompt", metavar="TAGS",
                   help="instead of --models: A1111 tags such as \"<lora:a:0.8:lbw=OUTALL> <lora:b:0.5:0.3>\"")
    p.add_argument("--lora-dir", action="append", metavar="DIR", help="folder the --prompt names are looked up in")


def add_output_checks(p: argparse.ArgumentParser, metadata: bool = True) -> None:
    """``--verify`` (every job that writes a file) and ``--metadata`` (LoRA outputs)."""
    if metadata:
        from .formats.metadata import MODES

        p.add_argument("--metadata", choices=MODES, default="merge",
                       help="what the output keeps of the inputs' metadata: merge (default: what all agree on, tag "
                            "counts summed, trigger phrases joined), first (the first input's), new (only this "
                            "tool's), none (only what the WebUIs need; no recipe)")
    p.add_argument("--verify", action="store_true",
                   help="re-read the written file and compare it with what it should hold before it takes its name; "
                        "a failed check is an error and nothing is written")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lib_loramerge",
                     description="Merge LoRAs exactly, bake them into checkpoints, extract and resize them, inspect them.")
    parser.add_argument("--version", action="version", version=f"lib_loramerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    add = sub.add_parser

    def add_parser(name: str, **kwargs) -> argparse.ArgumentParser:
        return add(name, parents=[common], **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    p = sub.add_parser("demo", help="the main job on generated inputs: write two SD1 LoRAs, merge them (svd, concat)")
    p.add_argument("--out", default="lora-merger-demo", metavar="DIR",
                   help="folder for the demo's files (default: ./lora-merger-demo; only the demo's own files are replaced)")
    p.set_defaults(func=_cmd_demo)

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
    from .ops.method_names import add_method_args

    add_method_args(p)
    p.add_argument("--clamp", type=float, metavar="Q", help="svd: clip factors to this quantile of |values| (off by default)")
    p.add_argument("--dtype", default="fp16", help="output dtype: fp32, fp16 (default) or bf16")
    p.add_argument("--device", help="where the math runs: cpu or cuda (default: cuda when available)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_output_checks(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("bake", help="bake LoRAs into an SD1/SD2/SDXL or Flux checkpoint (W' = W + sum of strength x dW)")
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="LDM-format checkpoint (.safetensors or .ckpt), or a Flux file (BFL single file or all-in-one; "
                        "bf16/fp16/fp8, not nf4/GGUF)")
    _add_input_args(p)
    p.add_argument("--dtype", default=None,
                   help="floating-point tensors of the output: fp16 (default for SD), bf16, fp32, or keep (each as "
                        "it is; the default for Flux, so an fp8 file stays fp8)")
    p.add_argument("--device", help="where W + dW is computed: cpu or cuda (default: cuda when available)")
    p.add_argument("--out", required=True, help="output .safetensors checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--allow-unmatched", action="store_true",
                   help="bake even if some LoRA modules have no matching layer (they are listed)")
    p.add_argument("--semantics", choices=("a1111", "forge"), default="a1111",
                   help="apply DoRA (dora_scale) modules as this WebUI does: the one that will use the checkpoint "
                        "(default a1111; recorded in the recipe)")
    add_output_checks(p, metadata=False)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_bake)

    from . import cli_analyze, cli_extract, cli_recipes

    cli_extract.add_commands(sub)
    cli_recipes.add_commands(sub)
    cli_analyze.add_commands(sub)

    p = sub.add_parser("ui", help="serve the WebUI tab (merge, bake, extract, resize, inspect) on 127.0.0.1 in a browser")
    p.add_argument("--lora-dir", action="append", metavar="DIR",
                   help="LoRA folder (repeatable); merged LoRAs are saved in the first")
    p.add_argument("--demo", action="store_true",
                   help="open the tab on the demo's folder (--out, default ./lora-merger-demo), writing its LoRAs if needed")
    p.add_argument("--out", default="lora-merger-demo", metavar="DIR", help="with --demo: the demo folder")
    p.add_argument("--ckpt-dir", metavar="DIR", help="checkpoint folder: bake reads and saves checkpoints here")
    p.add_argument("--port", type=int, default=7870, help="port on 127.0.0.1 (default 7870)")
    p.add_argument("--device", help="default device for the math: cpu or cuda (default: cuda when available)")
    p.add_argument("--webui-root", metavar="DIR", help="A1111/Forge folder: offer an installed LBW's presets too")
    p.add_argument("--presets", action="append", metavar="FILE", help="extra LBW preset file (repeatable)")
    p.set_defaults(func=_cmd_ui)
    return parser


class Terminated(BaseException):
    """SIGTERM/SIGHUP, raised in the main thread so that every ``finally`` runs (temp files removed)."""


def _on_signal(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _install_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            with contextlib.suppress(ValueError, OSError):
                signal.signal(getattr(signal, name), _on_signal)


def _printable_streams() -> None:
    """Names that are not valid UTF-8, or a terminal that is not UTF-8, must not turn an error into a crash."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None, *, parser_factory: Callable[[], argparse.ArgumentParser] = build_parser) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _printable_streams()
    _install_signal_handlers()
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
    except Terminated as e:
        print("error: terminated; nothing was written", file=sys.stderr)
        return 128 + int(e.args[0])
    except MemoryError:
        if debug:
            raise
        print("error: out of memory (try --device cpu, a smaller rank, or fewer inputs at once)", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:
        if debug:
            raise
        where = f"{display_path(e.filename)}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # a bug: say so in one line, keep the traceback for --debug
        if debug:
            raise
        print(f"error: internal error ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
              "rerun with --debug for the traceback and please report it", file=sys.stderr)
        return 1
