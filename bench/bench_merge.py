"""Benchmark: SVD-merge two SDXL rank-32 LoRAs into rank 32, against a dense baseline and the I/O floor.

Run from the repository root:  python bench/bench_merge.py [--rank 32] [--dense-samples 1] [--full-dense]

In one run it measures, on this machine:
1. the I/O floor: a fresh process that imports torch + safetensors, loads both inputs (every
   tensor read into memory) and saves an output of the same size — nothing else;
2. our merge: a fresh process running ``python -m lib_loramerge merge --mode svd --rank 32``;
3. the dense baseline kohya's svd_merge_lora and the seed use: per module form ΔW in fp32, run a
   full ``torch.linalg.svd`` (full_matrices=True) and truncate. By default it runs on
   ``--dense-samples`` modules of every distinct layer shape and is extrapolated by the shape's
   module count (``--full-dense`` runs every module; expect tens of minutes);
4. our factor-space SVD on exactly those sampled modules, for a like-for-like ratio, and the
   largest relative difference between the kept singular values of both routes.
It prints ratios (target: dense/ours ≥ 100 on CPU, ours/I-O floor ≤ 2) and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib_loramerge.formats.reader import read_lora  # noqa: E402
from lib_loramerge.ops.lowrank import factor_svd  # noqa: E402

IO_FLOOR = """
import sys
import torch
from safetensors.torch import load_file, save_file
a = {k: v.clone() for k, v in load_file(sys.argv[1]).items()}
b = {k: v.clone() for k, v in load_file(sys.argv[2]).items()}
save_file(a, sys.argv[3])
"""


_WRAPPER = """
import runpy, sys, time
t = time.perf_counter()
sys.argv = sys.argv[1:]
code = 0
try:
    if sys.argv[0].endswith(".py"):
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code or 0
# VmHWM is this process image's own peak (ru_maxrss would include the parent's at fork time)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print("BENCH", time.perf_counter() - t, hwm / 1024, file=sys.stderr)
sys.exit(code)
"""


def timed_process(argv: list[str], repeat: int = 3) -> tuple[float, float, str]:
    """(best wall seconds of ``repeat`` runs, peak RSS in MiB, stdout) of a fresh Python process."""
    best = None
    for _ in range(repeat):
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
        if r.returncode != 0:
            raise SystemExit(f"benchmark step failed: {' '.join(argv)}\n{r.stderr}")
        rss = float(next(line.split()[2] for line in r.stderr.splitlines() if line.startswith("BENCH")))
        if best is None or wall < best[0]:
            best = (wall, rss, r.stdout)
    return best


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
    start = time.perf_counter()
    ups = [s * m.scale * m.up.float().reshape(m.out_features, -1) for m, s in parts]
    downs = [m.down.float().reshape(m.rank, -1) for m, _ in parts]
    svd = factor_svd(torch.cat(ups, 1), torch.cat(downs, 0), rank)
    _ = svd.left[:, :rank] * svd.values[:rank].float(), svd.right[:rank]
    return svd.values[:rank], time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--dense-samples", type=int, default=1, help="modules per distinct shape for the dense route")
    ap.add_argument("--full-dense", action="store_true", help="run the dense route on every module")
    ap.add_argument("--workdir", type=Path, help="keep inputs here (default: a temp folder)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        a, b = make_inputs(work, args.rank)
        out = work / "merged.safetensors"
        io_wall, io_rss, _ = timed_process([str(_write_script(work)), str(a), str(b), str(work / "io_copy.safetensors")])
        ours_wall, ours_rss, stdout = timed_process(
            ["lib_loramerge", "merge", "--models", str(a), str(b), "--ratios", "1", "0.7", "--mode", "svd",
             "--rank", str(args.rank), "--dtype", "fp16", "--device", "cpu", "--out", str(out), "--overwrite"])
        merge_seconds = float(next(line.split()[1] for line in stdout.splitlines() if line.startswith("time:")))

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

    est = "measured" if args.full_dense else f"extrapolated from {sum(r[2] for r in rows)} sampled modules"
    print(f"SDXL kohya LoRA layout: {len(la.modules)} modules, rank {args.rank} + {args.rank} -> {args.rank}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'layer shape':>14} {'modules':>8} {'dense s/module':>15} {'ours s/module':>14} {'ratio':>8}")
    for shape, count, _, dense_pm, ours_pm in rows:
        print(f"{f'{shape[0]}x{shape[1]}':>14} {count:>8} {dense_pm:>15.4f} {ours_pm:>14.5f} {dense_pm / ours_pm:>8.0f}")
    print(f"dense baseline, all modules ({est}): {dense_total:.1f} s")
    print(f"ours, merge of all modules (in the CLI run): {merge_seconds:.2f} s")
    print(f"speed ratio dense / ours: {dense_total / merge_seconds:.0f}x   (target >= 100x)")
    print(f"  like-for-like on the sampled modules: {dense_sampled / ours_sampled:.0f}x")
    print(f"largest relative difference of kept singular values: {worst:.2e}")
    print(f"I/O floor (fresh process: import, load both inputs, save output): {io_wall:.2f} s, peak RSS {io_rss:.0f} MiB")
    print(f"ours (fresh process: python -m lib_loramerge merge ... --mode svd): {ours_wall:.2f} s, "
          f"peak RSS {ours_rss:.0f} MiB")
    print(f"time ratio ours / I/O floor: {ours_wall / io_wall:.2f}x   (target <= 2x)")
    print(f"peak RSS ratio ours / I/O floor: {ours_rss / io_rss:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({
            "dense_total_s": dense_total, "dense_estimated": not args.full_dense, "merge_s": merge_seconds,
            "speed_ratio": dense_total / merge_seconds, "max_rel_sv_diff": worst, "io_floor_s": io_wall,
            "ours_s": ours_wall, "io_ratio": ours_wall / io_wall, "ours_rss_mib": ours_rss, "io_rss_mib": io_rss,
        }, indent=2))


def _write_script(folder: Path) -> Path:
    script = folder / "io_floor.py"
    script.write_text(IO_FLOOR)
    return script


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
