"""Benchmark: bake two rank-32 LoRAs into an SD1-size fp16 checkpoint, against a plain copy.

Run from the repository root:  python bench/bench_bake.py [--workdir DIR] [--repeat 2]

In one run, on this machine: a fresh process that loads the checkpoint with safetensors and
saves it again (the copy baseline), and a fresh process running ``python -m lib_loramerge bake``
with two SD1 kohya LoRAs (rank 32, UNet attention + text encoder). The checkpoint has every real
key and shape of SD1 (UNet, CLIP text encoder, VAE; ≈2.1 GB in fp16). Prints time and peak-RSS
ratios; targets: bake ≤ 1.3× the copy's time, bake's peak RSS ≤ checkpoint size + 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import ROOT, timed_process  # noqa: E402

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
    ap.add_argument("--repeat", type=int, default=2, help="runs per step; the best time counts")
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
        copy_wall, copy_rss, _ = timed_process([str(copy_script), str(ckpt), str(work / "copy.safetensors")],
                                               repeat=args.repeat)
        bake_wall, bake_rss, stdout = timed_process(
            ["lib_loramerge", "bake", "--checkpoint", str(ckpt), "--models", str(work / "lora1.safetensors"),
             str(work / "lora2.safetensors"), "--ratios", "0.8", "0.5", "--dtype", "fp16", "--device", "cpu",
             "--out", str(work / "baked.safetensors"), "--overwrite"], repeat=args.repeat)
    baked = next(line for line in stdout.splitlines() if line.startswith("modules baked"))
    print(f"SD1 checkpoint, every real key and shape, fp16: {size_mib:.0f} MiB; two rank-32 LoRAs ({baked})")
    print(f"copy (fresh process: safetensors load_file + save_file): {copy_wall:.2f} s, peak RSS {copy_rss:.0f} MiB")
    print(f"bake (fresh process: python -m lib_loramerge bake ...):  {bake_wall:.2f} s, peak RSS {bake_rss:.0f} MiB")
    print(f"time ratio bake / copy: {bake_wall / copy_wall:.2f}x   (target <= 1.3x)")
    print(f"peak RSS of bake: {bake_rss:.0f} MiB = checkpoint size {'+' if bake_rss >= size_mib else '-'} "
          f"{abs(bake_rss - size_mib):.0f} MiB   (target <= checkpoint + 1024 MiB); copy/bake RSS ratio "
          f"{copy_rss / bake_rss:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint_mib": size_mib, "copy_s": copy_wall, "bake_s": bake_wall,
                                         "ratio": bake_wall / copy_wall, "copy_rss_mib": copy_rss,
                                         "bake_rss_mib": bake_rss}, indent=2))


if __name__ == "__main__":
    main()
