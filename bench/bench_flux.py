"""Benchmark Flux: an svd merge of two rank-32 LoRAs against the dense route, and a bake against a copy.

Run from the repository root:  python bench/bench_flux.py [--rank 32] [--runs 3] [--double 2 --single 4]
                                                         [--skip-merge] [--skip-bake] [--workdir DIR]

1. Merge: two kohya Flux LoRAs on every transformer layer of Flux.1 (full width, 19 double and 38
   single blocks; rank 32 each, ≈300 MB in fp16) → ``merge --mode svd --rank 32`` in a fresh
   process, against the I/O floor (load both, save one) and the dense route (per module: form ΔW in
   fp32, ``torch.linalg.svd``, truncate — kohya's ``flux_merge_lora.py`` and the peers' way),
   sampled on ``--dense-samples`` modules per distinct shape and extrapolated by each shape's count.
   The dense SVD is the thin one (``full_matrices=False``; ``--kohya-full`` for kohya's full one,
   far slower on the 21504-row layers), so the ratio is a lower bound. Targets: dense/ours ≥ 200×,
   ours ≤ 2× the I/O floor.
2. Bake: a synthetic bf16 BFL single file with every key and shape of Flux.1 but only ``--double``
   double and ``--single`` single blocks (a documented fraction of the 23.8 GB file: the disk holds
   three copies of it), two rank-32 LoRAs on its layers; the bake (dtype kept) against a fresh
   process that loads and saves the file. Prints MiB/s, the per-GB time extrapolated to the full
   file, peak RSS. Target: bake ≤ 1.2× the copy.
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
from bench_merge import IO_FLOOR, factor_route  # noqa: E402
from common import ROOT, interleaved_rounds, machine, quiet_disk, run_once, spread  # noqa: E402

sys.path.insert(0, str(ROOT))

from lib_loramerge import fluxlayout  # noqa: E402
from lib_loramerge.formats.reader import read_lora  # noqa: E402

MAKE_LORA = """
import sys, torch
from lib_loramerge import fluxlayout
from lib_loramerge.formats.writer import save_lora
from lib_loramerge.model import LoraModule
out, rank, seed, double, single = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cfg = fluxlayout.FluxConfig(double_blocks=double, single_blocks=single)
gen = torch.Generator().manual_seed(seed)
modules = [LoraModule(name, (torch.randn(o, rank, generator=gen) * 0.05).half(),
                      (torch.randn(rank, i, generator=gen) * 0.05).half(), rank / 2)
           for name, (o, i) in fluxlayout.lora_modules(cfg).items()]
save_lora(modules, out, dtype=torch.float16, arch="flux")
"""

MAKE_CHECKPOINT = """
import sys, torch
from lib_loramerge import fluxlayout
from lib_loramerge.formats.safetensors_io import TensorSpec, write_safetensors
out, double, single = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = fluxlayout.FluxConfig(double_blocks=double, single_blocks=single)
specs = []
for i, (key, shape) in enumerate(fluxlayout.transformer_tensors(cfg)):
    def make(shape=shape, i=i):
        return torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.02
    specs.append(TensorSpec(key, torch.bfloat16, shape, make))
write_safetensors(out, specs, {}, overwrite=True)
"""

COPY = """
import sys
from safetensors.torch import load_file, save_file
save_file(load_file(sys.argv[1]), sys.argv[2])
"""


def make(script: str, out: Path, *args: object) -> Path:
    if not out.exists():
        subprocess.run([sys.executable, "-c", script, str(out), *map(str, args)], check=True, cwd=ROOT)
    return out


def dense_route(parts, rank: int, full: bool) -> float:
    start = time.perf_counter()
    delta = sum(s * m.scale * (m.up.float() @ m.down.float()) for m, s in parts)
    u, sv, vh = torch.linalg.svd(delta, full_matrices=full)
    _ = (u[:, :rank] * sv[:rank]) @ vh[:rank]
    return time.perf_counter() - start


def bench_merge(work: Path, tmp: str, args: argparse.Namespace) -> dict:
    a = make(MAKE_LORA, work / "flux_a.safetensors", args.rank, 1, 19, 38)
    b = make(MAKE_LORA, work / "flux_b.safetensors", args.rank, 2, 19, 38)
    out, io_out = work / "merged.safetensors", work / "io.safetensors"
    floor = work / "io_floor.py"
    floor.write_text(IO_FLOOR)
    merge = ["lib_loramerge", "merge", "--models", str(a), str(b), "--ratios", "1", "0.7", "--mode", "svd",
             "--rank", str(args.rank), "--dtype", "fp16", "--out", str(out), "--json"]
    warm = {"LORAMERGE_CACHE_DIR": str(work / "warm-cache")}
    run_once(merge, warm)
    steps = {"I/O floor": ([str(floor), str(a), str(b), str(io_out)], lambda: {}),
             "ours (warm hash cache)": (merge, lambda: warm),
             "ours (cold hash cache)": (merge, lambda: {"LORAMERGE_CACHE_DIR": tempfile.mkdtemp(dir=tmp)})}
    times, rss, printed = interleaved_rounds(steps, args.runs, (out, io_out))
    math_s = [json.loads(stdout)["timings"]["math"] for name, runs in printed.items() if name != "I/O floor"
              for _, stdout in runs]
    quiet_disk(out, io_out, pause=0)
    la, lb = read_lora(a, lazy=True), read_lora(b, lazy=True)
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name, m in la.modules.items():
        groups[m.weight_shape].append(name)
    dense_total = dense_sampled = ours_sampled = 0.0
    rows = []
    for shape, names in sorted(groups.items(), key=lambda kv: -math.prod(kv[0])):
        sample = names[: args.dense_samples]
        d = o = 0.0
        for name in sample:
            parts = [(la.modules[name].load(), 1.0), (lb.modules[name].load(), 0.7)]
            d += dense_route(parts, args.rank, args.kohya_full)
            o += factor_route(parts, args.rank)[1]
        dense_total += d / len(sample) * len(names)
        dense_sampled, ours_sampled = dense_sampled + d, ours_sampled + o
        rows.append((shape, len(names), d / len(sample), o / len(sample)))
    ours = statistics.median(math_s)
    print(f"Flux.1 kohya LoRAs: {len(la.modules)} modules, rank {args.rank} + {args.rank} -> {args.rank}, "
          f"{a.stat().st_size / 2**20:.0f} MiB each, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'layer shape':>14} {'modules':>8} {'dense s/module':>15} {'ours s/module':>14} {'ratio':>8}")
    for shape, count, dpm, opm in rows:
        print(f"{f'{shape[0]}x{shape[1]}':>14} {count:>8} {dpm:>15.4f} {opm:>14.5f} {dpm / opm:>8.0f}")
    print(f"dense route, all modules (extrapolated from {sum(min(len(n), args.dense_samples) for n in groups.values())} "
          f"sampled, full_matrices={args.kohya_full}): {dense_total:.1f} s")
    print(f"ours, merge math (median of the CLI runs): {ours:.2f} s;  dense / ours: {dense_total / ours:.0f}x "
          "(target >= 200x)")
    print(f"  like-for-like on the sampled modules (one at a time): {dense_sampled / ours_sampled:.0f}x")
    result = {"dense_total_s": dense_total, "merge_math_s": ours, "speed_ratio": dense_total / ours, "times": times,
              "rss_mib": rss}
    for name, values in times.items():
        print(f"{name:<24} {spread(values)} s   peak RSS {rss[name]:.0f} MiB")
    for name in list(steps)[1:]:
        ratios = [o / f for o, f in zip(times[name], times["I/O floor"], strict=True)]
        print(f"ratio {name} / I/O floor: {', '.join(f'{r:.2f}' for r in ratios)}x (target <= 2x)")
        result[f"ratio {name}"] = ratios
    return result


def bench_bake(work: Path, tmp: str, args: argparse.Namespace) -> dict:
    ckpt = make(MAKE_CHECKPOINT, work / f"flux_{args.double}d{args.single}s.safetensors", args.double, args.single)
    loras = [make(MAKE_LORA, work / f"bake_lora{s}.safetensors", args.rank, s, args.double, args.single)
             for s in (1, 2)]
    copy_script = work / "copy.py"
    copy_script.write_text(COPY)
    copy_out, bake_out = work / "copy.safetensors", work / "baked.safetensors"
    bake = ["lib_loramerge", "bake", "--checkpoint", str(ckpt), "--models", *map(str, loras), "--ratios", "0.8",
            "0.5", "--out", str(bake_out)]
    warm = {"LORAMERGE_CACHE_DIR": str(work / "warm-cache")}
    run_once(bake, warm)
    steps = {"copy": ([str(copy_script), str(ckpt), str(copy_out)], lambda: {}),
             "bake (warm hash cache)": (bake, lambda: warm),
             "bake (cold hash cache)": (bake, lambda: {"LORAMERGE_CACHE_DIR": tempfile.mkdtemp(dir=tmp)})}
    times: dict[str, list[float]] = {n: [] for n in steps}
    rss: dict[str, float] = {}
    for _ in range(args.runs):
        for name, (argv, env) in steps.items():
            quiet_disk(copy_out, bake_out)
            wall, peak, _ = run_once(argv, env())
            times[name].append(wall)
            rss[name] = max(rss.get(name, 0.0), peak)
    quiet_disk(copy_out, bake_out, pause=0)
    size = ckpt.stat().st_size
    full = sum(math.prod(s) * 2 for _, s in fluxlayout.transformer_tensors())
    largest = max(math.prod(s) for _, s in fluxlayout.transformer_tensors()) * 4 / 2**20
    print(f"bf16 BFL single file with {args.double} double + {args.single} single blocks: {size / 2**20:.0f} MiB "
          f"({100 * size / full:.1f} % of Flux.1's {full / 2**30:.1f} GiB); two rank-32 LoRAs on all its layers")
    result = {"checkpoint_mib": size / 2**20, "times": times, "rss_mib": rss}
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:<24} {spread(values)} s   {size / 2**20 / med:6.0f} MiB/s   "
              f"{med / (size / 2**30):.2f} s/GiB (full file ≈ {med * full / size:.0f} s)   peak RSS {rss[name]:.0f} MiB")
    for name in list(steps)[1:]:
        ratios = [b / c for b, c in zip(times[name], times["copy"], strict=True)]
        print(f"ratio {name} / copy: {', '.join(f'{r:.2f}' for r in ratios)}x (target <= 1.2x)")
        result[f"ratio {name}"] = ratios
    print(f"peak RSS of the bake {max(rss[n] for n in list(steps)[1:]):.0f} MiB; the largest tensor in fp32 is "
          f"{largest:.0f} MiB (target: well under 1 GiB above it)")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dense-samples", type=int, default=1, help="modules per distinct shape for the dense route")
    ap.add_argument("--kohya-full", action="store_true", help="the dense route's SVD with full_matrices=True")
    ap.add_argument("--double", type=int, default=2, help="double blocks of the bake's checkpoint (Flux.1: 19)")
    ap.add_argument("--single", type=int, default=4, help="single blocks of the bake's checkpoint (Flux.1: 38)")
    ap.add_argument("--skip-merge", action="store_true")
    ap.add_argument("--skip-bake", action="store_true")
    ap.add_argument("--workdir", type=Path, help="keep the inputs here (default: a temp folder)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not args.skip_merge:
            result["merge"] = bench_merge(work, tmp, args)
        if not args.skip_bake:
            result["bake"] = bench_bake(work, tmp, args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
