"""The randomized SVD of extraction against a dense float64 SVD computed here, on small shapes."""

from __future__ import annotations

import math

import pytest
import torch

from lib_loramerge.ops.sketch import MAX_STEPS, MIN_STEPS, sketch_width, sketched_svd


def with_spectrum(m: int, n: int, values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A float32 m × n matrix whose singular values are ``values`` (float64 construction)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    return ((u * values[:r]) @ v.T).float()


def rank_k(sketch, k: int) -> torch.Tensor:
    svd = sketch.svd
    return (svd.left[:, :k].double() * svd.values[:k]) @ svd.right[:k].double()


i = torch.arange(1, 401, dtype=torch.float64)
SPECTRA = {
    "power 0.1 (nearly flat)": i ** -0.1,
    "power 0.5": i ** -0.5,
    "power 1": i ** -1.0,
    "exponential": torch.exp(-i / 15),
    "low rank 48 + noise": torch.cat([torch.linspace(10, 5, 48), torch.full((352,), 0.2)]),
    "cluster across k": torch.cat([torch.linspace(10, 9.5, 30), torch.full((370,), 0.5)]),
}


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("k", [4, 16])
def test_error_is_within_one_percent_of_optimal_and_the_estimate_is_not_below_it(name, k):
    a = with_spectrum(400, 300, SPECTRA[name])
    reference = torch.linalg.svdvals(a.double())  # dense SVD of the very matrix decomposed
    optimal = float(reference[k:].square().sum().sqrt())
    sketch = sketched_svd(a, k, seed=3)
    error = float((a.double() - rank_k(sketch, k)).norm())
    true_excess = error / optimal - 1
    assert true_excess <= 0.01, (name, k, true_excess)
    estimate = sketch.excess(k)
    assert estimate is not None and true_excess <= estimate + 1e-5, (name, k, true_excess, estimate)
    # the retained fraction is exact: the rank-k result is a projection of A
    assert sketch.retained(k) == pytest.approx(1 - error**2 / float(a.double().square().sum()), abs=2e-6)


def test_an_exactly_low_rank_matrix_comes_back_to_fp32_precision():
    a = with_spectrum(300, 200, torch.cat([torch.tensor([5.0, 4, 3, 2, 1], dtype=torch.float64),
                                           torch.zeros(195, dtype=torch.float64)]))
    sketch = sketched_svd(a, 5, seed=1)
    assert float((rank_k(sketch, 5) - a.double()).norm() / a.double().norm()) < 2e-6
    assert sketch.retained(5) == pytest.approx(1.0, abs=1e-6)
    assert sketch.excess(5) is None  # the error is at fp32 rounding: no excess to resolve
    assert sketch.steps == MIN_STEPS  # nothing left to converge


def test_small_layers_take_an_exact_svd_and_are_optimal():
    a = with_spectrum(40, 24, torch.linspace(3, 1, 24, dtype=torch.float64))
    assert sketch_width(16, (40, 24)) == 24
    sketch = sketched_svd(a, 16)
    assert sketch.exact and sketch.steps == 0 and sketch.excess(16) == 0.0
    reference = torch.linalg.svdvals(a.double())
    error = float((a.double() - rank_k(sketch, 16)).norm())
    assert error == pytest.approx(float(reference[16:].square().sum().sqrt()), rel=1e-5)


def test_iterations_follow_the_spectrum_and_the_seed_fixes_the_result():
    steep = with_spectrum(400, 300, torch.exp(-i / 3))
    flat = with_spectrum(400, 300, i ** -0.1)
    fast, slow = sketched_svd(steep, 8), sketched_svd(flat, 8)
    assert fast.steps == MIN_STEPS < slow.steps <= MAX_STEPS
    again = sketched_svd(flat, 8)
    assert torch.equal(again.svd.left, slow.svd.left) and torch.equal(again.svd.values, slow.svd.values)
    other = sketched_svd(flat, 8, seed=99)
    assert not torch.equal(other.svd.left, slow.svd.left)


def test_the_sketch_is_sized_to_the_rank():
    assert sketch_width(32, (1280, 1280)) == 64  # oversampling p = k
    assert sketch_width(4, (1280, 1280)) == 12  # at least 8
    assert sketch_width(32, (1280, 40)) == 40
    a = with_spectrum(500, 400, i ** -0.5)
    sketch = sketched_svd(a, 10)
    assert sketch.svd.left.shape == (500, 20) and sketch.svd.right.shape == (20, 400)
    left = sketch.svd.left.double()
    assert torch.allclose(left.T @ left, torch.eye(20, dtype=torch.float64), atol=1e-5)
    assert not math.isnan(sketch.energy) and sketch.energy == pytest.approx(float(i[:400].pow(-1).sum()), rel=1e-5)
