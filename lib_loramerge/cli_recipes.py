"""The ``replay`` and ``batch`` commands (registered by :func:`lib_loramerge.cli.build_parser`)."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_replay(args: argparse.Namespace) -> int:
    from .cli import _TqdmProgress
    from .ops.merge import check_device, default_device
    from .replay import replay

    device = args.device or default_device()
    check_device(device)
    progress = _TqdmProgress("replay")
    try:
        result = replay(args.source, lora_dirs=args.lora_dir or [], ckpt_dirs=args.ckpt_dir or [], out=args.out,
                        overwrite=args.overwrite, device=device, progress=progress)
    finally:
        progress.close()
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, ensure_ascii=False))
        return 0
    print(result.summary())
    for path in result.inputs:
        print(f"  input: {path}")
    for note in result.notes:
        print(f"note: {note}")
    if result.kept and result.original is not None:  # (a recipe file's summary already says it)
        print(f"wrote {result.path}")
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    from .batch import expand_jobs, run_batch

    jobs = expand_jobs(args.file)
    if args.dry_run:
        for job in jobs:
            print(f"{job.number:>3}  {job.command_line()}")
        return 0
    failed = run_batch(jobs, keep_going=not args.stop_on_error, out=sys.stdout)
    return 2 if failed else 0


def add_commands(sub) -> None:
    """Add ``replay`` and ``batch`` to the sub-command parsers ``sub``."""
    p = sub.add_parser("replay", help="run the job an output's recipe describes again (inputs found by hash) and say "
                                      "whether the new file is byte-identical")
    p.add_argument("source", help="an output of this tool (.safetensors), or a recipe file (.json/.toml) with --out")
    p.add_argument("--lora-dir", action="append", metavar="DIR",
                   help="folder to find the input LoRAs in (repeatable; the output's own folder is searched too)")
    p.add_argument("--ckpt-dir", action="append", metavar="DIR",
                   help="folder to find checkpoints in (bake and extract recipes; repeatable)")
    p.add_argument("--out", help="keep the new file here (default: write it beside the original under a temporary "
                                 "name, compare, remove it)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--device", help="where the math runs: cpu or cuda (default: cuda when available; the same device "
                                    "as the original for a byte-identical file)")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("batch", help="run the jobs of a JSON/TOML file (merge, bake, resize, extract, replay; sweeps "
                                     "of values), past failures, with a summary table")
    p.add_argument("file", help="the batch file (see the README: one [[jobs]] table per job, options as the command's)")
    p.add_argument("--dry-run", action="store_true", help="list the expanded jobs as command lines; run nothing")
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first failed job (default: go on)")
    p.set_defaults(func=_cmd_batch)
