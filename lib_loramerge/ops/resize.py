"""Resize a LoRA: the one-input svd merge at strength 1, its rank chosen by a policy per module.

Exactly as ``merge`` (factor-space SVD: never the dense out × in matrix; LoHa/LoKr/Tucker through
their exact factor forms, a lone LoKr through its Kronecker sides), so every input type resizes
and comes out a plain LoRA/LoCon. A size target picks one energy threshold T for all modules —
each keeps the smallest rank retaining T of its own ‖ΔW‖² — the largest T whose file fits.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping

import torch

from ..errors import LoraMergeError
from ..model import LoraModel
from .lowrank import rank_for_threshold
from .merge import MergeInput, MergeOptions, MergeResult, merge_loras
from .policies import RankPolicy

Progress = Callable[[int, int, str], None]


def resize_lora(lora: LoraModel, policy: RankPolicy, *, device: str = "cpu", dtype: torch.dtype = torch.float16,
                progress: Progress | None = None) -> MergeResult:
    """``lora`` with each module at the rank ``policy`` gives it (its best approximation of that rank)."""
    policy.validate()
    chooser = (lambda name, values: policy.choose(values)) if policy.dynamic else None
    options = MergeOptions(mode="svd", rank=policy.most, device=device, dtype=dtype, rank_policy=chooser)
    return merge_loras([MergeInput(lora)], options, progress)


def resize_to_ranks(lora: LoraModel, ranks: Mapping[str, int], *, device: str = "cpu",
                    dtype: torch.dtype = torch.float16, progress: Progress | None = None) -> MergeResult:
    """``lora`` with module ``name`` at rank ``ranks[name]`` (fewer where ΔW has fewer significant values)."""
    options = MergeOptions(mode="svd", device=device, dtype=dtype, rank_policy=lambda name, values: ranks[name])
    return merge_loras([MergeInput(lora)], options, progress)


def spectra(lora: LoraModel, *, device: str = "cpu", progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Every module's significant singular values (descending, float64), through the merge's own SVD route.

    (A merge to rank 1 that records each module's spectrum: the values come from the same exact
    decomposition the resize then uses, and only one vector per module is formed.)
    """
    found: dict[str, torch.Tensor] = {}

    def record(name: str, values: torch.Tensor) -> int:
        found[name] = values.detach().double().cpu().clone()
        return 1

    options = MergeOptions(mode="svd", rank=1, device=device, dtype=torch.float32, rank_policy=record)
    merge_loras([MergeInput(lora)], options, progress)
    return found


def ranks_for_threshold(values: Mapping[str, torch.Tensor], threshold: float, cap: int | None = None) -> dict[str, int]:
    """Per module the smallest rank keeping ``threshold`` of its ‖ΔW‖² (at least 1, at most ``cap``)."""
    ranks = {}
    for name, v in values.items():
        k = max(1, rank_for_threshold(v, threshold))
        ranks[name] = min(k, cap) if cap is not None else k
    return ranks


def threshold_for_size(values: Mapping[str, torch.Tensor], size_of: Callable[[float, dict[str, int]], int],
                       budget: int, cap: int | None = None) -> tuple[float, dict[str, int]]:
    """The largest energy threshold T whose per-module ranks make a file of at most ``budget`` bytes.

    ``size_of(T, ranks)`` is the exact size of the file with those ranks (its metadata may name T). The file grows with T, and
    only the thresholds at which some module's rank changes matter — each module's cumulative
    energy fractions — so T is found by bisection over those. Raises when even rank 1 everywhere
    does not fit.
    """
    if not values:
        raise LoraMergeError("nothing to resize: every module of the LoRA is zero")
    candidates = sorted({1.0, *(f for v in values.values() for f in _fractions(v))})
    smallest = size_of(candidates[0], ranks_for_threshold(values, candidates[0], cap))
    if smallest > budget:
        raise LoraMergeError(f"even rank 1 for every module makes a file of {smallest / 2**20:.2f} MiB, more "
                             f"than the {budget / 2**20:.2f} MiB asked for")

    def fits(i: int) -> bool:
        return size_of(candidates[i], ranks_for_threshold(values, candidates[i], cap)) <= budget

    # bisect for the last candidate that fits (the size grows with the threshold)
    best = bisect.bisect_left(range(len(candidates)), True, key=lambda i: not fits(i)) - 1
    threshold = candidates[max(best, 0)]
    return threshold, ranks_for_threshold(values, threshold, cap)


def _fractions(values: torch.Tensor) -> list[float]:
    """The fraction of ‖ΔW‖² each leading rank keeps: the thresholds at which this module's rank steps."""
    energy = values.double() ** 2
    total = float(energy.sum())
    if total <= 0:
        return []
    return (torch.cumsum(energy, 0) / total).clamp(max=1.0).tolist()
