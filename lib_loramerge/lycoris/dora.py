"""DoRA (``dora_scale``, "weight decompose"): a LoRA / LoHa / LoKr module plus a magnitude vector.

A1111 1.10 (``network.py``, ``NetworkModule.finalize_updown`` and ``apply_weight_decompose``)
applies it to the layer weight W, after computing the inner module's ΔW (scale included, the
multiplier not yet)::

    W' = W + ΔW
    n  = ‖W'‖ over every dim except dim 1          (one norm per input column j)
    updown = W' · (dora_scale / n) − W
    W_new = W + multiplier · updown

So the result depends on W: a DoRA module cannot become a plain LoRA without the base weights.
It is read (lazily, like any module) so ``info`` can describe it and a bake can apply it with
:func:`lib_loramerge.ops.dora.apply_dora`; merges refuse it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import LoraMergeError

Loader = Callable[[], torch.Tensor]


@dataclass
class DoraModule:
    inner: object  # the LoraModule / LohaModule / LokrModule giving ΔW
    dora_scale: torch.Tensor
    loader: Loader | None = field(default=None, repr=False, compare=False)
    source: Path | None = field(default=None, repr=False, compare=False)

    algo = "dora"

    @property
    def label(self) -> str:
        inner = getattr(self.inner, "label", "")
        return f"{inner} + DoRA" if inner in ("LoHa", "LoKr") else "DoRA"

    # delegated to the inner module
    @property
    def name(self) -> str:
        return self.inner.name

    @name.setter
    def name(self, value: str) -> None:
        self.inner.name = value

    @property
    def alpha(self) -> float | None:
        return self.inner.alpha

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def dim(self) -> int | None:
        return getattr(self.inner, "dim", self.inner.rank)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.inner.weight_shape

    @property
    def layer_shape_known(self) -> bool:
        return getattr(self.inner, "layer_shape_known", True)

    def with_layer_shape(self, shape: tuple[int, ...]) -> DoraModule:
        return replace(self, inner=self.inner.with_layer_shape(shape))

    @property
    def kind(self) -> str:
        return self.inner.kind

    @property
    def scale(self) -> float:
        return self.inner.scale

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    @property
    def is_text_encoder(self) -> bool:
        return self.inner.is_text_encoder

    @property
    def out_features(self) -> int:
        return self.inner.out_features

    @property
    def in_features(self) -> int:
        return self.inner.in_features

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.inner.kernel_size

    @property
    def mid(self):  # a DoRA LoCon may carry a Tucker core
        return getattr(self.inner, "mid", None)

    @property
    def is_lazy(self) -> bool:
        return self.dora_scale.is_meta or self.inner.is_lazy

    def load(self) -> DoraModule:
        if not self.is_lazy:
            return self
        scale = self.dora_scale
        if scale.is_meta:
            if self.loader is None:
                raise LoraMergeError("internal: lazy module without a loader", self.source, self.name)
            scale = self.loader()
        module = replace(self, inner=self.inner.load(), dora_scale=scale, loader=None)
        module.validate(self.source)
        return module

    def _refuse(self) -> LoraMergeError:
        return LoraMergeError("DoRA module (dora_scale): its update depends on the base model's weights, so it "
                              "cannot become a plain LoRA; bake it into a checkpoint instead", self.source, self.name)

    def factor_matrices(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        raise self._refuse()

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        raise self._refuse()

    def validate(self, path: Path | str | None = None) -> None:
        s = self.dora_scale
        if not s.is_floating_point():
            raise LoraMergeError(f"dora_scale has non-float dtype {s.dtype}", path, self.name)
        out, inp = self.out_features, self.in_features
        if s.numel() not in (out, inp) or max(s.shape) != s.numel():
            raise LoraMergeError(f"dora_scale {list(s.shape)} fits neither the layer's {inp} input columns nor its "
                                 f"{out} output rows", path, self.name)
        if not s.is_meta and not math.isfinite(float(s.sum(dtype=torch.float32))):
            raise LoraMergeError("dora_scale holds NaN or Inf values", path, self.name)
