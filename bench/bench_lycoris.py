"""Benchmark: LyCORIS LoKr / LoHa → best rank-k LoRA, through our factor route against the dense route.

Run from the repository root:  python bench/bench_lycoris.py [--rank 16] [--dim 8] [--dense-samples 1] [--device cpu]

Inputs: the real SD1 LoKr files of the shared tier when present (``../shared/data/real-loras`` or
``$LORAMERGE_REAL_LORAS``), and synthetic LoKr and LoHa modules (dim ``--dim``) on every layer of
the SD1 LoCon layout (attention, ResNet convs, samplers, text encoder).

For each input, in one run:
1. ours: ``merge_loras`` in svd mode to rank k over all modules (LoKr alone: the Kronecker route,
   SVDs of the two small sides; LoHa: the factor-space SVD of its rank r₁·r₂ Khatri–Rao form);
2. the dense route: form ΔW (fp32, A1111's formula), ``torch.linalg.svd`` (reduced: full
   spectrum, thin vectors — cheaper than kohya's full_matrices=True), truncate to rank k; on
   ``--dense-samples`` modules of every distinct layer shape, extrapolated by the shape's count
   (``--full-dense``: every module);
3. ours on exactly the sampled modules, for a like-for-like ratio, and the largest relative
   difference between the kept singular values of both routes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib_loramerge import sdlayouts  # noqa: E402
from lib_loramerge.formats.reader import read_lora  # noqa: E402
from lib_loramerge.lycoris import LohaModule, LokrModule  # noqa: E402
from lib_loramerge.model import LoraModel  # noqa: E402
from lib_loramerge.ops.merge import MergeInput, MergeOptions, merge_loras  # noqa: E402

REAL = Path(os.environ.get("LORAMERGE_REAL_LORAS") or ROOT.parent / "shared" / "data" / "real-loras") / "lycoris-lokr"


def split(n: int) -> tuple[int, int]:
    """n = a·b with a ≤ b as close as possible (LyCORIS's factorization with factor -1)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def synthetic(algo: str, dim: int, seed: int = 0) -> LoraModel:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    modules = {}
    for name, shape in sdlayouts.lora_modules("sd1", sdlayouts.SCOPE_LOCON).items():
        out, inp, *kernel = shape
        k = math.prod(kernel)
        if algo == "lokr":  # both sides decomposed, w2 flat (out_k, in_n·kh·kw), like the real files
            (a, c), (b, d) = split(out), split(inp)
            modules[name] = LokrModule(name, alpha=float(dim), shape=shape, w1_a=r(a, min(dim, a, b)),
                                       w1_b=r(min(dim, a, b), b), w2_a=r(c, dim), w2_b=r(dim, d * k))
        else:
            modules[name] = LohaModule(name, alpha=float(dim), shape=shape, w1_a=r(out, dim), w1_b=r(dim, inp * k),
                                       w2_a=r(out, dim), w2_b=r(dim, inp * k))
    return LoraModel(modules=modules, arch="sd1", path=Path(f"synthetic_{algo}_dim{dim}.safetensors"))


Inputs = list[tuple[LoraModel, float]]  # (LoRA, strength)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def dense_route(inputs: Inputs, name: str, k: int, device: str) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    delta = sum(s * lora.modules[name].delta(torch.float32, device).reshape(lora.modules[name].out_features, -1)
                for lora, s in inputs)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    best = ((u[:, :k] * s[:k]) @ vh[:k]).cpu()
    del best
    sync(device)
    return s[:k].double().cpu(), time.perf_counter() - start


def our_route(inputs: Inputs, names: list[str], k: int, device: str) -> tuple[dict[str, torch.Tensor], float]:
    """Our svd merge of just ``names``: singular values of each output (‖upᵢ‖·‖downᵢ‖, √σ on each side)."""
    parts = [MergeInput(LoraModel(modules={n: lora.modules[n] for n in names}, arch=lora.arch, path=lora.path),
                        unet=s) for lora, s in inputs]
    start = time.perf_counter()
    result = merge_loras(parts, MergeOptions(mode="svd", rank=k, dtype=torch.float32, device=device))
    seconds = time.perf_counter() - start
    values = {}
    for m in result.modules:
        up, down = m.up.double().reshape(m.out_features, -1), m.down.double().reshape(m.rank, -1)
        values[m.name] = (up.norm(dim=0) * down.norm(dim=1) * (m.alpha / m.rank)).sort(descending=True).values
    return values, seconds


def bench(label: str, inputs: Inputs, k: int, samples: int, full: bool, device: str) -> dict:
    lora = inputs[0][0]
    our_route(inputs, list(lora.modules)[:4], k, device)  # warm-up (CUDA context, kernels)
    _, ours_total = our_route(inputs, list(lora.modules), k, device)
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name, m in lora.modules.items():
        groups[(m.out_features, math.prod(m.weight_shape[1:]))].append(name)
    dense_total = dense_sampled = ours_sampled = worst = 0.0
    sampled = 0
    for _, names in sorted(groups.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
        pick = names if full else names[:samples]
        ours, o_time = our_route(inputs, pick, k, device)
        d_time = 0.0
        for name in pick:
            sv_dense, dt = dense_route(inputs, name, k, device)
            d_time += dt
            if name in ours and float(sv_dense[0]) > 0:
                kept = ours[name]
                worst = max(worst, float(((kept - sv_dense[: kept.numel()]).abs() / sv_dense[: kept.numel()]).max()))
        dense_total += d_time / len(pick) * len(names)
        dense_sampled += d_time
        ours_sampled += o_time
        sampled += len(pick)
    rank = sum(lora.modules[next(iter(lora.modules))].rank for lora, _ in inputs)
    row = {"input": label, "modules": len(lora.modules), "factor_rank": rank, "dense_s": dense_total,
           "ours_s": ours_total, "ratio": dense_total / ours_total, "like_for_like": dense_sampled / ours_sampled,
           "sampled": sampled, "max_rel_sv_diff": worst}
    est = "all" if full else f"{sampled} sampled, extrapolated"
    print(f"{label}: {len(lora.modules)} modules (factor rank e.g. {rank}) -> rank {k}\n"
          f"  dense route (form ΔW, torch.linalg.svd, truncate; {est}): {dense_total:8.2f} s\n"
          f"  ours (merge_loras svd, all modules):                      {ours_total:8.2f} s\n"
          f"  speed ratio dense / ours: {row['ratio']:.0f}x   like-for-like on the sampled modules: "
          f"{row['like_for_like']:.0f}x\n"
          f"  largest relative difference of kept singular values: {worst:.1e}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dim", type=int, default=8, help="dim of the synthetic LoKr/LoHa (factor rank dim²)")
    ap.add_argument("--dense-samples", type=int, default=1, help="modules per distinct shape for the dense route")
    ap.add_argument("--full-dense", action="store_true", help="run the dense route on every module")
    ap.add_argument("--device", default="cpu", help="where both routes run: cpu or cuda")
    ap.add_argument("--only", help="run only the cases whose label contains this text")
    args = ap.parse_args()
    torch.manual_seed(0)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}, rank {args.rank}")
    cases: list[tuple[str, Inputs]] = []
    real = {n: REAL / f"{n}.safetensors" for n in ("smart_falcon_4_lokr", "smart_falcon_8_lokr")}
    if all(p.is_file() for p in real.values()):
        four, eight = (read_lora(p) for p in real.values())
        cases += [("real LoKr smart_falcon_4_lokr", [(four, 1.0)]), ("real LoKr smart_falcon_8_lokr", [(eight, 1.0)]),
                  ("real LoKr 4 + 8 merged (0.8, -0.5)", [(four, 0.8), (eight, -0.5)])]
    else:
        print(f"(real LoKr files not found at {REAL}: synthetic inputs only)")
    lokr, loha = synthetic("lokr", args.dim), synthetic("loha", args.dim, seed=1)
    cases += [(f"synthetic LoKr dim {args.dim} (SD1 LoCon layout)", [(lokr, 1.0)]),
              (f"synthetic LoHa dim {args.dim} (SD1 LoCon layout)", [(loha, 1.0)]),
              ("synthetic LoKr + LoHa merged (1, 0.7)", [(lokr, 1.0), (loha, 0.7)])]
    for label, inputs in cases:
        if args.only is None or args.only in label:
            bench(label, inputs, args.rank, args.dense_samples, args.full_dense, args.device)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
