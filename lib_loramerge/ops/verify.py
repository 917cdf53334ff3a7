"""How far a written LoRA is from what it should be, per module, from factors only (never a dense ΔW).

For factor pairs the distance is exact: A − B = [U_A, −U_B]·[D_A; D_B], and ‖U D‖_F² is the sum of
(UᵀU) ⊙ (D Dᵀ), two small Gram matrices (float64, so that a distance of 1e-7 of ‖A‖ still shows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..model import NetworkModule

# what rounding the factors to the output dtype can do to ΔW (relative), with a margin
DTYPE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _pair(module: NetworkModule, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    up, down = module.factor_matrices(torch.float32)
    return (weight * module.scale) * up.double(), down.double()


def distance(target: Sequence[tuple[NetworkModule, float]], written: NetworkModule) -> tuple[float, float]:
    """(‖Σ wᵢ ΔWᵢ − ΔW_written‖_F, ‖Σ wᵢ ΔWᵢ‖_F) from the factors."""
    target_pairs = [_pair(m, w) for m, w in target]
    ups = [u for u, _ in target_pairs]
    downs = [d for _, d in target_pairs]
    up_t, down_t = torch.cat(ups, 1), torch.cat(downs, 0)
    up_w, down_w = _pair(written, 1.0)
    norm_t = _norm(up_t, down_t)
    if up_w.shape[0] != up_t.shape[0] or down_w.shape[1] != down_t.shape[1]:
        return math.inf, norm_t
    return _norm(torch.cat([up_t, -up_w], 1), torch.cat([down_t, down_w], 0)), norm_t


def _norm(up: torch.Tensor, down: torch.Tensor) -> float:
    return math.sqrt(max(float(((up.T @ up) * (down @ down.T)).sum()), 0.0))


@dataclass
class Verification:
    """Per module relative error ‖ΔW_written − ΔW_target‖ / ‖ΔW_target‖ and whether each is within its bound."""

    errors: dict[str, float] = field(default_factory=dict)
    bounds: dict[str, float] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # expected in the file, not there
    unexpected: list[str] = field(default_factory=list)  # in the file, not expected

    @property
    def failed(self) -> list[str]:
        return [n for n, e in self.errors.items() if not e <= self.bounds[n]]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.missing and not self.unexpected

    def worst(self, n: int = 5) -> list[tuple[str, float, float]]:
        """The modules closest to (or over) their bound: (name, error, bound)."""
        ranked = sorted(self.errors, key=lambda k: self.errors[k] / max(self.bounds[k], 1e-30), reverse=True)
        return [(k, self.errors[k], self.bounds[k]) for k in ranked[:n]]

    def as_dict(self) -> dict:
        return {"ok": self.ok, "modules": len(self.errors), "failed": self.failed, "missing": self.missing,
                "unexpected": self.unexpected,
                "worst": [{"module": n, "error": e, "bound": b} for n, e, b in self.worst()]}


def verify_modules(targets: Mapping[str, Sequence[tuple[NetworkModule, float]]], written: Mapping[str, NetworkModule],
                   bounds: Mapping[str, float]) -> Verification:
    """Compare the written modules with their targets (Σ weight·module per name) against per-module bounds."""
    result = Verification(missing=sorted(set(targets) - set(written)), unexpected=sorted(set(written) - set(targets)))
    for name, target in targets.items():
        if name not in written:
            continue
        gap, norm = distance(target, written[name])
        result.errors[name] = gap / norm if norm > 0 else (0.0 if gap == 0 else math.inf)
        result.bounds[name] = bounds[name]
    return result
