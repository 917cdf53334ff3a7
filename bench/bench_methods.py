"""Benchmark: aligned (core-space) TIES of two SDXL rank-32 LoRAs → rank 32 against dense TIES + full SVD,
and ``analyze`` of the same two LoRAs against the time it takes just to read them.

Run from the repository root:  python bench/bench_methods.py [--rank 32] [--dense-samples 1] [--device cpu] [--runs 3]

1. two SDXL LoRAs (every attention layer, rank ``--rank``, fp16) are written to a temp folder;
2. read: both files read into memory (every module's factors loaded and checked), in this process;
3. analyze: :func:`lib_loramerge.ops.analyze.analyze_loras` on both (lazily read, so its time includes reading);
4. aligned TIES: the whole merge (``--method ties``, density 0.2, svd to ``--rank``) in memory;
5. dense TIES: ΔW per module in fp32, element-wise TIES, full ``torch.linalg.svd`` — run on
   ``--dense-samples`` modules of every distinct layer shape and extrapolated by the shape's module count.
It prints the times and the ratios dense/aligned (target ≥ 10) and analyze/read (target < 2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine  # noqa: E402

sys.path.insert(0, str(ROOT))

from lib_loramerge.formats.reader import read_lora  # noqa: E402
from lib_loramerge.formats.writer import save_lora  # noqa: E402
from lib_loramerge.ops import inner  # noqa: E402
from lib_loramerge.ops.analyze import analyze_loras  # noqa: E402
from lib_loramerge.ops.merge import MergeInput, MergeOptions, merge_loras  # noqa: E402
from lib_loramerge.ops.methods import MethodSpec, dense_merge  # noqa: E402
from lib_loramerge.synthetic import random_modules  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--dense-samples", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {machine()}; torch {torch.__version__}; device {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for seed in (1, 2):
            modules = random_modules("sdxl", scope="attention", rank=args.rank, alpha=args.rank / 2, seed=seed, std=0.05)
            path = Path(tmp) / f"sdxl_r{args.rank}_{seed}.safetensors"
            save_lora(modules, path, dtype=torch.float16, arch="sdxl")
            paths.append(path)
        reads, analyses = [], []
        for _ in range(args.runs):  # interleaved rounds, medians: the machine may be shared
            started = time.perf_counter()
            eager = [{k: m.load() for k, m in read_lora(p, lazy=True).modules.items()} for p in paths]
            reads.append(time.perf_counter() - started)
            del eager
            started = time.perf_counter()
            analysis = analyze_loras([read_lora(p, lazy=True) for p in paths], device=args.device)
            analyses.append(time.perf_counter() - started)
        read, analyzed = statistics.median(reads), statistics.median(analyses)
        loras = [read_lora(p, lazy=True) for p in paths]
        started = time.perf_counter()
        result = merge_loras([MergeInput(x) for x in loras],
                             MergeOptions(rank=args.rank, device=args.device, method=MethodSpec("ties")))
        aligned = time.perf_counter() - started
        by_shape: dict[tuple[int, int], list[str]] = defaultdict(list)
        for name, m in loras[0].modules.items():
            by_shape[(m.out_features, m.in_features * (m.kernel_size[0] * m.kernel_size[1] if m.kernel_size else 1))
                     ].append(name)
        dense_total = 0.0
        for shape, names in sorted(by_shape.items()):
            times = []
            for name in names[:args.dense_samples]:
                pairs = [inner.scaled_pair(x.modules[name], 1.0, args.device) for x in loras]
                started = time.perf_counter()
                dense_merge(pairs, "ties-dense", 0.2)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            per = sum(times) / len(times)
            dense_total += per * len(names)
            print(f"  dense TIES {shape[0]}×{shape[1]}: {per:.3f} s × {len(names)} modules")
    print(f"modules: {result.report.modules_out}; read both: {read:.2f} s; analyze: {analyzed:.2f} s "
          f"(analyze/read {analyzed / read:.2f}, target < 2); cosine overall {analysis.total.cosine(0, 1):+.4f}")
    print(f"aligned TIES → rank {args.rank}: {aligned:.2f} s; dense TIES + full SVD (extrapolated): "
          f"{dense_total:.1f} s; ratio dense/aligned {dense_total / aligned:.0f}×")


if __name__ == "__main__":
    main()
