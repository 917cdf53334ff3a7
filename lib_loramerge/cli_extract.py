"""The ``extract`` and ``resize`` commands (registered by :func:`lib_loramerge.cli.build_parser`)."""

from __future__ import annotations

import argparse
import json
import time


def _cmd_extract(args: argparse.Namespace) -> int:
    from .bake.extract import ExtractOptions
    from .cli import _TqdmProgress
    from .formats.tensorfile import check_input_path
    from .formats.writer import parse_dtype
    from .jobs import check_output
    from .jobs_extract import extract_to_file
    from .ops.merge import default_device

    options = ExtractOptions(rank=args.rank, conv_rank=args.conv_rank, threshold=args.threshold,
                             sv_ratio=args.sv_ratio, min_diff=args.min_diff, text_encoder=args.text_encoder,
                             device=args.device or default_device(), dtype=parse_dtype(args.dtype))
    options.validate()
    check_input_path(args.base)
    check_input_path(args.tuned)
    check_output(args.out, args.overwrite)
    started = time.perf_counter()
    progress = _TqdmProgress("extract")
    try:
        job = extract_to_file(args.base, args.tuned, args.out, options, overwrite=args.overwrite, progress=progress)
    finally:
        progress.close()
    job.report.timings["total"] = time.perf_counter() - started
    if args.json:
        print(json.dumps({"out": str(job.path), **job.report.as_dict()}, indent=2, ensure_ascii=False))
    else:
        from .reports import format_extract_report

        print(format_extract_report(job.report, job.path))
    return 0


def _cmd_resize(args: argparse.Namespace) -> int:
    from .cli import _TqdmProgress
    from .formats.tensorfile import check_input_path
    from .formats.writer import parse_dtype
    from .jobs import check_output
    from .jobs_resize import resize_to_file
    from .ops.merge import check_device, default_device
    from .ops.policies import policy_from_options

    policy = None
    if args.size_mib is None:
        policy = policy_from_options(rank=args.rank, threshold=args.threshold, sv_fro=args.sv_fro,
                                     sv_ratio=args.sv_ratio, sv_cumulative=args.sv_cumulative, cap=args.max_rank)
    device = args.device or default_device()
    check_device(device)
    dtype = parse_dtype(args.dtype) if args.dtype else None
    check_input_path(args.lora)
    check_output(args.out, args.overwrite)
    started = time.perf_counter()
    progress = _TqdmProgress("resize")
    try:
        job = resize_to_file(args.lora, args.out, policy, size_mib=args.size_mib, cap=args.max_rank, device=device,
                             dtype=dtype, overwrite=args.overwrite, progress=progress, metadata_mode=args.metadata,
                             verify=args.verify)
    finally:
        progress.close()
    job.report.timings["total"] = time.perf_counter() - started
    if args.json:
        print(json.dumps(job.as_dict(), indent=2, ensure_ascii=False))
    else:
        from .reports import format_resize_report

        print(format_resize_report(job))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_commands(sub) -> None:
    """Add ``extract`` and ``resize`` to the sub-command parsers ``sub``."""
    from .cli import add_output_checks

    p = sub.add_parser("extract", help="extract a LoRA from two checkpoints: the best rank-k approximation of "
                                       "tuned - base, per layer")
    p.add_argument("--base", required=True, metavar="CKPT", help="the base checkpoint (.safetensors or .ckpt)")
    p.add_argument("--tuned", required=True, metavar="CKPT", help="the fine-tuned checkpoint of the same model")
    p.add_argument("--out", required=True, help="output LoRA .safetensors file")
    p.add_argument("--rank", type=_positive_int, default=32,
                   help="rank of linear and 1x1 layers (default 32; with --threshold/--sv-ratio: the most a module gets)")
    p.add_argument("--conv-rank", type=_positive_int, metavar="N",
                   help="also extract the ResNet and down/upsampler layers, 3x3 convs at this rank (LoCon); "
                        "default: attention layers only, as kohya without --conv_dim")
    dynamic = p.add_mutually_exclusive_group()
    dynamic.add_argument("--threshold", type=float, metavar="T",
                         help="per module, the smallest rank keeping this fraction of ‖ΔW‖² (0 < T ≤ 1), at most --rank")
    dynamic.add_argument("--sv-ratio", type=float, metavar="R",
                         help="per module, keep singular values ≥ σ_max / R (R ≥ 1), at most --rank")
    p.add_argument("--min-diff", type=float, default=0.0, metavar="E",
                   help="skip (and report) a module whose largest |tuned - base| entry is at most E "
                        "(default 0: skip only identical layers; kohya's 0.01 is a TE-wide test)")
    p.add_argument("--text-encoder", action=argparse.BooleanOptionalAction, default=True,
                   help="extract the text encoders' layers too (default: yes)")
    p.add_argument("--dtype", default="fp16", help="output dtype: fp16 (default), bf16 or fp32")
    p.add_argument("--device", help="where ΔW is decomposed: cpu or cuda (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the report (every module's quality) as JSON")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("resize", help="resize a LoRA (any type; the output is a LoRA/LoCon) by a rank policy or a "
                                      "file size")
    p.add_argument("lora", help="the LoRA to resize")
    p.add_argument("--out", required=True, help="output .safetensors file")
    policy = p.add_mutually_exclusive_group(required=True)
    policy.add_argument("--rank", type=_positive_int, help="every module at this rank (its best rank-N approximation)")
    policy.add_argument("--threshold", type=float, metavar="T",
                        help="per module, the smallest rank keeping this fraction of ‖ΔW‖² (energy)")
    policy.add_argument("--sv-fro", type=float, metavar="F",
                        help="kohya's sv_fro: the smallest rank keeping this fraction of ‖ΔW‖_F (the norm; = --threshold F²)")
    policy.add_argument("--sv-ratio", type=float, metavar="R",
                        help="kohya's sv_ratio: keep every singular value ≥ σ_max / R")
    policy.add_argument("--sv-cumulative", type=float, metavar="C",
                        help="kohya's sv_cumulative: the smallest rank keeping this fraction of Σσ")
    policy.add_argument("--size-mib", type=float, metavar="M",
                        help="the largest single energy threshold (for all modules) whose file fits in M MiB")
    p.add_argument("--max-rank", type=_positive_int, metavar="N",
                   help="with a dynamic policy or --size-mib: at most this rank per module (kohya's new_rank limit)")
    p.add_argument("--dtype", help="output dtype: fp16, bf16 or fp32 (default: the source's)")
    p.add_argument("--device", help="where the math runs: cpu or cuda (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_output_checks(p)
    p.add_argument("--json", action="store_true", help="print the report (rank and energy per module) as JSON")
    p.set_defaults(func=_cmd_resize)
