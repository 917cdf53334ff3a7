"""The merge methods' names and command-line options: no torch here, so the CLI's parser is built
(and a job's input hashing started) before torch is imported."""

from __future__ import annotations

import argparse

METHODS = ("sum", "slerp", "karcher", "perpendicular", "norm", "ties", "dare", "ties-dense", "dare-dense")
LINEAR_METHODS = ("slerp", "karcher", "perpendicular", "norm")  # a linear combination of the inputs: any mode
CORE_METHODS = ("ties", "dare")  # aligned core space
DENSE_METHODS = ("ties-dense", "dare-dense")
NORM_KINDS = ("frobenius", "spectral")


def family(method: str) -> str:
    """``ties``/``dare`` for their core and dense variants alike."""
    return method.removesuffix("-dense")


def add_method_args(p: argparse.ArgumentParser) -> None:
    """``--method`` and its parameters on an argparse parser (the merge command)."""
    p.add_argument("--method", choices=METHODS, default="sum",
                   help="how the inputs combine, per module: sum (default: Σ strength·ΔW); slerp (two LoRAs, --t); karcher "
                        "(spherical mean of N); "
                        "perpendicular (the first plus the others' parts orthogonal to it); norm (each rescaled to "
                        "--norm-target before summing); ties / dare (--density; dare: --seed) in the aligned core "
                        "space, exact; ties-dense / dare-dense: element-wise on the dense ΔW (slow)")
    p.add_argument("--t", type=float, help="slerp: 0 = the first LoRA, 1 = the second (default 0.5)")
    p.add_argument("--norm", dest="norm_kind", choices=NORM_KINDS,
                   help="norm: which norm to equalise (default frobenius; spectral = the largest singular value)")
    p.add_argument("--norm-target", metavar="T",
                   help="norm: mean, max, min (of the inputs' norms, per module) or a positive number (default mean)")
    p.add_argument("--density", type=float, metavar="D",
                   help="ties/dare: fraction of entries kept, 0 < D ≤ 1 (default: ties 0.2, dare 0.5)")
    p.add_argument("--seed", type=int, metavar="N", help="dare: seed of the random drop (default: a fresh one, "
                                                          "recorded in the recipe)")
