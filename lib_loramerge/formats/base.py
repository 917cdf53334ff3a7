"""What every key-format adapter provides: which keys are its own, and the kohya module they belong to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

UP, DOWN, ALPHA, MID = "up", "down", "alpha", "mid"


@dataclass(frozen=True)
class KeyMatch:
    module: str  # kohya module name (text encoders provisionally ``lora_te_``/``lora_te2_``)
    part: str  # UP, DOWN, ALPHA, MID, or a LyCORIS key suffix (``hada_w1_a``, ``lokr_w2``, ``dora_scale`` …)
    variant: str = ""  # the sub-format that matched, for the report


class FormatAdapter(Protocol):
    name: str

    def match(self, key: str) -> KeyMatch | None:
        """The module and factor this key holds, or None if the key is not in this format."""
        ...
