"""The leading singular triplets of a dense matrix by randomized subspace iteration, and how good they are.

Extraction has a dense ΔW = tuned − base per layer; a full SVD of it (what kohya, supermerger and
ComfyUI run) costs O(m·n·min(m, n)) and computes thousands of singular vectors of which 32 are
kept. Randomized subspace iteration (Halko, Martinsson & Tropp 2011, algorithm 4.4) finds the
leading ones with a few products by ΔW and ΔWᵀ sized to the rank asked for:

    Q₀ = orth(A Ω)          Ω: n × ℓ Gaussian, ℓ = k + p (oversampling p, by default p = k, at least 8)
    Qₕ = orth(Aᵀ Qₕ₋₁)  or  orth(A Qₕ₋₁)       (alternately: a "step" is one product)

After step h the basis Qₕ₋₁ holds a projection A_P of A (Qᵀ A or A Q) whose singular values
σ̃₁ ≥ … ≥ σ̃ₗ come from the small triangular factor of that product's QR. The rank-k result
A_k = U_k Σ̃_k V_kᵀ is the projection of A onto k orthonormal directions, so its error is known
exactly:  ‖A − A_k‖_F² = ‖A‖_F² − E_h,  E_h = Σᵢ≤ₖ σ̃ᵢ²  (the retained energy).

The optimal rank-k error (Eckart–Young, from the true σ) is not known without a full SVD; it is
estimated from the sketch's own convergence. Each step raises E_h (monotonically) by
d_h = E_h − E_h₋₁, and those gains shrink geometrically: a leading direction's angle to the
subspace falls by σ_ℓ₊₁/σ_k per product, its missing energy by the square. With
ρ = max(d_h / d_h₋₁, (σ̃ₗ/σ̃ₖ)²) — the rate observed and the rate the theory gives, whichever is
slower — the energy still missing is D ≈ d_h·ρ/(1 − ρ); it is counted twice (``SAFETY``), since
the gains of many directions shrink at different rates. Then

    optimal error² ≈ err² − D,     excess = err / optimal − 1 = √(err² / (err² − D)) − 1.

Steps continue (at least ``MIN_STEPS``, at most ``MAX_STEPS``) until the estimated excess is at
most ``TOLERANCE`` (0.5 %). fp32 products resolve energies to about ``RESOLUTION``·‖A‖² (one part in
~5·10⁵), so when the rank-k error itself is below ``RESOLVABLE``·‖A‖² (retained ≥ 99.9 %) the
excess cannot be told from rounding: the iteration stops and the excess is reported as None.
When ℓ would reach min(m, n) the "sketch" is the whole matrix: an exact SVD is taken instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .lowrank import FactorSVD

MIN_OVERSAMPLE = 8
MIN_STEPS = 4  # products after the first: the cost of two classic power iterations
MAX_STEPS = 16
TOLERANCE = 5e-3  # stop once the estimated excess over the optimal rank-k error is at most 0.5 % (half the 1 % aim)
SAFETY = 2.0
RESOLUTION = 2e-6  # energy resolution of fp32 products, as a fraction of ‖A‖²
RESOLVABLE = 1e-3  # rank-k error² below this fraction of ‖A‖²: the excess is below what fp32 resolves


@dataclass
class SketchedSVD:
    """The leading singular triplets of A: ``svd.values`` are the sketch's ℓ values (estimates from below)."""

    svd: FactorSVD  # left m × ℓ, values (ℓ,) float64, right ℓ × n
    energy: float  # ‖A‖_F² (exact)
    steps: int = 0  # products by A or Aᵀ after the first (0: an exact SVD)
    history: list[torch.Tensor] = field(default_factory=list)  # the sketch's singular values after each step
    exact: bool = False

    def retained(self, k: int) -> float:
        """‖A_k‖_F² / ‖A‖_F²: the fraction of the energy the rank-k result keeps (1 for A = 0)."""
        if self.energy <= 0:
            return 1.0
        return min(1.0, float((self.svd.values[:k] ** 2).sum()) / self.energy)

    def excess(self, k: int) -> float | None:
        """Estimated ‖A − A_k‖ / ‖A − A_k,optimal‖ − 1 (see the module docstring): 0 for an exact SVD,
        None when the error is below fp32's resolution, inf when the iteration has not converged."""
        if self.exact:
            return 0.0
        return estimate_excess(self.history, self.energy, k)


def estimate_excess(history: list[torch.Tensor], energy: float, k: int) -> float | None:
    """The excess estimate from the sketch's singular values after each step (module docstring)."""
    if energy <= 0 or not history:
        return None
    gains = [float((s[:k] ** 2).sum()) for s in history]
    error2 = energy - gains[-1]
    if error2 < RESOLVABLE * energy:
        return None
    if len(gains) < 3:
        return math.inf
    noise = RESOLUTION * energy
    last, before = gains[-1] - gains[-2], gains[-2] - gains[-3]
    values = history[-1]
    theory = float(values[-1] / values[k - 1]) ** 2 if values.numel() > k and float(values[k - 1]) > 0 else 0.0
    if last <= noise:  # converged to fp32's resolution
        missing = noise
    else:
        rate = max(theory, min(1.0, last / max(before, noise)))
        if rate >= 1.0:
            return math.inf
        missing = max(noise, SAFETY * last * rate / (1.0 - rate))
    if missing >= error2:
        return math.inf
    return math.sqrt(error2 / (error2 - missing)) - 1.0


def sketch_width(rank: int, shape: tuple[int, int], oversample: int | None = None) -> int:
    """ℓ = k + p for a rank-k sketch of an m × n matrix (p = k, at least 8), at most min(m, n)."""
    extra = max(MIN_OVERSAMPLE, rank) if oversample is None else oversample
    return min(rank + extra, min(shape))


def sketched_svd(matrix: torch.Tensor, rank: int, *, oversample: int | None = None, tolerance: float = TOLERANCE,
                 min_steps: int = MIN_STEPS, max_steps: int = MAX_STEPS, seed: int = 0,
                 energy: float | None = None) -> SketchedSVD:
    """The leading singular triplets of ``matrix`` (m × n, float32) for a rank-``rank`` approximation.

    Runs on the matrix's device; the small ℓ × ℓ decompositions on the CPU in float64. ``seed``
    fixes the random test matrix, so a job gives the same file every time. ``energy``: ‖matrix‖_F²
    when the caller has it already.
    """
    m, n = matrix.shape
    if energy is None:
        energy = float(torch.linalg.vector_norm(matrix)) ** 2
    width = sketch_width(rank, (m, n), oversample)
    if width >= min(m, n):
        return _exact(matrix, energy)
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    test = torch.randn(n, width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ test).Q
    on_left = True  # basis spans columns (left side) of the matrix
    history: list[torch.Tensor] = []
    while True:
        product = matrix.mT @ basis if on_left else matrix @ basis
        new_basis, triangle = torch.linalg.qr(product)
        small = triangle.double().cpu()
        history.append(torch.linalg.svdvals(small))
        done = len(history) >= max_steps
        if len(history) >= min_steps and not done:
            excess = estimate_excess(history, energy, rank)
            done = excess is None or excess <= tolerance
        if done:
            break
        basis, on_left = new_basis, not on_left
    p, values, wh = torch.linalg.svd(small, full_matrices=False)
    p, w = p.to(matrix.device, matrix.dtype), wh.mT.to(matrix.device, matrix.dtype)
    if on_left:  # product = Aᵀ Q = N T, so Qᵀ A = Tᵀ Nᵀ = W Σ (N P)ᵀ
        left, right = basis @ w, (new_basis @ p).mT
    else:  # product = A Q = N T = N P Σ Wᵀ, so A Q Qᵀ = (N P) Σ (Q W)ᵀ
        left, right = new_basis @ p, (basis @ w).mT
    return SketchedSVD(FactorSVD(left=left, values=values, right=right), energy, len(history), history)


def _exact(matrix: torch.Tensor, energy: float) -> SketchedSVD:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return SketchedSVD(FactorSVD(left=u, values=s.double().cpu(), right=vh), energy, exact=True)
