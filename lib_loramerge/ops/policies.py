"""Rank policies: how many singular values of a module's ΔW a resized or extracted LoRA keeps.

The dynamic policies are those of kohya's ``resize_lora.py``, with their definitions written out
(σ₁ ≥ σ₂ ≥ … the singular values of ΔW, k the rank kept, at least 1):

- ``rank N``: k = N (fewer when the layer or ΔW has fewer non-zero singular values);
- ``threshold T``: the smallest k with Σᵢ≤ₖ σᵢ² ≥ T · Σ σᵢ², a fraction of the energy ‖ΔW‖_F²
  (what ``merge --threshold`` means);
- ``sv_fro F``: the smallest k with ‖ΔW_k‖_F ≥ F · ‖ΔW‖_F, a fraction of the Frobenius norm itself
  (kohya's ``sv_fro``; the same as ``threshold F²``);
- ``sv_cumulative C``: the smallest k with Σᵢ≤ₖ σᵢ ≥ C · Σ σᵢ (kohya's ``sv_cumulative``);
- ``sv_ratio R``: every σᵢ ≥ σ₁ / R (kohya's ``sv_ratio``).

kohya caps each of these at len(σ) − 1, so a module can never keep its whole spectrum (an
``sv_fro 1.0`` resize of a rank-8 LoRA gives rank 7), and its ``sv_ratio`` keeps σ > σ₁/R
strictly; here k may reach the full rank and the comparisons are ≥. A dynamic policy's ``cap``
(kohya's ``--new_rank`` used as a hard limit) bounds k. Singular values computed from fp32 factors
carry a relative error of about 1e-6, so a value that meets a limit to within that meets it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import LoraMergeError
from .lowrank import rank_for_threshold

RANK, THRESHOLD, SV_FRO, SV_RATIO, SV_CUMULATIVE = "rank", "threshold", "sv_fro", "sv_ratio", "sv_cumulative"
POLICIES = (RANK, THRESHOLD, SV_FRO, SV_RATIO, SV_CUMULATIVE)
# which policies can be decided from the leading singular values and ‖ΔW‖_F² alone (a sketch of ΔW):
# sv_cumulative needs Σσ over the whole spectrum, which only an exact SVD gives
FROM_LEADING_VALUES = (RANK, THRESHOLD, SV_FRO, SV_RATIO)
_RELATIVE_SLACK = 1e-6

_MEANING = {
    RANK: "rank {v:g}",
    THRESHOLD: "keep {v:g} of ‖ΔW‖² per module",
    SV_FRO: "keep {v:g} of ‖ΔW‖_F per module (sv_fro)",
    SV_RATIO: "keep σ ≥ σ_max/{v:g} (sv_ratio)",
    SV_CUMULATIVE: "keep {v:g} of Σσ per module (sv_cumulative)",
}


@dataclass(frozen=True)
class RankPolicy:
    """A rank rule for every module: ``kind`` (one of :data:`POLICIES`), its ``value``, an optional ``cap``."""

    kind: str
    value: float
    cap: int | None = None

    def validate(self) -> RankPolicy:
        """Refuse values outside a policy's range (one line naming the option); returns self."""
        v = self.value
        if self.kind not in POLICIES:
            raise LoraMergeError(f"unknown rank policy '{self.kind}' (choose {', '.join(POLICIES)})")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise LoraMergeError(f"{self.kind} must be a finite number, got {v!r}")
        if self.kind == RANK and (v != int(v) or v < 1):
            raise LoraMergeError(f"rank must be a whole number of at least 1, got {v:g}")
        if self.kind in (THRESHOLD, SV_FRO, SV_CUMULATIVE) and not 0 < v <= 1:
            raise LoraMergeError(f"{self.kind} must be in (0, 1], got {v:g}")
        if self.kind == SV_RATIO and v < 1:
            raise LoraMergeError(f"sv_ratio must be at least 1 (keep σ ≥ σ_max / R), got {v:g}")
        if self.cap is not None and (self.kind == RANK or self.cap < 1):
            raise LoraMergeError("a rank cap goes with a dynamic policy only, and must be at least 1"
                                 if self.kind == RANK else f"rank cap must be at least 1, got {self.cap}")
        return self

    @property
    def dynamic(self) -> bool:
        return self.kind != RANK

    @property
    def most(self) -> int | None:
        """The largest rank any module may get (None: only the layer bounds it)."""
        return int(self.value) if self.kind == RANK else self.cap

    def describe(self) -> str:
        text = _MEANING[self.kind].format(v=self.value)
        return text + (f", at most rank {self.cap}" if self.cap is not None else "")

    def choose(self, values: torch.Tensor, energy: float | None = None) -> int:
        """The rank to keep for singular values ``values`` (descending; 0 when all are 0).

        ``energy``: ‖ΔW‖_F² when ``values`` are only the leading ones (a sketch); by default Σ values².
        """
        values = values.double()
        nonzero = int((values > 0).sum())
        if nonzero == 0:
            return 0
        if self.kind == RANK:
            k = int(self.value)
        elif self.kind in (THRESHOLD, SV_FRO):
            fraction = self.value if self.kind == THRESHOLD else self.value**2
            k = rank_for_threshold(values, fraction, total=energy)
        elif self.kind == SV_CUMULATIVE:
            cumulative = torch.cumsum(values, 0) / float(values.sum())
            k = int(torch.searchsorted(cumulative, torch.tensor(self.value - _RELATIVE_SLACK, dtype=torch.float64))) + 1
        else:
            k = int((values >= float(values[0]) / self.value * (1 - _RELATIVE_SLACK)).sum())
        k = max(1, min(k, nonzero))
        return min(k, self.cap) if self.cap is not None else k


def policy_from_options(*, rank: int | None = None, threshold: float | None = None, sv_fro: float | None = None,
                        sv_ratio: float | None = None, sv_cumulative: float | None = None,
                        cap: int | None = None) -> RankPolicy:
    """The one policy a user gave (as the CLI's exclusive options); ``cap`` bounds a dynamic one."""
    given = {kind: value for kind, value in ((RANK, rank), (THRESHOLD, threshold), (SV_FRO, sv_fro),
                                             (SV_RATIO, sv_ratio), (SV_CUMULATIVE, sv_cumulative)) if value is not None}
    if len(given) != 1:
        named = ", ".join(f"--{k.replace('_', '-')}" for k in given) or "none"
        raise LoraMergeError(f"give exactly one rank policy (--rank, --threshold, --sv-fro, --sv-ratio, "
                             f"--sv-cumulative or --size-mib); got {named}")
    ((kind, value),) = given.items()
    return RankPolicy(kind, value, cap).validate()
