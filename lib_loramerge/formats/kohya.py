"""kohya LoRA / LoCon keys: ``<module>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.

LyCORIS modules use the same key format: Tucker LoCon adds ``<module>.lora_mid.weight``; LoHa
and LoKr use ``<module>.hada_w1_a`` … and ``<module>.lokr_w1`` …; DoRA adds ``<module>.dora_scale``.
"""

from __future__ import annotations

import re

from ..lycoris import DORA_SCALE, PARTS
from .base import ALPHA, DOWN, MID, UP, KeyMatch

_PARTS = {"lora_up.weight": UP, "lora_down.weight": DOWN, "lora_mid.weight": MID, "alpha": ALPHA,
          DORA_SCALE: DORA_SCALE, **{suffix: suffix for suffix in PARTS}}
_KOHYA_KEY = re.compile(r"(?P<module>[^.]+)\.(?P<part>" + "|".join(re.escape(p) for p in _PARTS) + ")")

# Flux's one-word top-level layers: ``img_in.alpha`` in a bare BFL-keyed file is that format's alpha
_BARE_FLUX_LAYERS = frozenset({"img_in", "txt_in"})


class KohyaAdapter:
    name = "kohya"

    def match(self, key: str) -> KeyMatch | None:
        m = _KOHYA_KEY.fullmatch(key)
        if m is None or m["module"] in _BARE_FLUX_LAYERS:
            return None
        return KeyMatch(m["module"], _PARTS[m["part"]], "kohya")
