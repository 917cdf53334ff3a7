"""Block-weight specs (a preset name or a comma list) resolved to one ratio per module, as LBW does.

Tokens: numbers; ``R`` (random in [0, 1)), ``U`` (random in [−0.5, 1.5]), both rounded to 3
decimals as LBW rounds them; ``X``, ``X+d``, ``X-d`` (relative to the LoRA's x value, default 1).
Random tokens use a seeded generator and the values actually used are kept for the recipe.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from ..checks import as_strength
from ..errors import LoraMergeError
from .layouts import LAYOUTS, LENGTHS_FOR_ARCH, check_length, expand
from .mapping import block_of
from .presets import PresetBook

_INHERITED = re.compile(r"X(?:([+-])(\d+(?:\.\d*)?|\.\d+))?")


def resolve_token(token: str, x: float, rng: random.Random) -> float:
    if token == "R":
        return round(rng.random(), 3)
    if token == "U":
        return round(rng.uniform(-0.5, 1.5), 3)
    if token.startswith("X"):
        m = _INHERITED.fullmatch(token)
        if m is None:
            raise LoraMergeError(f"bad block weight '{token}' (X, X+d or X-d)")
        if m[1] is None:
            return as_strength(x, "x")
        return as_strength(x + float(m[2]) if m[1] == "+" else x - float(m[2]), f"block weight '{token}'")
    try:
        value = float(token)
    except ValueError:
        raise LoraMergeError(f"bad block weight '{token}' (a number, R, U, X, X+d or X-d)") from None
    return as_strength(value, f"block weight '{token}'")


@dataclass
class BlockWeights:
    """Resolved block weights for one LoRA: ``ratio(module)`` multiplies that module's strength."""

    spec: str
    arch: str
    values: list[float]  # as given (its layout's length), random tokens resolved
    preset: str | None = None
    seed: int | None = None  # set when the spec had random tokens
    ratios: dict[str, float] = field(default_factory=dict)  # every block ID of the 26 list

    def __post_init__(self) -> None:
        self.ratios = expand(self.values)

    def ratio(self, module: str) -> float:
        block = block_of(module, self.arch)
        return 1.0 if block is None else self.ratios[block]

    def recipe(self) -> dict:
        out: dict = {"lbw": self.spec, "lbw_values": self.values, "lbw_layout": LAYOUTS[len(self.values)]}
        if self.seed is not None:
            out["lbw_seed"] = self.seed
        return out


def parse_block_weights(spec: str, arch: str, presets: PresetBook, *, x: float = 1.0,
                        seed: int | None = None) -> BlockWeights:
    """A preset name or a comma list → BlockWeights; unknown names and wrong counts are errors."""
    spec = spec.strip()
    preset = None
    if "," in spec:
        tokens = [t.strip() for t in spec.split(",")]
    else:
        tokens = presets.get(spec)
        if tokens is None:
            allowed = LENGTHS_FOR_ARCH.get(arch, ())
            fitting = presets.names(allowed)
            raise LoraMergeError(f"unknown block-weight preset '{spec}' (presets for {arch.upper()}: "
                                 f"{', '.join(fitting) or 'none'}; or give {' or '.join(map(str, allowed))} "
                                 "comma-separated values)")
        preset = spec
    check_length(len(tokens), arch)
    random_tokens = any(t in ("R", "U") for t in tokens)
    if random_tokens and seed is None:
        seed = random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    values = [resolve_token(t, x, rng) for t in tokens]
    return BlockWeights(spec=spec, arch=arch, values=values, preset=preset, seed=seed if random_tokens else None)
