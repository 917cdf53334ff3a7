"""Benchmark: SVD-merge two SDXL rank-32 LoRAs into rank 32, against a dense baseline and the I/O floor.

Run from the repository root:  python bench/bench_merge.py [--rank 32] [--runs 3] [--dense-samples 1] [--full-dense]

In one run it measures, on this machine, in interleaved rounds (each step on a quiet disk):
1. the I/O floor: a fresh process that imports torch + safetensors, loads both inputs (every
   tensor read into memory) and saves an output of the same size — nothing else; and the same
   ending as our CLI ends, without the interpreter's teardown of torch (~0.3 s), the stricter floor;
2. our merge: a fresh process running ``python -m lib_loramerge merge --mode svd --rank 32``, with
   an empty hash cache (cold: the inputs are hashed for the recipe) and a filled one (warm), and
   the split of its time (start-up/import, read, math, write) from its ``--json`` report;
3. the dense baseline kohya's svd_merge_lora and the seed use: per module form ΔW in fp32, run a
   full ``torch.linalg.svd`` (full_matrices=True) and truncate. By default it runs on
   ``--dense-samples`` modules of every distinct layer shape and is extrapolated by the shape's
   module count (``--full-dense`` runs every module; expect tens of minutes);
4. our route on exactly those sampled modules, one at a time, for a like-for-like ratio, and the
   largest relative difference between the kept singular values of both routes.
It prints medians with min–max and ratios per round (targets: dense/ours ≥ 100 on CPU, merge math
≤ 0.6 s, ours/I-O floor ≤ 1.3, kept singular values within 2e-6 of the dense route) and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, interleaved_rounds, machine, quiet_disk, run_once, spread  # noqa: E402

sys.path.insert(0, str(ROOT))

from lib_loramerge.formats.reader import read_lora  # noqa: E402
from lib_loramerge.ops.lowrank import batched_svd, factor_svd  # noqa: E402

IO_FLOOR = """
import sys
import torch
from safetensors.torch import load_file, save_file
a = {k: v.clone() for k, v in load_file(sys.argv[1]).items()}
b = {k: v.clone() for k, v in load_file(sys.argv[2]).items()}
save_file(a, sys.argv[3])
if len(sys.argv) > 4:  # end as our CLI does: without the interpreter's teardown of torch
    import os
    os._exit(0)
"""


MAKE_INPUT = """
import sys, torch
from lib_loramerge.formats.writer import save_lora
from lib_loramerge.synthetic import random_modules
rank, seed = int(sys.argv[2]), int(sys.argv[3])
modules = random_modules("sdxl", scope="attention", rank=rank, alpha=rank / 2, seed=seed, std=0.05)
save_lora(modules, sys.argv[1], dtype=torch.float16, arch="sdxl")  # kohya metadata with sshs hashes
"""


def make_inputs(folder: Path, rank: int) -> list[Path]:
    """Two SDXL kohya LoRAs (every module of the layout), made in a child process to keep this one small."""
    paths = []
    for seed in (1, 2):
        path = folder / f"sdxl_r{rank}_{seed}.safetensors"
        if not path.exists():
            subprocess.run([sys.executable, "-c", MAKE_INPUT, str(path), str(rank), str(seed)], check=True, cwd=ROOT)
        paths.append(path)
    return paths


def dense_baseline(parts, rank: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    delta = sum(s * m.scale * (m.up.float().reshape(m.out_features, -1) @ m.down.float().reshape(m.rank, -1))
                for m, s in parts)
    u, sv, vh = torch.linalg.svd(delta)  # what kohya's svd_merge_lora does (full_matrices=True)
    _ = (u[:, :rank] * sv[:rank]) @ vh[:rank]
    return sv[:rank].double(), time.perf_counter() - start


def factor_route(parts, rank: int) -> tuple[torch.Tensor, float]:
    """What the merge runs for one module: the factors stacked as read, the balanced strength scales applied to
    the Grams by the batched fp32-Gram route (batch of one); float64 on the scaled stack if it declines."""
    start = time.perf_counter()
    up = torch.cat([m.up.float().reshape(m.out_features, -1) for m, _ in parts], 1)
    down = torch.cat([m.down.float().reshape(m.rank, -1) for m, _ in parts], 0)
    roots = [math.sqrt(abs(s * m.scale)) for m, s in parts]
    signed = [math.copysign(r, s * m.scale) for r, (m, s) in zip(roots, parts, strict=True)]
    up_scale = torch.tensor([r for r, (m, _) in zip(signed, parts, strict=True) for _ in range(m.rank)], dtype=torch.float64)
    down_scale = torch.tensor([r for r, (m, _) in zip(roots, parts, strict=True) for _ in range(m.rank)], dtype=torch.float64)
    batch = batched_svd(up[None], down[None], [rank], 0.0, (up_scale[None], down_scale[None]))
    if batch.accepted:
        left, right = batch.vectors(rank)
        values = batch.values[0]
        _ = left[0] * values[:rank].float(), right[0]
    else:
        svd = factor_svd(up * up_scale.float(), down_scale.float()[:, None] * down, rank)
        values = svd.values
        _ = svd.left[:, :rank] * svd.values[:rank].float(), svd.right[:rank]
    return values[:rank], time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="rounds of (I/O floor, ours cold, ours warm)")
    ap.add_argument("--dense-samples", type=int, default=1, help="modules per distinct shape for the dense route")
    ap.add_argument("--full-dense", action="store_true", help="run the dense route on every module")
    ap.add_argument("--device", default="cpu", help="where our merge runs (cpu or cuda)")
    ap.add_argument("--workdir", type=Path, help="keep inputs here (default: a temp folder)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        a, b = make_inputs(work, args.rank)
        out, io_out = work / "merged.safetensors", work / "io_copy.safetensors"
        merge_argv = ["lib_loramerge", "merge", "--models", str(a), str(b), "--ratios", "1", "0.7", "--mode", "svd",
                      "--rank", str(args.rank), "--dtype", "fp16", "--device", args.device, "--out", str(out), "--json"]
        warm = {"LORAMERGE_CACHE_DIR": str(work / "warm-cache")}
        floor = [str(_write_script(work)), str(a), str(b), str(io_out)]
        steps = {"I/O floor": (floor, lambda: {}),
                 "I/O floor, no teardown": ([*floor, "skip-teardown"], lambda: {}),
                 "ours (cold hash cache)": (merge_argv, lambda: {"LORAMERGE_CACHE_DIR": tempfile.mkdtemp(dir=tmp)}),
                 "ours (warm hash cache)": (merge_argv, lambda: warm)}
        quiet_disk(out, io_out, pause=0)
        run_once(merge_argv, warm)  # fills the warm cache
        times, rss, printed = interleaved_rounds(steps, args.runs, (out, io_out))
        splits: dict[str, list[dict]] = {name: [] for name in steps}
        for name, runs in printed.items():
            for wall, stdout in runs if name.startswith("ours") else ():
                timings = json.loads(stdout)["timings"]
                splits[name].append({"start-up/import": wall - timings["total"], **timings})
        merge_seconds = statistics.median(s["math"] for s in splits["ours (cold hash cache)"])

        la, lb = read_lora(a), read_lora(b)
        groups: dict[tuple[int, int], list[str]] = defaultdict(list)
        for name, m in la.modules.items():
            groups[(m.out_features, math.prod(m.weight_shape[1:]))].append(name)
        dense_total = ours_sampled = dense_sampled = 0.0
        worst = 0.0
        rows = []
        for shape, names in sorted(groups.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
            sample = names if args.full_dense else names[: args.dense_samples]
            d_time = o_time = 0.0
            for name in sample:
                parts = [(la.modules[name], 1.0), (lb.modules[name], 0.7)]
                sv_dense, dt = dense_baseline(parts, args.rank)
                sv_ours, ot = factor_route(parts, args.rank)
                worst = max(worst, float(((sv_ours - sv_dense).abs() / sv_dense).max()))
                d_time += dt
                o_time += ot
            per_module = d_time / len(sample)
            dense_total += per_module * len(names)
            dense_sampled += d_time
            ours_sampled += o_time
            rows.append((shape, len(names), len(sample), per_module, o_time / len(sample)))
        quiet_disk(out, io_out, pause=0)

    est = "measured" if args.full_dense else f"extrapolated from {sum(r[2] for r in rows)} sampled modules"
    print(f"machine: {machine()}")
    print(f"SDXL kohya LoRA layout: {len(la.modules)} modules, rank {args.rank} + {args.rank} -> {args.rank}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.runs} rounds, device {args.device}")
    print(f"{'layer shape':>14} {'modules':>8} {'dense s/module':>15} {'ours s/module':>14} {'ratio':>8}")
    for shape, count, _, dense_pm, ours_pm in rows:
        print(f"{f'{shape[0]}x{shape[1]}':>14} {count:>8} {dense_pm:>15.4f} {ours_pm:>14.5f} {dense_pm / ours_pm:>8.0f}")
    print(f"dense baseline, all modules ({est}): {dense_total:.1f} s")
    print(f"ours, merge math of all modules (median of the cold CLI runs): {merge_seconds:.2f} s   (target <= 0.6 s)")
    print(f"speed ratio dense / ours: {dense_total / merge_seconds:.0f}x   (target >= 100x)")
    print(f"  like-for-like on the sampled modules (one module at a time, no batching): "
          f"{dense_sampled / ours_sampled:.0f}x")
    print(f"largest relative difference of kept singular values: {worst:.2e}   (target <= 2e-6)")
    for name, values in times.items():
        print(f"{name:<24} {spread(values)} s   peak RSS {rss[name]:.0f} MiB")
        if splits[name]:
            keys = list(splits[name][0])
            print("    split: " + ", ".join(f"{k} {statistics.median(s[k] for s in splits[name]):.2f}" for k in keys))
    result = {"dense_total_s": dense_total, "dense_estimated": not args.full_dense, "merge_math_s": merge_seconds,
              "speed_ratio": dense_total / merge_seconds, "max_rel_sv_diff": worst, "times": times, "rss_mib": rss,
              "splits": splits}
    ours = [name for name in steps if name.startswith("ours")]
    for floor_name in ("I/O floor", "I/O floor, no teardown"):
        for name in ours:
            ratios = [o / f for o, f in zip(times[name], times[floor_name], strict=True)]
            print(f"ratio {name} / {floor_name}, per round: {', '.join(f'{r:.2f}' for r in ratios)}x   "
                  f"(median {statistics.median(ratios):.2f}x; target <= 1.3x)")
            result[f"ratio {name} / {floor_name}"] = ratios
    print(f"peak RSS: ours {max(rss[n] for n in ours):.0f} MiB, I/O floor {rss['I/O floor']:.0f} MiB "
          "(target: ours <= the floor's)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def _write_script(folder: Path) -> Path:
    script = folder / "io_floor.py"
    script.write_text(IO_FLOOR)
    return script


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
