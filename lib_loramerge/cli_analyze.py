"""The ``analyze`` command (registered by :func:`lib_loramerge.cli.build_parser`)."""

from __future__ import annotations

import argparse
import json
import time


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .cli import _per_model
    from .jobs import read_inputs
    from .ops.analyze import analyze_loras, format_analysis
    from .ops.merge import check_device

    check_device(args.device)
    started = time.perf_counter()
    loras = read_inputs(args.files)
    n = len(loras)
    analysis = analyze_loras(loras, _per_model(args.ratios, n, "--ratios"), _per_model(args.te_ratios, n, "--te-ratios"),
                             device=args.device)
    seconds = time.perf_counter() - started
    if args.json:
        data = analysis.as_dict()
        if not args.modules:
            data.pop("modules")
        print(json.dumps({**data, "seconds": round(seconds, 3)}, indent=2, ensure_ascii=False))
    else:
        print(format_analysis(analysis, top=args.top))
    return 0


def add_commands(sub) -> None:
    """Add ``analyze`` to the sub-command parsers ``sub``."""
    p = sub.add_parser("analyze", help="before merging: per block, each LoRA's ‖ΔW‖ and the pairwise cosines (where "
                                       "they interfere, where they are orthogonal), from the factors")
    p.add_argument("files", nargs="+", metavar="FILE", help="two or more LoRAs of the same model")
    p.add_argument("--ratios", nargs="+", type=float, metavar="S", help="UNet strength per LoRA (default 1)")
    p.add_argument("--te-ratios", nargs="+", type=float, metavar="S", help="text-encoder strength per LoRA "
                                                                           "(default: the UNet strength)")
    p.add_argument("--top", type=int, default=5, metavar="N", help="list the N most aligned/opposed modules per pair")
    p.add_argument("--device", default="cpu", help="where the small products run: cpu (default) or cuda")
    p.add_argument("--modules", action="store_true", help="with --json: every module's norms and cosines too")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_cmd_analyze)
