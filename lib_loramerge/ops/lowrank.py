"""Exact low-rank algebra on factor pairs: never the dense out × in matrix.

A sum of LoRA updates ΔW = Σᵢ Uᵢ Dᵢ is one product U·D of the stacked factors
U = [U₁ … Uₙ] (out × R) and D = [D₁; …; Dₙ] (R × K). Writing U = Qᵤ Tᵤ and Dᵀ = Q_d T_d with
orthonormal Qᵤ, Q_d and small R × R factors T, ΔW = Qᵤ (Tᵤ T_dᵀ) Q_dᵀ: the SVD of the small core
C = Tᵤ T_dᵀ gives the SVD of ΔW exactly, ΔW = (Qᵤ P) Σ (Q_d W)ᵀ, and truncating it is the
Eckart–Young optimum. Cost O((out + K)·R²) instead of O(out·K·min(out, K)).

The T factors come from the Gram matrices UᵀU and DDᵀ, formed in float64 (so small singular
directions keep their accuracy): their Cholesky factors when the columns are independent, else
their eigendecompositions (Tᵤ = Λ^½ Vᵀ, Qᵤ = U V Λ^-½), which drop exactly dependent
directions (a LoRA merged with itself, or minus itself). This is cheaper than Householder QR
and parallelises well across modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# eigenvalues of a Gram matrix below this fraction of the largest are dependent directions:
# singular values under ~3e-7 of the largest, below the fp32 rounding of the factors themselves
_GRAM_RTOL = 1e-13


@dataclass
class FactorSVD:
    """ΔW ≈ left · diag(values) · right for the leading ``len(values)`` singular triplets."""

    left: torch.Tensor  # out × k, orthonormal columns
    values: torch.Tensor  # all singular values of ΔW (descending), float64
    right: torch.Tensor  # k × K, orthonormal rows

    @property
    def energy(self) -> float:
        """‖ΔW‖_F² (the sum of squared singular values)."""
        return float((self.values**2).sum())


def _gram(a: torch.Tensor) -> torch.Tensor:
    a = a.double()
    return a.T @ a


def _eigen_basis(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, σ) with gram = V diag(σ²) Vᵀ over the independent directions only."""
    lam, vec = torch.linalg.eigh(gram)
    keep = lam > lam[-1] * _GRAM_RTOL  # a zero matrix keeps nothing
    return vec[:, keep], lam[keep].sqrt()


def _cholesky(gram: torch.Tensor) -> torch.Tensor | None:
    """L with gram = L Lᵀ, or None when the columns are (nearly) dependent: then use the eigen route."""
    low, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return None
    diag = low.diagonal()
    return low if float(diag.min()) > float(diag.max()) * 1e-6 else None


def factor_svd(up: torch.Tensor, down: torch.Tensor, k: int | None = None) -> FactorSVD:
    """The SVD of ``up @ down`` (out × R times R × K) from the factors alone; vectors for the top ``k``.

    Fast route: Cholesky of both Grams (up = Qᵤ Lᵤᵀ), SVD of Lᵤᵀ L_d. When either stack has
    (nearly) dependent columns, the eigen route drops those directions instead. The Grams and
    the final products run where the factors are; the small R × R decompositions always on the
    CPU (on a GPU they are launch-bound: slower than the CPU for such sizes).
    """
    gu, gd = _gram(up).cpu(), _gram(down.T).cpu()
    lu, ld = _cholesky(gu), _cholesky(gd)
    if lu is not None and ld is not None:
        p, s, wh = torch.linalg.svd(lu.T @ ld, full_matrices=False)
        k = s.numel() if k is None else min(k, s.numel())
        to_left = torch.linalg.solve_triangular(lu.T, p[:, :k], upper=True)  # left = up Lᵤ⁻ᵀ P
        to_right = torch.linalg.solve_triangular(ld.T, wh[:k].T, upper=True)  # right = (L_d⁻ᵀ W)ᵀ down
    else:
        vu, su = _eigen_basis(gu)  # up = Qᵤ (su vuᵀ)
        vd, sd = _eigen_basis(gd)  # downᵀ = Q_d (sd vdᵀ)
        if su.numel() == 0 or sd.numel() == 0:  # a zero factor: ΔW = 0
            empty = torch.zeros(0, dtype=torch.float64)
            return FactorSVD(up.new_zeros(up.shape[0], 0), empty, down.new_zeros(0, down.shape[1]))
        p, s, wh = torch.linalg.svd((su[:, None] * vu.T) @ (vd * sd), full_matrices=False)
        k = s.numel() if k is None else min(k, s.numel())
        to_left = (vu / su) @ p[:, :k]
        to_right = (vd / sd) @ wh[:k].T
    to_left, to_right = to_left.to(up.device, up.dtype), to_right.to(down.device, down.dtype)
    return FactorSVD(left=up @ to_left, values=s, right=to_right.T @ down)


def kron_svd(first: FactorSVD, second: FactorSVD, k: int | None = None) -> FactorSVD:
    """The SVD of kron(A, B) from full SVDs of A and B (every vector kept): vectors for the top ``k``.

    kron(Uₐ Σₐ Vₐᵀ, U_b Σ_b V_bᵀ) = kron(Uₐ, U_b) kron(Σₐ, Σ_b) kron(Vₐ, V_b)ᵀ, and Kronecker
    products of orthonormal columns are orthonormal: the singular values are the products σᵢ·τⱼ,
    with vectors kron(uᵢ, u'ⱼ) and kron(vᵢ, v'ⱼ). Only the k kept columns are ever formed.
    """
    s1, s2 = first.values, second.values
    products = (s1[:, None] * s2[None, :]).reshape(-1)
    values, order = torch.sort(products, descending=True)
    k = values.numel() if k is None else min(k, values.numel())
    i, j = (idx.to(first.left.device) for idx in (order[:k] // s2.numel(), order[:k] % s2.numel()))
    l1, l2 = first.left[:, i], second.left[:, j]
    r1, r2 = first.right[i], second.right[j]
    left = (l1[:, None, :] * l2[None, :, :]).reshape(l1.shape[0] * l2.shape[0], k)
    right = (r1[:, :, None] * r2[:, None, :]).reshape(k, r1.shape[1] * r2.shape[1])
    return FactorSVD(left=left, values=values, right=right)


def compact_factors(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product with inner size at most min(out, K): when the stack is wider than the layer
    (high-rank LoHa/LoKr factor forms), the product itself with an identity is the smaller pair."""
    out, inner = up.shape
    width = down.shape[1]
    if inner <= min(out, width):
        return up, down
    if out <= width:
        return torch.eye(out, dtype=up.dtype, device=up.device), up @ down
    return up @ down, torch.eye(width, dtype=down.dtype, device=down.device)


def rank_for_threshold(values: torch.Tensor, threshold: float, total: float | None = None) -> int:
    """The smallest k whose leading singular values keep at least ``threshold`` of ‖ΔW‖_F².

    ``total``: ‖ΔW‖_F² when ``values`` are only the leading singular values (a sketch of ΔW);
    by default their own sum of squares. When even all of them fall short, all are kept.
    """
    energy = values.double() ** 2
    total = float(energy.sum()) if total is None else float(total)
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    # singular values come from fp32 factors: energies are good to ~1e-6, so a fraction that
    # reaches the threshold to within that counts as reaching it (and 1.0 keeps every value)
    k = int(torch.searchsorted(cumulative, torch.tensor(threshold - 1e-6, dtype=torch.float64))) + 1
    return min(k, int((values > 0).sum()))


def split_factors(svd: FactorSVD, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-k factors with √σ on each side, so neither factor's range outgrows the other (fp16-safe)."""
    root = svd.values[:k].sqrt().to(svd.left.device, svd.left.dtype)
    return svd.left[:, :k] * root, root[:, None] * svd.right[:k]


def clamp_factors(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip both factors to the ``quantile`` of their absolute entries (kohya-style outlier clamp).

    Uses |x| rather than kohya's signed values, so the result does not depend on the arbitrary
    signs an SVD routine picks, and kthvalue rather than torch.quantile (which refuses more than
    2^24 elements).
    """
    flat = torch.cat([up.reshape(-1), down.reshape(-1)]).abs()
    index = max(1, min(flat.numel(), int(round(quantile * flat.numel()))))
    h = float(flat.kthvalue(index).values)
    return up.clamp(-h, h), down.clamp(-h, h)


# ---- many modules at once ----------------------------------------------------------------------

EPS32 = 2.0**-24
# the fast route is taken for a module when its estimated relative error on the kept singular
# values is below this (the dense fp32 route kohya uses is off by ~1.6e-6 on the same modules)
FAST_TOLERANCE = 1e-6
# beyond this ratio of the Cholesky diagonal a factor stack is too close to dependent for fp32 Grams
_FAST_MAX_RATIO = 1e3


_ITEMSIZE: dict[torch.dtype, int] = {}


class Scratch:
    """Reusable memory for one worker's batches, by slot name, grown as needed.

    A fresh tensor of tens of MB costs a page fault per 4 KiB on first touch, which makes filling
    it 2–3× slower than a copy into memory already touched, and page faults of several threads
    serialize in the kernel. A merge makes one per worker thread and drops it at the end.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._buffers: dict[tuple[str, torch.device], torch.Tensor] = {}

    def take(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> torch.Tensor:
        """An uninitialised contiguous tensor; a later ``take`` of the same slot reuses its memory."""
        device = self.device if device is None else torch.device(device)
        if dtype not in _ITEMSIZE:  # dtype.itemsize needs torch ≥ 2.1
            _ITEMSIZE[dtype] = torch.empty(0, dtype=dtype).element_size()
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        key = (slot, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < nbytes:
            # 64-byte multiples keep every view as aligned as a fresh tensor (same products, same bytes)
            buffer = self._buffers[key] = torch.empty(-(-nbytes // 64) * 64, dtype=torch.uint8, device=device)
        return buffer[:nbytes].view(dtype).view(shape)


@dataclass
class BatchedSVD:
    """The singular values of B modules' ΔW = up @ down (see :func:`batched_svd`); vectors on demand."""

    values: torch.Tensor  # (B, R) float64, descending; rows of declined modules are meaningless
    floors: list[float]  # each module's noise floor; infinite where the Grams overflowed (or hold NaN/Inf)
    accepted: list[int]  # the modules the fast route vouches for, in batch order
    _parts: tuple = ()  # up, down, core, Lᵤ, L_d, right vectors, column scales of the accepted modules

    def vectors(self, k: int, scratch: Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right) of the accepted modules: (A, out, k) orthonormal columns, (A, k, K) orthonormal rows."""
        up, down, core, lu, ld, right_vectors, up_scale, down_scale = self._parts
        w_k = right_vectors[:, :, :k]
        sigma = self.values[self.accepted][:, :k].clamp_min(torch.finfo(torch.float64).tiny)
        p_k = (core @ w_k) / sigma[:, None, :]  # left singular vectors of the core
        to_left = torch.linalg.solve_triangular(lu.mT, p_k, upper=True)
        to_right = torch.linalg.solve_triangular(ld.mT, w_k, upper=True)
        if up_scale is not None:  # the column scales move into the small solves
            to_left, to_right = up_scale[:, :, None] * to_left, down_scale[:, :, None] * to_right
        to_left, to_right = to_left.to(up.device, up.dtype), to_right.to(down.device, down.dtype).mT
        if scratch is None or up.dtype != torch.float32:
            return up @ to_left, to_right @ down
        left = torch.matmul(up, to_left, out=scratch.take("left", (up.shape[0], up.shape[1], k)))
        right = torch.matmul(to_right, down, out=scratch.take("right", (down.shape[0], k, down.shape[2])))
        return left, right


def batched_svd(up: torch.Tensor, down: torch.Tensor, caps: list[int], noise: float,
                column_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> BatchedSVD:
    """:func:`factor_svd` for B modules of one shape at once, up (B, out, R), down (B, R, K): the values.

    The Grams are formed in float32 (8× cheaper than float64 with its conversions); their
    Cholesky factors, and the eigendecomposition of each small core's Gram CᵀC (C = Lᵤᵀ L_d: its
    eigenvectors are ΔW's right singular vectors in that basis, CW/σ the left ones), in float64,
    all as batched calls. Rounding the Grams to float32 costs accuracy where a stack is
    ill-conditioned or the kept spectrum spans far, so each module's error on its kept singular
    values is estimated from what the batch computed — ε₃₂ · σ₁/σₖ · max(1, d/30), d the largest
    ratio of a Cholesky diagonal (an upper bound, checked against float64 references over stacks
    of condition 1…10⁴) — and a module over :data:`FAST_TOLERANCE` is not accepted: the caller
    runs :func:`factor_svd` (float64 Grams) for it. ``caps[b]``: the most vectors module b may
    keep; the estimate is for min(cap, values above its noise floor), the floor being ``noise`` ·
    ‖U‖_F‖D‖_F (≥ ‖ΔW‖_F, from the Grams' traces). The traces also tell NaN/Inf in the factors
    (they propagate into the column sums of squares): then every floor is infinite and nothing is
    accepted, and the caller finds the culprit.

    ``column_scales`` (B, R) float64 (for up's columns, for down's rows): ΔW = (up·Sᵤ) @ (S_d·down),
    applied to the small Grams and solves rather than to the factors themselves (no pass over them).
    """
    gu = (up.mT @ up).double().cpu()  # the small decompositions run on the CPU (see factor_svd)
    gd = (down @ down.mT).double().cpu()
    if column_scales is not None:
        su, sd = column_scales
        gu = su[:, :, None] * gu * su[:, None, :]
        gd = sd[:, :, None] * gd * sd[:, None, :]
    bound = (gu.diagonal(dim1=-2, dim2=-1).sum(-1) * gd.diagonal(dim1=-2, dim2=-1).sum(-1)).sqrt()
    floors = [noise * b if math.isfinite(b) else math.inf for b in bound.tolist()]
    if not all(math.isfinite(f) for f in floors):  # overflowed factors: nothing to decompose
        return BatchedSVD(torch.zeros(up.shape[0], 0, dtype=torch.float64), floors, [])
    scales = column_scales if column_scales is not None else (None, None)
    lu, info_u = torch.linalg.cholesky_ex(gu)
    ld, info_d = torch.linalg.cholesky_ex(gd)
    core = lu.mT @ ld
    lam, vec = torch.linalg.eigh(core.mT @ core)  # ascending
    values = lam.flip(-1).clamp_min(0).sqrt()
    right_vectors = vec.flip(-1)
    diag_u, diag_d = lu.diagonal(dim1=-2, dim2=-1), ld.diagonal(dim1=-2, dim2=-1)
    ratio_u = (diag_u.max(-1).values / diag_u.min(-1).values).tolist()
    ratio_d = (diag_d.max(-1).values / diag_d.min(-1).values).tolist()
    usable = ((info_u == 0) & (info_d == 0) & (diag_u.min(-1).values > 0) & (diag_d.min(-1).values > 0)).tolist()
    above = (values > torch.tensor(floors, dtype=values.dtype)[:, None]).sum(-1).tolist()
    rows = values.tolist()
    accepted = []
    for b in range(up.shape[0]):
        ratio = max(ratio_u[b], ratio_d[b]) if usable[b] else math.inf
        k = min(caps[b], above[b])
        if ratio > _FAST_MAX_RATIO:
            continue
        if k > 0 and EPS32 * rows[b][0] / rows[b][k - 1] * max(1.0, ratio / 30) > FAST_TOLERANCE:
            continue
        accepted.append(b)
    parts = (up, down, core, lu, ld, right_vectors, *scales)
    if accepted and len(accepted) < up.shape[0]:  # only then copy the accepted modules out of the batch
        index = torch.tensor(accepted)
        on_device = index.to(up.device)
        parts = (up[on_device], down[on_device], core[index], lu[index], ld[index], right_vectors[index],
                 *(None if t is None else t[index] for t in scales))
    return BatchedSVD(values, floors, accepted, parts)
