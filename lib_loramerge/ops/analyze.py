"""Interference analysis of LoRAs before merging: norms and pairwise cosines per module, per LBW block
and overall, from the factors (:mod:`.inner`), never a dense ΔW.

For inputs i, j and a group G of modules (one module, a block, the whole LoRA), with Aᵢ = sᵢ·ΔWᵢ
(a module an input lacks is zero there):

* ‖Aᵢ‖_G = √(Σ_{m∈G} ‖Aᵢₘ‖²), the norm of the group's flattened update;
* cos_G(i, j) = Σ_m ⟨Aᵢₘ, Aⱼₘ⟩ / (‖Aᵢ‖_G ‖Aⱼ‖_G), the cosine of the flattened group updates;
* overlap_G(i, j) = 2 Σ_m ⟨Aᵢₘ, Aⱼₘ⟩ / (‖Aᵢ‖²_G + ‖Aⱼ‖²_G): the share of the energy of Aᵢ + Aⱼ that
  comes from their common directions, ‖Aᵢ + Aⱼ‖² = (‖Aᵢ‖² + ‖Aⱼ‖²)(1 + overlap). Positive: the sum
  reinforces (stacking them overshoots there); negative: they cancel; ≈ 0: orthogonal, a plain sum
  keeps both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

import torch

from ..blocks.layouts import FULL_LAYOUT
from ..blocks.mapping import block_of
from ..checks import as_strength
from ..errors import LoraMergeError
from ..model import LoraModel, is_text_encoder
from . import inner
from .merge import parallel_map

# |cos| at or above this: the inputs interfere there; below ORTHOGONAL: independent
INTERFERING = 0.3
ORTHOGONAL = 0.05
ALL = "all"


@dataclass
class GroupStats:
    """Squared norms per input and inner products per pair, summed over a group of modules."""

    squares: list[float]
    products: dict[tuple[int, int], float]
    modules: int = 0

    def add(self, g: torch.Tensor) -> None:
        self.modules += 1
        for i in range(len(self.squares)):
            self.squares[i] += float(g[i, i])
        for pair in self.products:
            self.products[pair] += float(g[pair])

    def norm(self, i: int) -> float:
        return math.sqrt(max(self.squares[i], 0.0))

    def cosine(self, i: int, j: int) -> float | None:
        denominator = math.sqrt(self.squares[i] * self.squares[j])
        return max(-1.0, min(1.0, self.products[(i, j)] / denominator)) if denominator > 0 else None

    def overlap(self, i: int, j: int) -> float | None:
        total = self.squares[i] + self.squares[j]
        return 2 * self.products[(i, j)] / total if total > 0 else None

    def as_dict(self, names: Sequence[str]) -> dict:
        return {"modules": self.modules, "norms": {n: self.norm(i) for i, n in enumerate(names)},
                "pairs": [{"a": names[i], "b": names[j], "cosine": self.cosine(i, j), "overlap": self.overlap(i, j)}
                          for i, j in self.products]}


@dataclass
class Analysis:
    names: list[str]
    arch: str
    layout: list[str]  # LBW block IDs in order (empty for an unknown architecture)
    total: GroupStats
    blocks: dict[str, GroupStats]  # block ID → stats (modules in no LBW block pooled under "-")
    modules: dict[str, GroupStats] = field(default_factory=dict)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return list(self.total.products)

    def most_similar(self, i: int, j: int, n: int = 5) -> list[tuple[str, float]]:
        """The n modules where inputs i and j are most aligned or opposed (largest |cos|)."""
        ranked = [(name, s.cosine(i, j)) for name, s in self.modules.items() if s.cosine(i, j) is not None]
        return sorted(ranked, key=lambda kv: -abs(kv[1]))[:n]

    def summary(self) -> str:
        """One paragraph: where the inputs interfere, where they are orthogonal, what that means for a merge."""
        sentences = []
        for i, j in self.pairs:
            a, b = self.names[i], self.names[j]
            cos = self.total.cosine(i, j)
            if cos is None:
                sentences.append(f"{a} and {b} share no module with a non-zero update.")
                continue
            shared = [blk for blk, s in self.blocks.items() if s.cosine(i, j) is not None]
            strong = [blk for blk in shared if abs(self.blocks[blk].cosine(i, j)) >= INTERFERING]
            free = [blk for blk in shared if abs(self.blocks[blk].cosine(i, j)) < ORTHOGONAL]
            verdict = ("nearly orthogonal overall: a plain sum keeps both" if abs(cos) < ORTHOGONAL else
                       "aligned overall: summing them overshoots, lower the strengths (or use slerp/ties)"
                       if cos >= INTERFERING else
                       "opposed overall: summing them cancels, consider perpendicular or ties"
                       if cos <= -INTERFERING else "mildly correlated overall")
            text = f"{a} and {b}: cosine {cos:+.3f}, {verdict}."
            if strong:
                listing = ", ".join(f"{blk} ({self.blocks[blk].cosine(i, j):+.2f})" for blk in strong[:8])
                text += f" They interfere in {listing}{' …' if len(strong) > 8 else ''}: weigh those blocks down in one of them."
            if free:
                text += f" Orthogonal in {len(free)} of {len(shared)} shared blocks ({', '.join(free[:6])}" \
                        f"{' …' if len(free) > 6 else ''})."
            sentences.append(text)
        return " ".join(sentences)

    def as_dict(self) -> dict:
        return {"inputs": self.names, "arch": self.arch, "total": self.total.as_dict(self.names),
                "blocks": {blk: s.as_dict(self.names) for blk, s in self.blocks.items()},
                "modules": {m: s.as_dict(self.names) for m, s in self.modules.items()},
                "summary": self.summary()}


def _stats(n: int) -> GroupStats:
    return GroupStats([0.0] * n, {pair: 0.0 for pair in combinations(range(n), 2)})


def analyze_loras(loras: Sequence[LoraModel], strengths: Sequence[float] | None = None,
                  te_strengths: Sequence[float | None] | None = None, device: str = "cpu") -> Analysis:
    """Norms and pairwise cosines of ``loras`` (each at its strength: UNet, TE for text-encoder modules)."""
    if len(loras) < 2:
        raise LoraMergeError(f"analyze compares LoRAs: give at least two, got {len(loras)}")
    n = len(loras)
    unet = [as_strength(s, "strength") for s in (strengths or [1.0] * n)]
    te = [u if t is None else as_strength(t, "TE strength") for u, t in zip(unet, te_strengths or [None] * n,
                                                                           strict=True)]
    arches = {lora.arch for lora in loras} - {"unknown"}
    if len(arches) > 1:
        raise LoraMergeError(f"cannot compare LoRAs for different models ({', '.join(f'{x.name} is {x.arch}' for x in loras)})")
    arch = arches.pop() if arches else "unknown"
    names: dict[str, None] = {}
    for lora in loras:
        names.update(dict.fromkeys(lora.modules))

    def gram_of(name: str) -> torch.Tensor:
        pairs, weights = [], []
        for k, lora in enumerate(loras):
            module = lora.modules.get(name)
            if module is None:
                pairs.append(None)
                weights.append(0.0)
                continue
            if getattr(module, "algo", "") == "dora":  # its effect depends on W: compare the ΔW it starts from
                module = module.inner
            # float32 factors as stored; strength × alpha/rank applied to the small Gram, not to a copy of U
            pairs.append(module.factor_matrices(torch.float32, device))
            weights.append((te[k] if is_text_encoder(name) else unet[k]) * module.scale)
        shapes = {(p[0].shape[0], p[1].shape[1]) for p in pairs if p is not None}
        if len(shapes) > 1:
            raise LoraMergeError(f"not the same layer in every input (flat shapes {sorted(shapes)})", module=name)
        w = torch.tensor(weights, dtype=torch.float64)
        return inner.gram(pairs) * torch.outer(w, w)

    layout = list(FULL_LAYOUT.get(arch, []))
    total, blocks, modules = _stats(n), {b: _stats(n) for b in layout}, {}
    for name, g in zip(names, parallel_map(gram_of, list(names), torch.device(device), window=16), strict=True):
        if not all(math.isfinite(float(v)) for v in g.flatten()):
            raise LoraMergeError("the update overflows float64", module=name)
        modules[name] = _stats(n)
        modules[name].add(g)
        total.add(g)
        block = block_of(name, arch) if layout else None
        if block is not None and block in blocks:
            blocks[block].add(g)
        elif layout:
            blocks.setdefault("-", _stats(n)).add(g)
    blocks = {b: s for b, s in blocks.items() if s.modules}
    return Analysis([lora.name for lora in loras], arch, layout, total, blocks, modules)


def format_analysis(analysis: Analysis, top: int = 5) -> str:
    """A text report: a table of per-block norms and cosines, a bar per block, the summary."""
    names = analysis.names
    pairs = analysis.pairs
    head = ["block", "mods", *(f"‖{n[:10]}‖" for n in names),
            *(f"{what} {i + 1}·{j + 1}" for i, j in pairs for what in ("cos", "overlap"))]
    rows = []
    for label, s in [*analysis.blocks.items(), (ALL, analysis.total)]:
        values = [v for i, j in pairs for v in (s.cosine(i, j), s.overlap(i, j))]
        rows.append([label, str(s.modules), *(f"{s.norm(i):.4g}" for i in range(len(names))),
                     *("—" if v is None else f"{v:+.3f}" for v in values)])
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(head)]
    lines = [f"inputs: {', '.join(f'{k + 1}={n}' for k, n in enumerate(names))} ({analysis.arch}); cos: cosine of "
             "the flattened updates; overlap: share of ‖ΔWᵢ+ΔWⱼ‖² from their common directions",
             "  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if len(names) > 2:  # every pair at a glance: the overall cosine matrix
        lines.append("\noverall cosine, every pair:")
        lines.append("      " + "".join(f"{k + 1:>8}" for k in range(len(names))))
        for i in range(len(names)):
            cells = []
            for j in range(len(names)):
                c = 1.0 if i == j else analysis.total.cosine(min(i, j), max(i, j))
                cells.append(f"{'—' if c is None else f'{c:+.3f}':>8}")
            lines.append(f"{i + 1:>6}" + "".join(cells))
    for i, j in pairs:
        lines.append(f"\ncosine {i + 1}·{j + 1} per block (bar: |cos|, + aligned, − opposed):")
        for label, s in analysis.blocks.items():
            c = s.cosine(i, j)
            bar = "" if c is None else ("+" if c >= 0 else "−") * max(1 if abs(c) >= 0.01 else 0, round(abs(c) * 40))
            lines.append(f"  {label:>5} {'—' if c is None else f'{c:+.3f}':>7} {bar}")
        similar = analysis.most_similar(i, j, top)
        if similar:
            lines.append(f"  most aligned/opposed modules: {', '.join(f'{m} ({c:+.2f})' for m, c in similar)}")
    lines.append("\n" + analysis.summary())
    return "\n".join(lines)
