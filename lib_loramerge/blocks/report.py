"""Per-block ΔW norms of a LoRA, from its factors: ‖s·U·D‖_F² = s²·Σ (UᵀU) ⊙ (DDᵀ), never U·D itself."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..model import LoraModel, NetworkModule
from .layouts import ALL_IDS, FULL_LAYOUT
from .mapping import block_of


def delta_norm(module: NetworkModule) -> float:
    """‖ΔW‖_F of one module at strength 1, through the small r × r Gram matrices."""
    up, down = module.factor_matrices(torch.float32)
    up, down = up.double(), down.double()
    squared = float(((up.T @ up) * (down @ down.T)).sum())
    return abs(module.scale) * math.sqrt(max(squared, 0.0))


@dataclass
class BlockReport:
    layout: list[str]
    norms: dict[str, float]  # block ID → ‖ΔW‖_F over the block's modules (every ID of the layout)
    modules: dict[str, int]  # block ID → module count
    no_block: list[str] = field(default_factory=list)  # modules LBW leaves at ratio 1
    dora: list[str] = field(default_factory=list)  # DoRA modules: counted by their inner ΔW (the real one needs W)

    @property
    def touched(self) -> list[str]:
        return [b for b in self.layout if self.modules.get(b)]

    def as_dict(self) -> dict:
        return {"layout": self.layout, "norms": self.norms, "modules": self.modules, "no_block": self.no_block,
                "dora": self.dora}


def block_norms(lora: LoraModel) -> BlockReport | None:
    """‖ΔW‖_F per LBW block (root of the sum of squares over its modules); None for unknown architectures."""
    layout = FULL_LAYOUT.get(lora.arch)
    if layout is None:
        return None
    squares = dict.fromkeys(ALL_IDS, 0.0)
    counts = dict.fromkeys(ALL_IDS, 0)
    no_block, dora = [], []
    for name, module in lora.modules.items():
        block = block_of(name, lora.arch)
        if block is None:
            no_block.append(name)
            continue
        if module.algo == "dora":  # its effect depends on the base weights: count the ΔW it starts from
            dora.append(name)
            module = module.inner
        squares[block] += delta_norm(module) ** 2
        counts[block] += 1
    return BlockReport(layout=list(layout), norms={b: math.sqrt(squares[b]) for b in layout},
                       modules={b: counts[b] for b in layout}, no_block=no_block, dora=dora)


@dataclass
class BlockEnergy:
    """How much of the exact ΔW an svd merge kept, per LBW block (pooled over the block's modules)."""

    layout: list[str]
    retained: dict[str, float | None]  # block ID → Σ kept ‖ΔW‖² / Σ exact ‖ΔW‖² (None: no module written there)
    modules: dict[str, int]  # block ID → modules written

    def as_dict(self) -> dict:
        return {"layout": self.layout, "retained": self.retained, "modules": self.modules}


def block_energy(energy: dict[str, float], target_energy: dict[str, float], arch: str) -> BlockEnergy | None:
    """Pool an svd merge's per-module retained fractions (``MergeReport.energy``) by block.

    Each module weighs by its exact ‖ΔW‖² (``MergeReport.target_energy``), so a block's value is the
    fraction of that block's total ΔW energy kept, not an average that tiny modules can swing.
    Modules in no block are pooled under no ID. None for unknown architectures.
    """
    layout = FULL_LAYOUT.get(arch)
    if layout is None:
        return None
    kept = dict.fromkeys(ALL_IDS, 0.0)
    total = dict.fromkeys(ALL_IDS, 0.0)
    counts = dict.fromkeys(ALL_IDS, 0)
    for name, fraction in energy.items():
        block = block_of(name, arch)
        if block is None:
            continue
        weight = target_energy[name]
        kept[block] += fraction * weight
        total[block] += weight
        counts[block] += 1
    retained = {b: kept[b] / total[b] if counts[b] and total[b] > 0 else None for b in layout}
    return BlockEnergy(layout=list(layout), retained=retained, modules={b: counts[b] for b in layout})
