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


def scaled_pair(module: NetworkModule, weight: float = 1.0, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float64) -> Pair:
    """(U, D) with ΔW = weight · scale · U @ D = U @ D (weight and alpha/rank folded into U).

    float64 by default (a Tucker/LoHa/LoKr form is folded in it too); float32 halves the cost where
    cosines good to ~1e-6 are enough (the analysis)."""
    up, down = module.factor_matrices(dtype, device)
    return (weight * module.scale) * up, down


def inner(a: Pair, b: Pair) -> float:
    """⟨U_a D_a, U_b D_b⟩_F = Σ (U_aᵀU_b) ⊙ (D_a D_bᵀ)."""
    (ua, da), (ub, db) = a, b
    return float(((ua.T @ ub) * (da @ db.T)).sum(dtype=torch.float64))


def gram(pairs: Sequence[Pair | None]) -> torch.Tensor:
    """The n × n matrix of inner products ⟨ΔWᵢ, ΔWⱼ⟩ (float64); a None pair (module absent) is zero."""
    n = len(pairs)
    g = torch.zeros(n, n, dtype=torch.float64)
    present = [i for i, p in enumerate(pairs) if p is not None]
    if present:
        # all pairs at once: the Grams of the stacked factors [U₁ … Uₖ], [D₁; …; Dₖ], summed block by block
        ups = torch.cat([pairs[i][0] for i in present], 1)
        downs = torch.cat([pairs[i][1] for i in present], 0)
        products = (ups.T @ ups) * (downs @ downs.T)
        edges = [0]
        for i in present:
            edges.append(edges[-1] + pairs[i][0].shape[1])
        index = torch.repeat_interleave(torch.arange(len(present)), torch.tensor(edges).diff()).to(products.device)
        blocks = torch.zeros(len(present), len(present), dtype=torch.float64, device=products.device)
        # block sums: rows then columns through index_add (one pass, no Python loop over pairs)
        rows = torch.zeros(len(present), products.shape[1], dtype=torch.float64, device=products.device)
        rows.index_add_(0, index, products.double())
        blocks.index_add_(1, index, rows)
        g[torch.tensor(present)[:, None], torch.tensor(present)[None, :]] = blocks.cpu()
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
