"""Benchmark: bake two rank-32 LoRAs into an SD1-size fp16 checkpoint, against a plain copy.

Run from the repository root:  python bench/bench_bake.py [--workdir DIR] [--runs 3] [--device cpu|cuda]

In one run, on this machine, interleaved round by round (each step on a quiet disk: its earlier
output deleted, the disk synced):
- copy: a fresh process that loads the checkpoint with safetensors and saves it again;
- bake, cold: a fresh process running ``python -m lib_loramerge bake`` with two SD1 kohya LoRAs
  (rank 32, UNet attention + text encoder), its hash cache empty (the checkpoint is hashed);
- bake, warm: the same with the checkpoint's hash already cached (a second bake into the same base).
The checkpoint has every real key and shape of SD1 (UNet, CLIP, VAE; ≈2.1 GB in fp16). Prints
times (median, min–max), MB/s of the checkpoint through each, peak RSS, and the ratios bake/copy
of each round; targets: bake ≤ 1.0× the copy, peak RSS ≤ 600 MiB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, quiet_disk, run_once, spread  # noqa: E402

MAKE = """
import sys, torch
from lib_loramerge.formats.writer import save_lora
from lib_loramerge.synthetic import random_modules, write_random_checkpoint
folder = sys.argv[1]
write_random_checkpoint(folder + "/sd1.safetensors", "sd1", dtype=torch.float16, seed=1)
for seed in (1, 2):
    mods = random_modules("sd1", scope="attention", rank=32, alpha=16, seed=seed, std=0.05)
    save_lora(mods, f"{folder}/lora{seed}.safetensors", dtype=torch.float16, arch="sd1")
"""

COPY = """
import sys
from safetensors.torch import load_file, save_file
tensors = load_file(sys.argv[1])
save_file(tensors, sys.argv[2], metadata={"format": "pt"})
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="keep the inputs here (default: a temp folder)")
    ap.add_argument("--runs", type=int, default=3, help="rounds (each runs every step once)")
    ap.add_argument("--device", default="cpu", help="where the bake computes W + dW (cpu or cuda)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = work / "sd1.safetensors"
        if not ckpt.exists():
            subprocess.run([sys.executable, "-c", MAKE, str(work)], check=True, cwd=ROOT)
        copy_script = work / "copy.py"
        copy_script.write_text(COPY)
        size_mib = ckpt.stat().st_size / 2**20
        copy_out, bake_out = work / "copy.safetensors", work / "baked.safetensors"
        bake_argv = ["lib_loramerge", "bake", "--checkpoint", str(ckpt), "--models", str(work / "lora1.safetensors"),
                     str(work / "lora2.safetensors"), "--ratios", "0.8", "0.5", "--dtype", "fp16",
                     "--device", args.device, "--out", str(bake_out)]
        steps = {
            "copy": ([str(copy_script), str(ckpt), str(copy_out)], copy_out, lambda: {}),
            "bake (cold hash cache)": (bake_argv, bake_out, lambda: {"LORAMERGE_CACHE_DIR": tempfile.mkdtemp(dir=tmp)}),
            "bake (warm hash cache)": (bake_argv, bake_out, lambda: {"LORAMERGE_CACHE_DIR": str(work / "warm-cache")}),
        }
        run_once(bake_argv, {"LORAMERGE_CACHE_DIR": str(work / "warm-cache")})  # fills the warm cache
        bake_out.unlink()
        times: dict[str, list[float]] = {name: [] for name in steps}
        rss: dict[str, float] = {}
        stdout = ""
        for _ in range(args.runs):
            for name, (argv, _, env) in steps.items():
                quiet_disk(copy_out, bake_out)
                wall, peak, text = run_once(argv, env())
                times[name].append(wall)
                rss[name] = max(rss.get(name, 0.0), peak)
                stdout = text if name != "copy" else stdout
        quiet_disk(copy_out, bake_out, pause=0)
    baked = next(line for line in stdout.splitlines() if line.startswith("modules baked"))
    print(f"machine: {machine()}")
    print(f"SD1 checkpoint, every real key and shape, fp16: {size_mib:.0f} MiB; two rank-32 LoRAs ({baked}); "
          f"{args.runs} rounds, device {args.device}")
    for name, values in times.items():
        rate = size_mib / statistics.median(values)
        print(f"{name:<24} {spread(values)} s   {rate:6.0f} MiB/s   peak RSS {rss[name]:.0f} MiB")
    result = {"checkpoint_mib": size_mib, "runs": args.runs, "times": times, "rss_mib": rss}
    for name in list(steps)[1:]:
        ratios = [b / c for b, c in zip(times[name], times["copy"], strict=True)]
        print(f"ratio {name} / copy, per round: {', '.join(f'{r:.2f}' for r in ratios)}x   "
              f"(median {statistics.median(ratios):.2f}x; target <= 1.0x)")
        result[f"ratio {name}"] = ratios
    print(f"peak RSS of the bake: {max(rss[n] for n in list(steps)[1:]):.0f} MiB (target <= 600 MiB); "
          f"the copy's: {rss['copy']:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
