"""A LoRA in memory: named modules holding factor pairs, alpha and kind, plus the file's metadata.

Module names are kohya names (``lora_unet_…``, ``lora_te_…``, ``lora_te1_…``, ``lora_te2_…``)
whatever the input format. The update a module makes to its layer's weight W (shape
``weight_shape``) is, as A1111 applies it at strength 1::

    ΔW = scale · reshape(up₂ @ down₂),   scale = alpha / rank   (1 when the file has no alpha)

where up₂ is ``up`` as an (out, rank) matrix and down₂ is ``down`` as a (rank, in·kh·kw) matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch

from .errors import LoraMergeError, display_path

LINEAR = "linear"
CONV1X1 = "conv1x1"
CONV = "conv"  # k×k convolution (LoCon)
KINDS = (LINEAR, CONV1X1, CONV)

TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")  # te3: Flux's T5-XXL (kohya)


def is_text_encoder(name: str) -> bool:
    """Whether a kohya module name belongs to a text encoder (its strength is the TE strength)."""
    return name.startswith(TEXT_ENCODER_PREFIXES)


def kind_of(weight_shape: tuple[int, ...]) -> str:
    if len(weight_shape) == 2:
        return LINEAR
    if tuple(weight_shape[2:]) == (1, 1):
        return CONV1X1
    return CONV


class NetworkModule(Protocol):
    """What every module type offers the merge engine, the bake and the inspector.

    ``factor_matrices`` is the contract: an exact pair (U, D) with ΔW = scale · U @ D, U of shape
    (out, r) and D of shape (r, in·kh·kw), from which merges and ranks are computed.
    """

    name: str
    alpha: float | None
    algo: str

    @property
    def rank(self) -> int: ...
    @property
    def weight_shape(self) -> tuple[int, ...]: ...
    @property
    def kind(self) -> str: ...
    @property
    def scale(self) -> float: ...
    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def is_lazy(self) -> bool: ...
    @property
    def is_text_encoder(self) -> bool: ...
    @property
    def out_features(self) -> int: ...
    @property
    def in_features(self) -> int: ...
    @property
    def kernel_size(self) -> tuple[int, ...]: ...
    def load(self) -> NetworkModule: ...
    def factor_matrices(self, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]: ...
    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor: ...


class FactorDelta:
    """ΔW and the strength rule for module types whose update is scale · U @ D of ``factor_matrices``."""

    name: str

    @property
    def is_text_encoder(self) -> bool:
        return is_text_encoder(self.name)

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """The dense ΔW at strength 1, in the layer's weight shape. For checks and baking only."""
        up, down = self.factor_matrices(dtype, device)  # type: ignore[attr-defined]
        return (self.scale * (up @ down)).reshape(self.weight_shape)  # type: ignore[attr-defined]


@dataclass
class LoraModule(FactorDelta):
    """One LoRA / LoCon module: ``up`` (out, r[, 1, 1]), ``down`` (r, in[, kh, kw]), optional Tucker ``mid``.

    With ``mid`` (LyCORIS Tucker LoCon) the shapes are up (out, r, 1, 1), mid (r, r, kh, kw) and
    down (r, in, 1, 1), and ΔW[i,j,k,l] = scale · Σ_nm up[i,n] · mid[n,m,k,l] · down[m,j].
    """

    name: str
    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None = None
    mid: torch.Tensor | None = None
    algo: str = "lora"
    # A module read lazily holds shape-only ("meta") tensors and reads its factors when needed,
    # so a merge holds one module of each input in memory at a time, not whole files.
    loader: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = field(
        default=None, repr=False, compare=False)
    source: Path | None = field(default=None, repr=False, compare=False)

    @property
    def is_lazy(self) -> bool:
        return self.up.is_meta

    def load(self, check_values: bool = True) -> LoraModule:
        """This module with its factors in memory, read and checked now if it was read lazily.

        ``check_values=False``: the caller checks for NaN/Inf itself (a batch at once) and calls
        :func:`validate_values` on the culprit.
        """
        if not self.is_lazy:
            return self
        if self.loader is None:
            raise LoraMergeError("internal: lazy module without a loader", self.source, self.name)
        up, down, mid = self.loader()
        module = replace(self, up=up, down=down, mid=mid, loader=None)
        validate_shapes(module, self.source)
        if check_values:
            validate_values(module, self.source)
        return module

    def file_reads(self, up: torch.Tensor, down: torch.Tensor) -> tuple[object, tuple] | None:
        """How to read a lazily read plain module's factors into ``up`` and ``down`` (contiguous, of the
        file's dtypes and the factors' shapes: buffers a batch reuses): (its file, the requests for the
        file's ``read_many_into``), so a batch reads each file at once; None when its loader cannot."""
        requests = getattr(self.loader, "requests", None)
        if not self.is_lazy or self.mid is not None or requests is None:
            return None
        return self.loader.tf, requests(up, down)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])

    @property
    def kernel_size(self) -> tuple[int, ...]:
        if self.mid is not None:
            return tuple(int(d) for d in self.mid.shape[2:])
        return tuple(int(d) for d in self.down.shape[2:])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel_size)

    @property
    def kind(self) -> str:
        return kind_of(self.weight_shape)

    @property
    def scale(self) -> float:
        """alpha / rank, or 1 when the file stored no alpha (A1111's rule)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def dtype(self) -> torch.dtype:
        return self.up.dtype

    def factor_matrices(self, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(U, D) with ΔW = scale · U @ D: U is (out, r), D is (r, in·kh·kw); Tucker ``mid`` folded into D."""
        if self.is_lazy:
            return self.load().factor_matrices(dtype, device)
        up = self.up.to(device=device, dtype=dtype).reshape(self.out_features, self.rank)
        down = self.down.to(device=device, dtype=dtype)
        if self.mid is not None:
            mid = self.mid.to(device=device, dtype=dtype)
            down = torch.einsum("nmkl,mj->njkl", mid, down.reshape(self.rank, self.in_features))
        return up, down.reshape(self.rank, -1)


@dataclass
class LoraModel:
    """A LoRA file read into memory, in kohya module names."""

    modules: dict[str, NetworkModule]  # LoraModule, or a LyCORIS type (lib_loramerge.lycoris)
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "kohya"
    path: Path | None = None
    arch: str = "unknown"
    arch_notes: list[str] = field(default_factory=list)
    extras: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # key → (dtype, shape)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The file's name without suffix, printable (bytes that are not UTF-8 shown as \\xNN)."""
        return display_path(self.path.stem) if self.path else "<memory>"

    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    def dtypes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in self.modules.values():
            key = str(m.dtype).replace("torch.", "")
            counts[key] = counts.get(key, 0) + 1
        return counts


def validate_module(module: LoraModule, path: Path | str | None = None) -> None:
    """Refuse factors that do not fit together, are empty, or hold NaN/Inf, naming the module."""
    validate_shapes(module, path)
    if not module.is_lazy:
        validate_values(module, path)


def validate_shapes(module: LoraModule, path: Path | str | None = None) -> None:
    """The checks that need only shapes and dtypes (valid for lazily read modules too)."""

    def fail(reason: str) -> None:
        raise LoraMergeError(reason, path, module.name)

    up, down, mid = module.up, module.down, module.mid
    if up.ndim not in (2, 4) or down.ndim not in (2, 4):
        fail(f"up {list(up.shape)} and down {list(down.shape)} must be 2-D (linear) or 4-D (conv)")
    if any(d == 0 for t in (up, down, *(() if mid is None else (mid,))) for d in t.shape):
        fail(f"zero-size tensor (up {list(up.shape)}, down {list(down.shape)})")
    if up.shape[1] != down.shape[0]:
        fail(f"up {list(up.shape)} and down {list(down.shape)} do not fit (ranks {up.shape[1]} and {down.shape[0]})")
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        fail(f"conv up factor must be {up.shape[0]}×{up.shape[1]}×1×1, got {list(up.shape)}")
    if up.ndim != down.ndim:
        fail(f"up {list(up.shape)} and down {list(down.shape)} mix linear and conv shapes")
    if mid is not None:
        r = down.shape[0]
        if mid.ndim != 4 or tuple(mid.shape[:2]) != (r, r) or down.ndim != 4 or tuple(down.shape[2:]) != (1, 1):
            fail(f"Tucker factors do not fit (up {list(up.shape)}, mid {list(mid.shape)}, down {list(down.shape)})")
    for label, t in (("up", up), ("down", down), ("mid", mid)):
        if t is not None and not t.is_floating_point():
            fail(f"{label} factor has non-float dtype {t.dtype}")
    if module.alpha is not None and not math.isfinite(module.alpha):
        fail(f"alpha is {module.alpha}")


def validate_values(module: LoraModule, path: Path | str | None = None) -> None:
    for label, t in (("up", module.up), ("down", module.down), ("mid", module.mid)):
        # NaN and ±Inf propagate into a sum: one fused pass, ~15× cheaper than isfinite().all()
        if t is not None and not math.isfinite(float(t.sum(dtype=torch.float32))):
            raise LoraMergeError(f"{label} factor holds NaN or Inf values", path, module.name)
