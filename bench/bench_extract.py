"""Benchmark: extract a rank-32 LoRA from two SDXL checkpoints, and resize an SDXL rank-128 LoRA to rank 32,
against the dense full-SVD routes kohya's scripts take.

Run from the repository root:  python bench/bench_extract.py [--rank 32] [--runs 3] [--workdir DIR]
                                   [--dense-samples 1] [--from-memory] [--skip-extract] [--skip-resize]

In one run it measures, on this machine:
1. inputs (made once in a child process, kept in --workdir): two fp16 checkpoints with every key and
   shape of SDXL base (UNet and both text encoders; no VAE, which extraction never reads), 6.8 GB
   each. base: N(0, 0.02²). tuned = base + ΔW on every layer kohya's extract targets (986 modules),
   ΔW = a rank-128 part with σᵢ ∝ i^-0.6 (70 % of ‖ΔW‖²) + i.i.d. noise (30 %), rms 2e-3 (a tenth of
   the weights'): a fine-tune that is not exactly low rank, so rank 32 keeps about 60 % of it;
2. ours: a fresh process running ``python -m lib_loramerge extract --rank 32 --json`` with a filled
   hash cache (every round) and once with an empty one (both checkpoints hashed for the recipe):
   wall time, peak RSS, the split of its time, and the quality its report gives (retained energy,
   estimated excess);
3. the dense route of kohya's extract_lora_from_models.py, per layer: read both tensors, ΔW in fp32,
   ``torch.linalg.svd`` (full_matrices=True), keep 32 — on ``--dense-samples`` modules of every layer
   shape, timed at torch's default thread count and at 1 thread (the faster counts, in its favour),
   extrapolated by the shape's module count; on the same modules our route (read, ΔW, sketch, one
   thread) and its error against the optimal rank-32 error from a float64 SVD of that ΔW;
4. resize: an SDXL rank-128 LoRA (every attention module, fp16) to rank 32 with
   ``python -m lib_loramerge resize --rank 32 --json`` (its math time, and end to end), against
   kohya's resize_lora.py route (ΔW = up @ down, full SVD, keep 32) sampled and extrapolated
   likewise (the faster of both thread counts).
Each comparison runs in interleaved rounds (``--runs``, default 3: the dense estimate, then our
run), so that a busy spell of this shared machine weighs on both; ratios are given per round.
Targets: extract ≥ 20× faster end to end than the dense route, within 1 % of the optimal error on
every module, peak RSS ≤ 1.5 GB; resize ≥ 200×.

When the disk cannot hold the two checkpoints (13.6 GB), or with ``--from-memory``, the same two
checkpoints are served from memory instead, through the reader interface the extraction uses
(``TensorFile``): every key and shape of SDXL, base and tuned tensors made once per layer shape and
copied out on each read (as from the page cache). Both routes then read no disk, so the time this
disk takes to read the 11.7 GB both routes read (its measured throughput on a 1 GiB file, direct
I/O) is added to each, in full (no overlap assumed); ours runs the extraction engine and the LoRA
writer in a fresh process, its peak RSS counted from the job's start less the served tensors, and
the sha256 of both checkpoints (what a cold hash cache costs the recipe) is timed on this CPU and
shown added too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, quiet_disk, run_once  # noqa: E402

sys.path.insert(0, str(ROOT))

from lib_loramerge import sdlayouts  # noqa: E402
from lib_loramerge.bake.keymap import CheckpointLayout  # noqa: E402
from lib_loramerge.formats.tensorfile import open_tensor_file  # noqa: E402
from lib_loramerge.ops.lowrank import split_factors  # noqa: E402
from lib_loramerge.ops.sketch import sketched_svd  # noqa: E402
from lib_loramerge.runtime import torch_threads  # noqa: E402

CHECKPOINT_BYTES = 2 * 3_385_000_000  # fp16 SDXL base without VAE, about


def synthetic_delta(shape: tuple[int, int], seed: int, rank: int = 128, power: float = 0.6, noise_share: float = 0.3,
                    rms: float = 2e-3) -> torch.Tensor:
    """A fine-tune-like ΔW: rank-``rank`` part with σᵢ ∝ i^-power, plus i.i.d. noise with ``noise_share`` of the energy."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    s = torch.arange(1, rank + 1, dtype=torch.float32) ** -power
    low = (torch.randn(m, rank, generator=g) * s) @ torch.randn(rank, n, generator=g)
    low *= math.sqrt(1 - noise_share) / float(low.square().mean().sqrt())
    low += torch.randn(m, n, generator=g) * math.sqrt(noise_share)
    return low.mul_(rms)


def make_checkpoints(folder: Path) -> None:
    """base and tuned (see the module docstring), written tensor by tensor."""
    from lib_loramerge.formats.safetensors_io import TensorSpec, write_safetensors
    from lib_loramerge.synthetic import write_random_checkpoint

    base = folder / "sdxl_base.safetensors"
    if not base.exists():
        write_random_checkpoint(base, "sdxl", dtype=torch.float16, vae=False, seed=1)
    tuned = folder / "sdxl_tuned.safetensors"
    if tuned.exists():
        return
    tf = open_tensor_file(base)
    layout = CheckpointLayout({k: i.shape for k, i in tf.infos.items()})
    regions = defaultdict(list)
    for i, name in enumerate(sdlayouts.lora_modules("sdxl", sdlayouts.SCOPE_ATTENTION)):
        target = layout.target(name)
        regions[target.key].append((target, 1000 + i))

    def patched(key: str):
        def make() -> torch.Tensor:
            w = tf.get(key).float()
            for target, seed in regions[key]:
                rows = w if target.rows is None else w[target.rows[0]:target.rows[1]]
                shape = target.weight_shape
                rows += synthetic_delta((shape[0], math.prod(shape[1:])), seed).reshape(rows.shape)
            return w
        return make

    specs = [TensorSpec(k, i.dtype, i.shape, patched(k) if k in regions else tf.byte_range(k))
             for k, i in tf.infos.items()]
    write_safetensors(tuned, specs, {}, overwrite=True, prefetch=2)


class MemoryTensors:
    """A checkpoint's tensors made on demand: one base (and one ΔW) per layer shape, copied out on each read."""

    def __init__(self, infos: dict, regions: dict, tuned: bool):
        self.infos, self.regions, self.tuned = infos, regions, tuned
        self.cache: dict = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        info = self.infos[key]
        signature = (info.shape, tuple((t.rows, t.weight_shape) for t in self.regions.get(key, ())), self.tuned)
        if signature not in self.cache:
            g = torch.Generator().manual_seed(hash(info.shape) % 2**31)
            w = (torch.randn(info.shape, generator=g) * 0.02) if info.dtype.is_floating_point else torch.zeros(
                info.shape, dtype=info.dtype)
            if self.tuned:
                for i, target in enumerate(self.regions.get(key, ())):
                    rows = w if target.rows is None else w[target.rows[0]:target.rows[1]]
                    shape = (target.weight_shape[0], math.prod(target.weight_shape[1:]))
                    rows += synthetic_delta(shape, 1000 + i).reshape(rows.shape)
            self.cache[signature] = w.to(info.dtype)
        return self.cache[signature].clone()


def memory_pair() -> dict[str, object]:
    """'base' and 'tuned' as TensorFiles with SDXL's keys and shapes, their tensors made in memory."""
    from lib_loramerge.formats.tensorfile import TensorFile, TensorInfo

    infos = {k: TensorInfo(torch.int64 if sdlayouts.is_integer_tensor(k) else torch.float16, s)
             for k, s in sdlayouts.checkpoint_tensors("sdxl")}
    layout = CheckpointLayout({k: i.shape for k, i in infos.items()})
    regions = defaultdict(list)
    for name in sdlayouts.lora_modules("sdxl", sdlayouts.SCOPE_ATTENTION):
        target = layout.target(name)
        regions[target.key].append(target)
    return {name: TensorFile(Path(f"{name}.safetensors"), infos, {}, "memory",
                             tensors=MemoryTensors(infos, regions, tuned=name == "tuned")) for name in ("base", "tuned")}


MEMORY_EXTRACT = """
import json, sys, time
started = time.perf_counter()
sys.path[:0] = ["bench", "."]
import bench_extract
import lib_loramerge.bake.extract as extract
from lib_loramerge.formats.writer import save_lora
imported = time.perf_counter()
pair = bench_extract.memory_pair()
served = bench_extract.fill(pair)  # the served checkpoints' tensors, made before the job
def status(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) / 1024
resident = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # peak RSS from here on: the job's, plus what is resident now
    f.write("5")
extract.open_tensor_file = lambda path: pair[str(path)]
begin = time.perf_counter()
result = extract.extract_lora("base", "tuned", extract.ExtractOptions(rank=int(sys.argv[2])))
middle = time.perf_counter()
save_lora(result.modules, sys.argv[1], arch="sdxl", overwrite=True)
end = time.perf_counter()
print(json.dumps({"summary": result.report.summary(), "extract": middle - begin, "write": end - middle,
                  "start-up": imported - started, "peak_mib": status("VmHWM"), "resident_mib": resident,
                  "served_mib": served / 2**20}))
"""


def fill(pair: dict) -> int:
    """Make every tensor the extraction will read (cached per shape); returns the bytes held."""
    layout = CheckpointLayout({k: i.shape for k, i in pair["base"].infos.items()})
    keys = {layout.target(n).key for n in sdlayouts.lora_modules("sdxl", sdlayouts.SCOPE_ATTENTION)}
    for tf in pair.values():
        for key in keys:
            tf.get(key)
    return sum(t.numel() * t.element_size() for tf in pair.values() for t in tf._tensors.cache.values())


def hash_seconds(nbytes: int) -> tuple[float, float]:
    """(seconds sha256 takes for ``nbytes`` on this CPU, GB/s), from 256 MiB hashed in memory."""
    import hashlib

    data = os.urandom(1 << 20) * 256
    started = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    rate = len(data) / (time.perf_counter() - started)
    return nbytes / rate, rate / 1e9


def disk_read_seconds(folder: Path, nbytes: int) -> tuple[float, float]:
    """(seconds this disk takes to read ``nbytes``, its throughput in GB/s), from a 1 GiB file read with O_DIRECT."""
    probe = folder / "read-probe.bin"
    block = 1 << 20
    with open(probe, "wb") as f:
        for _ in range(1024):
            f.write(os.urandom(block))
    os.sync()
    try:
        fd = os.open(probe, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        import mmap

        buf = mmap.mmap(-1, block)
        started = time.perf_counter()
        while os.readv(fd, [buf]):
            pass
        seconds = time.perf_counter() - started
        os.close(fd)
    finally:
        probe.unlink()
    rate = (1024 * block) / seconds
    return nbytes / rate, rate / 1e9


MAKE_LORA = """
import sys, torch
from lib_loramerge.formats.writer import save_lora
from lib_loramerge.synthetic import random_modules
modules = random_modules("sdxl", scope="attention", rank=int(sys.argv[2]), alpha=int(sys.argv[2]) / 2, seed=3, std=0.05)
save_lora(modules, sys.argv[1], dtype=torch.float16, arch="sdxl")
"""


def layer_groups(base) -> dict[tuple[int, int], list]:
    """(out, in·kh·kw) → the modules of that shape, as (name, checkpoint key, rows), largest total first."""
    layout = CheckpointLayout({k: i.shape for k, i in base.infos.items()})
    groups: dict[tuple[int, int], list] = defaultdict(list)
    for name in sdlayouts.lora_modules("sdxl", sdlayouts.SCOPE_ATTENTION):
        t = layout.target(name)
        groups[(t.weight_shape[0], math.prod(t.weight_shape[1:]))].append((name, t.key, t.rows))
    return dict(sorted(groups.items(), key=lambda kv: -kv[0][0] * kv[0][1] * len(kv[1])))


def read_delta(base, tuned, key: str, rows) -> torch.Tensor:
    delta = tuned.get(key).float() - base.get(key).float()
    return delta if rows is None else delta[rows[0]:rows[1]]


def dense_extract(base, tuned, key, rows, rank: int) -> float:
    """kohya's per-layer route: ΔW in fp32, full SVD, truncate (seconds)."""
    start = time.perf_counter()
    delta = read_delta(base, tuned, key, rows)
    u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1))
    _ = u[:, :rank] * s[:rank], vh[:rank]
    return time.perf_counter() - start


def dense_round(base, tuned, groups, rank: int, samples: int) -> tuple[float, dict]:
    """(the dense route's time for every module, extrapolated; seconds per module by shape), the faster of
    torch's default thread count and one thread for each sample (in the dense route's favour)."""
    total, per_shape = 0.0, {}
    for shape, modules in groups.items():
        times = []
        for _, key, region in modules[:samples]:
            default = dense_extract(base, tuned, key, region, rank)
            with torch_threads(1):
                times.append(min(default, dense_extract(base, tuned, key, region, rank)))
        per_shape[shape] = sum(times) / len(times)
        total += per_shape[shape] * len(modules)
    return total, per_shape


def sampled_quality(base, tuned, groups, rank: int, samples: int) -> tuple[dict, float, float]:
    """Our route on the sampled modules, one thread (seconds per module by shape), and the largest true excess
    over the optimal rank-k error (from a float64 SVD of the same ΔW) and largest estimate there."""
    per_shape, worst, worst_estimate = {}, 0.0, 0.0
    with torch_threads(1):
        for shape, modules in groups.items():
            times = []
            for _, key, region in modules[:samples]:
                start = time.perf_counter()
                delta = read_delta(base, tuned, key, region)
                sketch = sketched_svd(delta.reshape(shape), rank)
                up, down = split_factors(sketch.svd, rank)
                times.append(time.perf_counter() - start)
                exact = delta.double().reshape(shape)
                optimal = float(torch.linalg.svdvals(exact)[rank:].square().sum().sqrt())
                worst = max(worst, float((exact - up.double() @ down.double()).norm()) / optimal - 1)
                worst_estimate = max(worst_estimate, sketch.excess(rank) or 0.0)
            per_shape[shape] = sum(times) / len(times)
    return per_shape, worst, worst_estimate


def bench_extract(args, work: Path, tmp: str) -> dict:
    need = 2 * CHECKPOINT_BYTES + (1 << 30)
    base_path, tuned_path = work / "sdxl_base.safetensors", work / "sdxl_tuned.safetensors"
    have = base_path.exists() and tuned_path.exists()
    free = shutil.disk_usage(work).free
    memory = args.from_memory or (not have and free < need)
    if memory and not args.from_memory:
        print(f"{work}: {free / 2**30:.1f} GiB free, the two checkpoints need {need / 2**30:.1f} GiB: "
              "served from memory instead (see the docstring)")
    if not memory and not have:
        started = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--make-checkpoints", str(work)], check=True, cwd=ROOT)
        print(f"made the two checkpoints in {time.perf_counter() - started:.0f} s")
    out = work / "extracted.safetensors"
    extra_io = hash_cost = 0.0
    if memory:
        pair = memory_pair()
        base, tuned = pair["base"], pair["tuned"]
        script = work / "memory_extract.py"
        script.write_text(MEMORY_EXTRACT)
        keys = {key for modules in layer_groups(base).values() for _, key, _ in modules}
        read_bytes = sum(2 * math.prod(base.infos[k].shape) * 2 for k in keys)  # both checkpoints, fp16
        extra_io, rate = disk_read_seconds(work, read_bytes)
        hash_cost, hash_rate = hash_seconds(2 * CHECKPOINT_BYTES)

        def ours(cold: bool) -> tuple[float, float, dict]:
            r = json.loads(run_once([str(script), str(out), str(args.rank)])[2])
            wall = r["start-up"] + r["extract"] + r["write"] + extra_io + (hash_cost if cold else 0.0)
            return wall, r["peak_mib"] - r["served_mib"], {"summary": r["summary"], "timings": {
                "start-up": r["start-up"], "extract": r["extract"], "write": r["write"]}}
    else:
        base, tuned = open_tensor_file(base_path), open_tensor_file(tuned_path)
        argv = ["lib_loramerge", "extract", "--base", str(base_path), "--tuned", str(tuned_path), "--rank",
                str(args.rank), "--device", "cpu", "--out", str(out), "--json"]
        warm = {"LORAMERGE_CACHE_DIR": str(work / "warm-cache")}
        run_once(argv, warm)  # fills the warm hash cache (and the page cache)

        def ours(cold: bool) -> tuple[float, float, dict]:
            env = {"LORAMERGE_CACHE_DIR": tempfile.mkdtemp(dir=tmp)} if cold else warm
            wall, rss, stdout = run_once(argv, env)
            return wall, rss, json.loads(stdout)

    groups = layer_groups(base)
    rounds = []
    for _ in range(args.runs):  # interleaved, so that a busy spell of this shared machine hits both routes
        dense, per_shape = dense_round(base, tuned, groups, args.rank, args.dense_samples)
        dense += extra_io
        quiet_disk(out)
        wall, rss, report = ours(cold=False)
        rounds.append((dense, per_shape, wall, rss, report))
    quiet_disk(out)
    cold_wall, cold_rss, _ = ours(cold=True)
    quiet_disk(out, pause=0)
    ours_per_shape, worst, worst_estimate = sampled_quality(base, tuned, groups, args.rank, args.dense_samples)

    dense_median = statistics.median(r[0] for r in rounds)
    walls = [r[2] for r in rounds]
    ratios = [r[0] / r[2] for r in rounds]
    summary, timings = rounds[-1][4]["summary"], rounds[-1][4]["timings"]
    source = ("served from memory (not enough disk); each route charged the measured disk read "
              f"of {extra_io:.1f} s" if memory else f"{base_path.stat().st_size / 2**30:.1f} + "
              f"{tuned_path.stat().st_size / 2**30:.1f} GiB files")
    print(f"\n== extract: SDXL, {sum(len(m) for m in groups.values())} modules, rank {args.rank}, fp16 checkpoints: "
          f"{source} ==")
    print(f"{'layer shape':>14} {'modules':>8} {'dense s/module':>15} {'ours s/module':>14} {'ratio':>7}")
    for shape, modules in groups.items():
        d = statistics.median(r[1][shape] for r in rounds)
        print(f"{f'{shape[0]}x{shape[1]}':>14} {len(modules):>8} {d:>15.3f} {ours_per_shape[shape]:>14.4f} "
              f"{d / ours_per_shape[shape]:>7.0f}")
    print(f"dense route, all modules (extrapolated from {sum(min(len(m), args.dense_samples) for m in groups.values())} "
          f"sampled, per round): {', '.join(f'{r[0]:.0f}' for r in rounds)} s")
    print(f"ours, end to end in a fresh process (warm hash cache), per round: {', '.join(f'{w:.1f}' for w in walls)} s "
          f"(split of the last: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + ")")
    print(f"speed ratio dense / ours, per round: {', '.join(f'{x:.1f}' for x in ratios)}x   "
          f"(median {statistics.median(ratios):.1f}x; target >= 20x)")
    print("ours with a cold hash cache (both checkpoints hashed for the recipe"
          + (f", sha256 at {hash_rate:.2f} GB/s added in full" if memory else "") + f"): {cold_wall:.1f} s, "
          f"{dense_median / cold_wall:.1f}x the median dense route")
    peak = max(max(r[3] for r in rounds), cold_rss)
    print(f"peak RSS of ours: {peak:.0f} MiB   (target <= 1536 MiB" + ("; the served tensors not counted)" if memory
                                                                       else ")"))
    print(f"quality (our report, every module): retained min {summary['retained_min']:.4f} mean "
          f"{summary['retained_mean']:.4f}; estimated excess over the optimal rank-{args.rank} error max "
          f"{100 * summary['excess_max']:.3f} % ({summary['excess_over_1_percent']} modules above 1 %, "
          f"{summary['excess_resolved']} resolved)")
    print(f"sampled modules: true excess over the optimal rank-{args.rank} error (float64 SVD) max {100 * worst:.3f} %, "
          f"our estimate there max {100 * worst_estimate:.3f} %   (target <= 1 %)")
    return {"mode": "memory" if memory else "files", "dense_s": [r[0] for r in rounds], "ours_s": walls,
            "ratios": ratios, "cold_s": cold_wall, "peak_rss_mib": peak, "summary": summary,
            "sampled_true_excess_max": worst, "sampled_estimate_max": worst_estimate}


def bench_resize(args, work: Path) -> dict:
    from bench_merge import dense_baseline, factor_route

    from lib_loramerge.formats.reader import read_lora

    source = work / "sdxl_r128.safetensors"
    if not source.exists():
        subprocess.run([sys.executable, "-c", MAKE_LORA, str(source), "128"], check=True, cwd=ROOT)
    out = work / "resized.safetensors"
    argv = ["lib_loramerge", "resize", str(source), "--rank", str(args.rank), "--device", "cpu", "--out", str(out),
            "--json"]
    env = {"LORAMERGE_CACHE_DIR": str(work / "warm-cache")}
    run_once(argv, env)  # fills the hash cache
    lora = read_lora(source)
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name, m in lora.modules.items():
        groups[(m.out_features, math.prod(m.weight_shape[1:]))].append(name)
    rounds = []
    for _ in range(args.runs):  # interleaved: a dense estimate, then our run
        dense_total = 0.0
        for names in groups.values():
            times = []
            for name in names[: args.dense_samples]:
                parts = [(lora.modules[name], 1.0)]
                default = dense_baseline(parts, args.rank)[1]
                with torch_threads(1):  # the faster of both thread counts counts, in the dense route's favour
                    times.append(min(default, dense_baseline(parts, args.rank)[1]))
            dense_total += sum(times) / len(times) * len(names)
        quiet_disk(out)
        wall, rss, stdout = run_once(argv, env)
        rounds.append((dense_total, json.loads(stdout)["timings"]["math"], wall, rss))
    quiet_disk(out, pause=0)
    worst = ours_sampled = dense_sampled = 0.0
    for names in groups.values():
        for name in names[: args.dense_samples]:
            parts = [(lora.modules[name], 1.0)]
            with torch_threads(1):
                sv_dense, dt = dense_baseline(parts, args.rank)
                sv_ours, ot = factor_route(parts, args.rank)
            worst = max(worst, float(((sv_ours - sv_dense).abs() / sv_dense).max()))
            dense_sampled, ours_sampled = dense_sampled + dt, ours_sampled + ot
    ratios = [d / m for d, m, _, _ in rounds]
    print(f"\n== resize: SDXL rank-128 LoRA ({len(lora.modules)} modules, {source.stat().st_size / 2**20:.0f} MiB) "
          f"to rank {args.rank} ==")
    print(f"dense route, all modules (extrapolated, per round): {', '.join(f'{r[0]:.0f}' for r in rounds)} s")
    print(f"ours, per round: math {', '.join(f'{r[1]:.2f}' for r in rounds)} s; end to end "
          f"{', '.join(f'{r[2]:.1f}' for r in rounds)} s; peak RSS {max(r[3] for r in rounds):.0f} MiB")
    print(f"speed ratio dense / ours (math), per round: {', '.join(f'{x:.0f}' for x in ratios)}x   "
          f"(median {statistics.median(ratios):.0f}x; target >= 200x); end to end: "
          f"{statistics.median(r[0] / r[2] for r in rounds):.0f}x")
    print(f"  like-for-like on the sampled modules (one module at a time, one thread): {dense_sampled / ours_sampled:.0f}x; "
          f"largest relative difference of kept singular values: {worst:.1e}")
    return {"dense_s": [r[0] for r in rounds], "math_s": [r[1] for r in rounds], "walls": [r[2] for r in rounds],
            "ratios_math": ratios, "max_rel_sv_diff": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="interleaved rounds (dense samples, then ours)")
    ap.add_argument("--dense-samples", type=int, default=1, help="modules per distinct shape for the dense routes")
    ap.add_argument("--workdir", type=Path, help="keep the inputs here (default: a temp folder)")
    ap.add_argument("--skip-extract", action="store_true")
    ap.add_argument("--skip-resize", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--from-memory", action="store_true", help="serve the checkpoints from memory (see above)")
    ap.add_argument("--make-checkpoints", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_checkpoints:
        make_checkpoints(args.make_checkpoints)
        return
    torch.manual_seed(0)
    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not args.skip_resize:
            results["resize"] = bench_resize(args, work)
        if not args.skip_extract:
            results["extract"] = bench_extract(args, work, tmp)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
