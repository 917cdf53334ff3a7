"""CUDA check: merge and bake on the GPU give the CPU's results; timings of both on one machine.

Run on a machine with CUDA, from the repository root:  python bench/gpu_check.py [--out DIR]
Prints one line per check and writes gpu_check.json to --out. Nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_loramerge.formats.writer import save_lora  # noqa: E402
from lib_loramerge.jobs import bake_to_file, merge_to_file, read_inputs  # noqa: E402
from lib_loramerge.ops.merge import MergeInput, MergeOptions, merge_loras  # noqa: E402
from lib_loramerge.synthetic import random_modules, write_random_checkpoint  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-30))


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def check_merge(work: Path, results: dict, gpu: str) -> None:
    paths = []
    for seed in (1, 2):
        p = work / f"xl{seed}.safetensors"
        save_lora(random_modules("sdxl", scope="attention", rank=32, alpha=16, seed=seed, std=0.05), p,
                  dtype=torch.float16, arch="sdxl")
        paths.append(p)
    inputs = [MergeInput(lo, unet=u, te=t) for lo, u, t in zip(read_inputs(paths), (1.0, -0.7), (0.5, 0.8), strict=True)]
    for mode in ("svd", "concat"):
        opts = {d: MergeOptions(mode=mode, rank=32, dtype=torch.float32, device=d) for d in ("cpu", gpu)}
        merge_loras(inputs, MergeOptions(mode=mode, rank=32, device=gpu))  # warm-up (CUDA context, kernels)
        cpu, t_cpu = timed(lambda o=opts["cpu"]: merge_loras(inputs, o))
        gpu_result, t_gpu = timed(lambda o=opts[gpu]: merge_loras(inputs, o))
        worst = 0.0
        for a, b in list(zip(cpu.modules, gpu_result.modules, strict=True))[::20]:
            assert a.name == b.name
            worst = max(worst, rel(b.delta(), a.delta()))
        results[f"merge_{mode}"] = {"cpu_s": t_cpu, "cuda_s": t_gpu, "modules": len(cpu.modules),
                                    "max_rel_delta_diff": worst}
        print(f"merge {mode}: {len(cpu.modules)} modules, cpu {t_cpu:.2f} s ({torch.get_num_threads()} threads), "
              f"cuda {t_gpu:.2f} s, max relative ΔW difference {worst:.2e}", flush=True)
    _, t_job = timed(lambda: merge_to_file(inputs, MergeOptions(mode="svd", rank=32, device=gpu),
                                           work / "merged.safetensors", overwrite=True))
    results["merge_job_cuda_s"] = t_job
    print(f"merge job (svd, cuda, fp16 file written): {t_job:.2f} s", flush=True)


def check_bake(work: Path, results: dict, gpu: str) -> None:
    for arch, divisor in (("sdxl", 4), ("sd1", 1)):
        ckpt = write_random_checkpoint(work / f"{arch}.safetensors", arch, width_divisor=divisor, dtype=torch.float16)
        lora = work / f"{arch}_lora.safetensors"
        save_lora(random_modules(arch, scope="locon", rank=16, alpha=8, seed=3, std=0.05, width_divisor=divisor),
                  lora, dtype=torch.float16, arch=arch)
        inputs = [MergeInput(read_inputs([lora])[0], unet=0.8, te=0.6)]
        outs, times = {}, {}
        for label, device in (("cpu", "cpu"), ("cuda", gpu)):
            out = work / f"{arch}_baked_{label}.safetensors"
            _, times[label] = timed(lambda d=device, o=out, c=ckpt, i=inputs: bake_to_file(
                c, i, o, dtype=torch.float32, device=d, overwrite=True))
            outs[label] = out
        from safetensors.torch import load_file

        a, b = load_file(outs["cpu"]), load_file(outs["cuda"])
        worst = max(rel(b[k], a[k]) for k in a if a[k].is_floating_point())
        size = ckpt.stat().st_size / 2**20
        results[f"bake_{arch}"] = {"checkpoint_mib": size, "cpu_s": times["cpu"], "cuda_s": times["cuda"],
                                   "max_rel_tensor_diff": worst}
        print(f"bake {arch} ({size:.0f} MiB, LoCon rank 16): cpu {times['cpu']:.2f} s, cuda {times['cuda']:.2f} s, "
              f"max relative tensor difference {worst:.2e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--gpu", default="cuda", help="the device compared with cpu (cpu: a dry run of this script)")
    args = ap.parse_args()
    results: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(results, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for check in (check_merge, check_bake):
            try:
                check(Path(tmp), results, args.gpu)
            except Exception as e:  # report and go on with the next check
                results[check.__name__] = f"FAILED: {e!r}"
                traceback.print_exc()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
