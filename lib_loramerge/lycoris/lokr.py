"""LyCORIS LoKr (``lokr_*``): ΔW = scale · kron(W₁, W₂), reshaped to the layer, as A1111 applies it.

W₁ is ``lokr_w1`` (a, b) or ``lokr_w1_a`` (a, r₁) @ ``lokr_w1_b`` (r₁, b). W₂ is ``lokr_w2``
(c, d) or (c, d, kh, kw), or ``lokr_w2_a`` (c, r₂) @ ``lokr_w2_b`` (r₂, d·kh·kw), or with a CP core
``lokr_t2`` (r₂, r₂, kh, kw): ``lokr_w2_a`` (r₂, c), ``lokr_w2_b`` (r₂, d). A 4-D W₂ is Kronecker-
multiplied over all dims with W₁ as (a, b, 1, 1), which is kron(W₁, W₂ as a c × d·kh·kw matrix) in the
layer's flattened (out, in·kh·kw) form, so ΔW (flattened) = kron(W₁, W₂ flattened) in every case.

Scale (A1111 ``network_lokr.py``): ``dim`` is ``lokr_w2_b.shape[0]`` when W₂ is decomposed, else
``lokr_w1_b.shape[0]`` when W₁ is, else none; scale = alpha / dim, or 1 without alpha or dim (alpha
is ignored when both sides are full matrices).

Exact factor form: kron(U₁D₁, U₂D₂) = kron(U₁, U₂) · kron(D₁, D₂), rank ρ₁·ρ₂; and the SVD of a
Kronecker product is the Kronecker product of the sides' SVDs (``ops.lowrank.kron_svd``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .base import CP, DECOMPOSED, FULL, LycorisModule, Side


def kron_pair(p1: tuple[torch.Tensor, torch.Tensor], p2: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, D) with U @ D = kron(U₁ @ D₁, U₂ @ D₂)."""
    (u1, d1), (u2, d2) = (tuple(t.contiguous() for t in p) for p in (p1, p2))  # torch.kron needs contiguous
    return torch.kron(u1, u2), torch.kron(d1, d2)


@dataclass
class LokrModule(LycorisModule):
    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    algo = "lokr"
    label = "LoKr"
    TENSORS = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")

    def sides(self) -> tuple[Side, Side]:
        s1 = Side(FULL, w=self.w1) if self.w1 is not None else Side(DECOMPOSED, a=self.w1_a, b=self.w1_b)
        if self.w2 is not None:
            s2 = Side(FULL, w=self.w2)
        elif self.t2 is not None:
            s2 = Side(CP, a=self.w2_a, b=self.w2_b, t=self.t2)
        else:
            s2 = Side(DECOMPOSED, a=self.w2_a, b=self.w2_b)
        return s1, s2

    combine = staticmethod(kron_pair)

    @property
    def dim(self) -> int | None:
        if self.w2_b is not None:
            return int(self.w2_b.shape[0])
        if self.w1_b is not None:
            return int(self.w1_b.shape[0])
        return None

    def kron_sides(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
                   ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The two sides' exact factor pairs: ΔW = scale · kron(U₁ @ D₁, U₂ @ D₂)."""
        if self.is_lazy:
            return self.load().kron_sides(dtype, device)
        s1, s2 = self.sides()
        return s1.pair(dtype, device), s2.pair(dtype, device)

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """The dense ΔW from the two small products: O(out·in), where the factor form of two full
        sides would cost O(out·in·rank)."""
        (u1, d1), (u2, d2) = self.kron_sides(dtype, device)
        return (self.scale * torch.kron(u1 @ d1, u2 @ d2)).reshape(self.weight_shape)

    def _factor_shape(self) -> tuple[tuple[int, ...], bool]:
        s1, s2 = self.sides()
        (a, b), w2 = s1.shape, s2.shape
        if len(w2) == 4:
            return (a * w2[0], b * w2[1], *w2[2:]), True
        return (a * w2[0], b * w2[1]), False

    def check_shapes(self, fail: Callable[[str], None]) -> None:
        if self.w1 is not None and (self.w1_a is not None or self.w1_b is not None):
            fail("has both lokr_w1 and lokr_w1_a/lokr_w1_b")
        if self.w2 is not None and (self.w2_a is not None or self.w2_b is not None or self.t2 is not None):
            fail("has both lokr_w2 and lokr_w2_a/lokr_w2_b")
        s1, s2 = self.sides()
        s1.check("lokr_w1", fail)
        s2.check("lokr_w2", fail)
        if len(s1.shape) != 2:
            fail(f"lokr_w1 must be a matrix, got {list(s1.shape)}")
        if s2.form == DECOMPOSED and self.w2_b.ndim != 2:
            fail(f"lokr_w2_b must be 2-D, got {list(self.w2_b.shape)}")
