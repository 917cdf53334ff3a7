"""XLabs Flux LoRA keys: ``[diffusion_model.]double_blocks.N.processor.qkv_lora1.down.weight`` ….

XLabs' attention processors hold ``qkv_lora1``/``proj_lora1`` for the image stream and
``qkv_lora2``/``proj_lora2`` for the text stream of a double block, and ``qkv_lora``/``proj_lora``
in a single block. The module name kept here is provisional (``lora_unet_…_processor_qkv_lora1``);
:mod:`.flux` places it on its BFL layer (a single block's ``qkv_lora`` on the q/k/v rows of ``linear1``).
"""

from __future__ import annotations

import re

from .base import DOWN, UP, KeyMatch

_XLABS = re.compile(r"(?:diffusion_model\.)?(?P<path>(?:double|single)_blocks\.\d+\.processor\."
                    r"(?:qkv|proj)_lora[12]?)\.(?P<ud>down|up)\.weight")


class XLabsAdapter:
    name = "xlabs"

    def match(self, key: str) -> KeyMatch | None:
        m = _XLABS.fullmatch(key)
        if m is None:
            return None
        return KeyMatch("lora_unet_" + m["path"].replace(".", "_"), UP if m["ud"] == "up" else DOWN, "xlabs")
