"""kohya LoRA / LoCon keys: ``<module>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.

LyCORIS Tucker LoCon adds ``<module>.lora_mid.weight``.
"""

from __future__ import annotations

import re

from .base import ALPHA, DOWN, MID, UP, KeyMatch

_KOHYA_KEY = re.compile(r"(?P<module>[^.]+)\.(?P<part>lora_up\.weight|lora_down\.weight|lora_mid\.weight|alpha)")
_PARTS = {"lora_up.weight": UP, "lora_down.weight": DOWN, "lora_mid.weight": MID, "alpha": ALPHA}


class KohyaAdapter:
    name = "kohya"

    def match(self, key: str) -> KeyMatch | None:
        m = _KOHYA_KEY.fullmatch(key)
        if m is None:
            return None
        return KeyMatch(m["module"], _PARTS[m["part"]], "kohya")
