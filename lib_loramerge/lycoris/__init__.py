"""LyCORIS module types (one class per algorithm, like A1111's ``network_*.py``) and their construction.

``LohaModule`` (``hada_*``), ``LokrModule`` (``lokr_*``) and ``DoraModule`` (``dora_scale`` on any
module) offer the same interface as :class:`lib_loramerge.model.LoraModule` (the ``NetworkModule``
protocol): LoHa and LoKr give an exact factor pair, so they merge like LoRAs, without dense
matrices; DoRA needs the base weights and is refused by merges.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import Loader, LycorisModule, Side
from .dora import DoraModule
from .loha import LohaModule, khatri_rao
from .lokr import LokrModule, kron_pair

__all__ = ["DoraModule", "LohaModule", "LokrModule", "LycorisModule", "Side", "khatri_rao", "kron_pair",
           "make_module", "algorithm_label", "network_dim", "is_lycoris"]

TYPES: dict[str, type[LycorisModule]] = {"hada": LohaModule, "lokr": LokrModule}
# key suffix → (algorithm prefix, field)
PARTS = {f"{algo}_{name}": (algo, name) for algo, cls in TYPES.items() for name in cls.TENSORS}
DORA_SCALE = "dora_scale"


def make_module(algo: str, name: str, tensors: dict[str, torch.Tensor], alpha: float | None,
                loader: Loader | None = None, source: Path | None = None) -> LycorisModule:
    """A LoHa or LoKr module from its tensors by field name (shape-only meta tensors when lazy)."""
    module = TYPES[algo](name=name, alpha=alpha, loader=loader, source=source, **tensors)
    module.validate(source)
    return module


def is_lycoris(module) -> bool:
    """A LoHa / LoKr module (a DoRA module counts by its inner module)."""
    inner = getattr(module, "inner", module)
    return isinstance(inner, LycorisModule)


def network_dim(module) -> int:
    """The rank a file declares for a module (LoRA: its rank; LoHa/LoKr: A1111's dim, else the factor rank)."""
    dim = getattr(module, "dim", None)
    return int(dim) if dim is not None else int(module.rank)


def algorithm_label(module) -> str:
    """LoRA, LoCon, LoCon (Tucker), LoHa, LoKr, DoRA, LoHa + DoRA, LoKr + DoRA."""
    label = getattr(module, "label", None)
    if label:
        return label
    if getattr(module, "mid", None) is not None:
        return "LoCon (Tucker)"
    return "LoCon" if module.kind == "conv" else "LoRA"
