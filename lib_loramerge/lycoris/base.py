"""What the LyCORIS module types share: lazily read tensors, the layer shape, one side's exact factor pair.

A LyCORIS module's update is built from one or two *sides*, each a small matrix given in one of
three forms (as A1111's ``network_hada.py`` / ``network_lokr.py`` read them):

- decomposed: ``a`` (m, r) and ``b`` (r, n…): the side is a @ b.reshape(r, -1);
- full: one matrix W (m, n…): the side is W.reshape(m, -1);
- CP / Tucker: ``t`` (r, r', kh, kw), ``a`` (r, m), ``b`` (r', n): the side is
  W[o, i, k, l] = Σ a[p, o] · t[p, q, k, l] · b[q, i] (A1111's ``make_weight_cp``).

Every form has an exact factor pair (U, D) with side = U @ D, U (m, ρ), D (ρ, n·kh·kw), without
forming the side: decomposed (a, b); full (I, W) or (W, I), whichever is smaller; CP (aᵀ, t folded
into b). The module types combine the two sides' pairs (Khatri–Rao for LoHa, Kronecker for LoKr)
into the pair the merge engine needs (``NetworkModule.factor_matrices``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch

from ..errors import LoraMergeError
from ..model import FactorDelta, kind_of

Loader = Callable[[], dict[str, torch.Tensor]]

DECOMPOSED, FULL, CP = "decomposed", "full", "cp"


@dataclass(frozen=True)
class Side:
    """One side of a LyCORIS module in one of the three forms (tensors may be shape-only "meta")."""

    form: str
    a: torch.Tensor | None = None  # decomposed: (m, r); CP: (r, m)
    b: torch.Tensor | None = None  # decomposed: (r, n…); CP: (r', n)
    w: torch.Tensor | None = None  # full
    t: torch.Tensor | None = None  # CP core (r, r', kh, kw)

    @property
    def shape(self) -> tuple[int, ...]:
        """The side's own shape: (m, n) or, for CP and 4-D full / decomposed-b sides, (m, n, kh, kw)."""
        if self.form == FULL:
            return tuple(int(d) for d in self.w.shape)
        if self.form == CP:
            return (int(self.a.shape[1]), int(self.b.shape[1]), *(int(d) for d in self.t.shape[2:]))
        return (int(self.a.shape[0]), *(int(d) for d in self.b.shape[1:]))

    @property
    def flat(self) -> tuple[int, int]:
        m, *rest = self.shape
        return m, math.prod(rest)

    @property
    def rank(self) -> int:
        """ρ, the inner size of the exact factor pair."""
        if self.form == FULL:
            return min(self.flat)
        if self.form == CP:
            return int(self.t.shape[0])
        return int(self.b.shape[0])

    def pair(self, dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, D) with U @ D = the side as an (m, n·kh·kw) matrix."""
        cast = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
        m, n = self.flat
        if self.form == FULL:
            w = cast(self.w).reshape(m, n)
            if m <= n:
                return torch.eye(m, dtype=dtype, device=device), w
            return w, torch.eye(n, dtype=dtype, device=device)
        if self.form == CP:
            folded = torch.einsum("pqkl,qi->pikl", cast(self.t), cast(self.b))
            return cast(self.a).T, folded.reshape(folded.shape[0], -1)
        a, b = cast(self.a), cast(self.b)
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)

    def check(self, label: str, fail: Callable[[str], None]) -> None:
        """Refuse shapes that do not fit together (as A1111 would fail on them)."""
        shapes = {k: list(v.shape) for k, v in (("a", self.a), ("b", self.b), ("w", self.w), ("t", self.t))
                  if v is not None}
        if self.form == FULL:
            if self.w.ndim not in (2, 4):
                fail(f"{label} must be 2-D or 4-D, got {shapes['w']}")
        elif self.form == CP:
            if self.a.ndim != 2 or self.b.ndim != 2 or self.t.ndim != 4 or \
                    (self.t.shape[0], self.t.shape[1]) != (self.a.shape[0], self.b.shape[0]):
                fail(f"{label} CP factors do not fit (t {shapes['t']}, a {shapes['a']}, b {shapes['b']})")
        else:
            if self.a.ndim != 2 or self.b.ndim not in (2, 4) or self.a.shape[1] != self.b.shape[0]:
                fail(f"{label} factors {shapes['a']} and {shapes['b']} do not fit")


@dataclass
class LycorisModule(FactorDelta):
    """Base of the LyCORIS module types: name, alpha, tensors (possibly lazy), layer shape.

    Subclasses declare their tensors as ``torch.Tensor | None`` fields named like the file's key
    suffixes without the algorithm prefix (``w1_a`` for ``lokr_w1_a``), list them in ``TENSORS``,
    and define ``sides``, ``combine``, ``dim`` and ``check_shapes``.
    """

    name: str
    alpha: float | None = None
    # the layer's weight shape when the factors alone do not tell it (a flat (out, in·kh·kw) side
    # on a convolution): filled in by the reader from the SD layouts
    shape: tuple[int, ...] | None = None
    loader: Loader | None = field(default=None, repr=False, compare=False)
    source: Path | None = field(default=None, repr=False, compare=False)

    algo: ClassVar[str] = ""
    label: ClassVar[str] = ""
    TENSORS: ClassVar[tuple[str, ...]] = ()

    # ---- per type ------------------------------------------------------------------------------
    def sides(self) -> tuple[Side, Side]:
        raise NotImplementedError

    @staticmethod
    def combine(p1: tuple[torch.Tensor, torch.Tensor], p2: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def dim(self) -> int | None:
        """A1111's ``dim`` (the divisor of alpha), or None when A1111 ignores alpha."""
        raise NotImplementedError

    def _factor_shape(self) -> tuple[tuple[int, ...], bool]:
        """(shape, known): the update's shape as the factors give it; known=False for a flat 2-D shape
        that may be a convolution's (out, in·kh·kw)."""
        raise NotImplementedError

    def check_shapes(self, fail: Callable[[str], None]) -> None:
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.TENSORS if getattr(self, n) is not None}

    @property
    def is_lazy(self) -> bool:
        return any(t.is_meta for t in self.tensors().values())

    def load(self) -> LycorisModule:
        """This module with its tensors in memory, read and checked now if it was read lazily."""
        if not self.is_lazy:
            return self
        if self.loader is None:
            raise LoraMergeError("internal: lazy module without a loader", self.source, self.name)
        module = replace(self, **self.loader(), loader=None)
        module.validate(self.source)
        return module

    def with_layer_shape(self, shape: tuple[int, ...]) -> LycorisModule:
        return replace(self, shape=tuple(shape))

    @property
    def layer_shape_known(self) -> bool:
        return self.shape is not None or self._factor_shape()[1]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.shape if self.shape is not None else self._factor_shape()[0]

    @property
    def flat_shape(self) -> tuple[int, int]:
        out, *rest = self.weight_shape
        return out, math.prod(rest)

    @property
    def rank(self) -> int:
        """The rank of the exact factor form (an upper bound of ΔW's rank, reached generically)."""
        s1, s2 = self.sides()
        return s1.rank * s2.rank

    @property
    def out_features(self) -> int:
        return int(self.weight_shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight_shape[1])

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    @property
    def kind(self) -> str:
        return kind_of(self.weight_shape)

    @property
    def scale(self) -> float:
        """alpha / dim as A1111 computes it; 1 without alpha or without a dim."""
        dim = self.dim
        return 1.0 if self.alpha is None or dim is None else self.alpha / dim

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors().values())).dtype

    def factor_matrices(self, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(U, D) with ΔW = scale · U @ D exactly: U (out, rank), D (rank, in·kh·kw)."""
        if self.is_lazy:
            return self.load().factor_matrices(dtype, device)
        s1, s2 = self.sides()
        return self.combine(s1.pair(dtype, device), s2.pair(dtype, device))

    def validate(self, path: Path | str | None = None) -> None:
        """Refuse tensors that do not fit together, are empty, not float, or (when loaded) hold NaN/Inf."""

        def fail(reason: str) -> None:
            raise LoraMergeError(reason, path, self.name)

        tensors = self.tensors()
        for key, t in tensors.items():
            if not t.is_floating_point():
                fail(f"{self.algo}_{key} has non-float dtype {t.dtype}")
            if any(d == 0 for d in t.shape):
                fail(f"{self.algo}_{key} is a zero-size tensor {list(t.shape)}")
        self.check_shapes(fail)
        if self.alpha is not None and not math.isfinite(self.alpha):
            fail(f"alpha is {self.alpha}")
        if self.shape is not None and math.prod(self.shape) != math.prod(self._factor_shape()[0]):
            fail(f"factors give {list(self._factor_shape()[0])}, not the layer's {list(self.shape)}")
        if not self.is_lazy:
            for key, t in tensors.items():
                if not math.isfinite(float(t.sum(dtype=torch.float32))):
                    fail(f"{self.algo}_{key} holds NaN or Inf values")
