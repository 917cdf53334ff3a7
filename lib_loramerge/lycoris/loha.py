"""LyCORIS LoHa (``hada_*``): ΔW = scale · (W₁ ⊙ W₂), each Wᵢ a low-rank product, as A1111 applies it.

Keys ``hada_w1_a`` (out, r₁), ``hada_w1_b`` (r₁, in·kh·kw or in, kh, kw), ``hada_w2_a``/``hada_w2_b``
likewise with r₂, optional CP cores ``hada_t1``/``hada_t2`` (r, r, kh, kw) (then ``hada_w*_a`` is
(r, out) and ``hada_w*_b`` (r, in)). A1111 (``network_hada.py``): ``dim = hada_w1_b.shape[0]``,
scale = alpha / dim (1 without alpha); ΔW is reshaped to the layer's weight.

Exact factor form: a Hadamard product of U₁D₁ and U₂D₂ is U·D with U the row-wise Khatri–Rao
product (U[o, (a, b)] = U₁[o, a]·U₂[o, b]) and D the column-wise one (D[(a, b), j] = D₁[a, j]·D₂[b, j]),
rank r₁·r₂. The CP variants fold their core into D first, so they are exact too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .base import CP, DECOMPOSED, LycorisModule, Side


def khatri_rao(p1: tuple[torch.Tensor, torch.Tensor], p2: tuple[torch.Tensor, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, D) with U @ D = (U₁ @ D₁) ⊙ (U₂ @ D₂)."""
    (u1, d1), (u2, d2) = p1, p2
    up = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], -1)
    down = (d1[:, None, :] * d2[None, :, :]).reshape(-1, d1.shape[1])
    return up, down


@dataclass
class LohaModule(LycorisModule):
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    algo = "hada"
    label = "LoHa"
    TENSORS = ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")

    def sides(self) -> tuple[Side, Side]:
        return (Side(CP, a=self.w1_a, b=self.w1_b, t=self.t1) if self.t1 is not None
                else Side(DECOMPOSED, a=self.w1_a, b=self.w1_b),
                Side(CP, a=self.w2_a, b=self.w2_b, t=self.t2) if self.t2 is not None
                else Side(DECOMPOSED, a=self.w2_a, b=self.w2_b))

    combine = staticmethod(khatri_rao)

    @property
    def dim(self) -> int:
        return int(self.w1_b.shape[0])

    def _factor_shape(self) -> tuple[tuple[int, ...], bool]:
        s1, s2 = self.sides()
        for side in (s1, s2):  # a CP core or a 4-D hada_w*_b gives the kernel
            if len(side.shape) == 4:
                return side.shape, True
        return s1.shape, False

    def check_shapes(self, fail: Callable[[str], None]) -> None:
        s1, s2 = self.sides()
        s1.check("hada_w1", fail)
        s2.check("hada_w2", fail)
        if s1.flat != s2.flat:
            fail(f"hada_w1 gives {list(s1.shape)} but hada_w2 gives {list(s2.shape)}: the Hadamard product needs "
                 "equal shapes")
