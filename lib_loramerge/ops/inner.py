"""Inner products of LoRA updates from their factors: never the dense out × in matrix.

For ΔWᵢ = sᵢ·Uᵢ Dᵢ and ΔWⱼ = sⱼ·Uⱼ Dⱼ (U: out × r, D: r × in·kh·kw), the Frobenius inner product is

    ⟨ΔWᵢ, ΔWⱼ⟩ = tr(ΔWᵢᵀ ΔWⱼ) = sᵢ sⱼ · tr((UᵢᵀUⱼ)(DⱼDᵢᵀ)) = sᵢ sⱼ · Σ (UᵢᵀUⱼ) ⊙ (DᵢDⱼᵀ),

two small rᵢ × rⱼ products: O((out + in)·rᵢ·rⱼ) instead of O(out·in·(rᵢ + rⱼ)). From it follow
‖ΔWᵢ‖_F, cosines ⟨ΔWᵢ, ΔWⱼ⟩ / (‖ΔWᵢ‖‖ΔWⱼ‖) and projections (⟨ΔWⱼ, ΔWᵢ⟩ / ‖ΔWᵢ‖²)·ΔWᵢ, all per
module on the flattened update. The factors are taken in float64, so a cosine of 1e-6 still shows.
A module missing from an input is a zero update there: norm 0, cosine undefined (None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..model import NetworkModule

Pair = tuple[torch.Tensor, torch.Tensor]  # (U, D) with ΔW = U @ D, scale folded into U


def scaled_pair(module: NetworkModule, weight: float = 1.0, device: torch.device | str = "cpu") -> Pair:
    """(U, D) in float64 with ΔW = weight · scale · U @ D = U @ D (weight and alpha/rank folded into U)."""
    up, down = module.factor_matrices(torch.float64, device)  # a Tucker/LoHa/LoKr form is folded in float64 too
    return (weight * module.scale) * up, down


def inner(a: Pair, b: Pair) -> float:
    """⟨U_a D_a, U_b D_b⟩_F = Σ (U_aᵀU_b) ⊙ (D_a D_bᵀ)."""
    (ua, da), (ub, db) = a, b
    return float(((ua.T @ ub) * (da @ db.T)).sum())


def gram(pairs: Sequence[Pair | None]) -> torch.Tensor:
    """The n × n matrix of inner products ⟨ΔWᵢ, ΔWⱼ⟩ (float64); a None pair (module absent) is zero."""
    n = len(pairs)
    g = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            if pairs[i] is None or pairs[j] is None:
                continue
            g[i, j] = g[j, i] = inner(pairs[i], pairs[j])
    # a squared norm is ≥ 0; rounding of a (near-)zero update must not make it negative
    g.diagonal().clamp_(min=0.0)
    return g


def frobenius_norm(pair: Pair) -> float:
    return math.sqrt(max(inner(pair, pair), 0.0))


def cosine(g: torch.Tensor, i: int, j: int) -> float | None:
    """cos∠(ΔWᵢ, ΔWⱼ) from a Gram matrix, clipped to [−1, 1]; None when either update is zero."""
    denominator = math.sqrt(float(g[i, i]) * float(g[j, j]))
    if denominator == 0.0 or not math.isfinite(denominator):
        return None
    return max(-1.0, min(1.0, float(g[i, j]) / denominator))


def projection_coefficient(g: torch.Tensor, onto: int, of: int) -> float:
    """c with proj_{ΔW_onto}(ΔW_of) = c · ΔW_onto, i.e. ⟨ΔW_of, ΔW_onto⟩ / ‖ΔW_onto‖² (0 when ΔW_onto = 0)."""
    squared = float(g[onto, onto])
    return float(g[of, onto]) / squared if squared > 0.0 else 0.0


def spectral_norm(pair: Pair) -> float:
    """‖U D‖₂, the largest singular value, from the small core: U = Q_u R_u, Dᵀ = Q_d R_d, so
    U D = Q_u (R_u R_dᵀ) Q_dᵀ and σ(U D) = σ(R_u R_dᵀ), an r × r matrix."""
    up, down = pair
    r_up = torch.linalg.qr(up, mode="r").R
    r_down = torch.linalg.qr(down.T, mode="r").R
    values = torch.linalg.svdvals(r_up @ r_down.T)
    return float(values[0]) if values.numel() else 0.0
