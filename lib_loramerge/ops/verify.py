"""How far a written LoRA is from what it should be, per module, from factors only (never a dense ΔW).

For factor pairs the distance is exact: A − B = [U_A, −U_B]·[D_A; D_B], and ‖U D‖_F² is the sum of
(UᵀU) ⊙ (D Dᵀ), two small Gram matrices (float64, so that a distance of 1e-7 of ‖A‖ still shows).

Each module's bound is what the job may lose by design (svd: √(1 − kept energy) of the target;
concat: nothing) plus what storing the factors in the output dtype can do: rounding each of n
factors to unit roundoff u moves their product by at most n·u·Π‖fᵢ‖_F (to first order). A file
whose bytes changed after the job computed them is far outside either.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..model import LoraModule, NetworkModule

# unit roundoff of the dtypes a LoRA is written in
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# float32 arithmetic of the job itself (sums of products, the r×r decompositions), relative to ‖target‖
COMPUTE_SLACK = 1e-5


def _pair(module: NetworkModule, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    up, down = module.factor_matrices(torch.float32)
    return (weight * module.scale) * up.double(), down.double()


def distance(target: Sequence[tuple[NetworkModule, float]], written: NetworkModule) -> tuple[float, float]:
    """(‖Σ wᵢ ΔWᵢ − ΔW_written‖_F, ‖Σ wᵢ ΔWᵢ‖_F) from the factors."""
    target_pairs = [_pair(m, w) for m, w in target]
    up_t = torch.cat([u for u, _ in target_pairs], 1)
    down_t = torch.cat([d for _, d in target_pairs], 0)
    up_w, down_w = _pair(written, 1.0)
    norm_t = _norm(up_t, down_t)
    if up_w.shape[0] != up_t.shape[0] or down_w.shape[1] != down_t.shape[1]:
        return math.inf, norm_t
    return _norm(torch.cat([up_t, -up_w], 1), torch.cat([down_t, down_w], 0)), norm_t


def _norm(up: torch.Tensor, down: torch.Tensor) -> float:
    return math.sqrt(max(float(((up.T @ up) * (down @ down.T)).sum()), 0.0))


def rounding_bound(written: LoraModule, dtype: torch.dtype) -> float:
    """The most rounding the factors to ``dtype`` can move ΔW (absolute, Frobenius): n·u·|scale|·Π‖fᵢ‖."""
    factors = [written.up, written.down] + ([written.mid] if written.mid is not None else [])
    product = math.prod(float(f.double().norm()) for f in factors)
    u = UNIT_ROUNDOFF.get(dtype, 2.0**-11)
    return 1.01 * len(factors) * u * abs(written.scale) * product


@dataclass
class Verification:
    """Per module relative error ‖ΔW_written − ΔW_target‖ / ‖ΔW_target‖ and whether each is within its bound."""

    errors: dict[str, float] = field(default_factory=dict)
    bounds: dict[str, float] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # expected in the file, not there
    unexpected: list[str] = field(default_factory=list)  # in the file, not expected
    what: str = "modules"  # what was compared, in words ("modules", "patched tensors")

    @property
    def failed(self) -> list[str]:
        return [n for n, e in self.errors.items() if not e <= self.bounds[n]]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.missing and not self.unexpected

    def worst(self, n: int = 5) -> list[tuple[str, float, float]]:
        """The modules closest to (or over) their bound: (name, error, bound)."""
        ranked = sorted(self.errors, key=lambda k: _ratio(self.errors[k], self.bounds[k]), reverse=True)
        return [(k, self.errors[k], self.bounds[k]) for k in ranked[:n]]

    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def summary(self) -> str:
        """One line: how many were checked, the largest error, and what failed."""
        if self.ok:
            return (f"verified: {len(self.errors)} {self.what} re-read from the file, all within their bounds "
                    f"(largest relative error {self.max_error():.3g})")
        parts = []
        if self.failed:
            name, error, bound = self.worst(1)[0]
            parts.append(f"{len(self.failed)} of {len(self.errors)} {self.what} off their target (worst: {name}, "
                         f"relative error {error:.3g} > bound {bound:.3g})")
        if self.missing:
            parts.append(f"{len(self.missing)} missing from the file (first: {self.missing[0]})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} in the file that should not be (first: {self.unexpected[0]})")
        return "verification failed: " + "; ".join(parts)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "checked": len(self.errors), "what": self.what, "failed": self.failed,
                "missing": self.missing, "unexpected": self.unexpected, "max_error": self.max_error(),
                "worst": [{"name": n, "error": e, "bound": b} for n, e, b in self.worst()]}


def _ratio(error: float, bound: float) -> float:
    return error / bound if bound > 0 else (0.0 if error == 0 else math.inf)


def verify_modules(targets: Mapping[str, Sequence[tuple[NetworkModule, float]]], written: Mapping[str, LoraModule],
                   allowed: Mapping[str, float], dtype: torch.dtype) -> Verification:
    """Compare the written modules with their targets (Σ weight·module per name).

    ``allowed``: per module, the relative error the job may make by design (0 for an exact one);
    the rounding of the written factors to ``dtype`` and float32 slack are added to it.
    """
    result = Verification(missing=sorted(set(targets) - set(written)), unexpected=sorted(set(written) - set(targets)))
    for name, target in targets.items():
        if name not in written:
            continue
        module = written[name].load() if written[name].is_lazy else written[name]
        gap, norm = distance(target, module)
        rounding = rounding_bound(module, dtype)
        if norm > 0:
            result.errors[name] = gap / norm
            result.bounds[name] = allowed.get(name, 0.0) + rounding / norm + COMPUTE_SLACK
        else:  # the target is zero: what is written must be rounding of nothing
            result.errors[name] = 0.0 if gap <= rounding else math.inf
            result.bounds[name] = 0.0
    return result
