"""Which LBW block a kohya module belongs to (without the seed tool's off-by-one).

Text-encoder modules (every encoder, SDXL's two included) are BASE. UNet modules are converted to
their LDM path (``input_blocks.N`` → INnn, ``middle_block`` → M00, ``output_blocks.N`` →
OUTnn), whatever naming the file uses; so IN01 is input_blocks.1 = down_blocks_0's first
resnet/attention, IN04 is input_blocks.4 = down_blocks_1's first, and so on. Modules in no block
(time embedding, conv_out, label embedding) get None: LBW leaves them at ratio 1. Flux modules
get LBW's Flux IDs (:func:`flux_block_of`).
"""

from __future__ import annotations

import re

from .. import naming
from ..model import is_text_encoder
from .layouts import BASE

_LDM_BLOCK = re.compile(r"(input_blocks|output_blocks)_(\d+)_|middle_block_")


_FLUX_BLOCK = re.compile(r"lora_unet_(double|single)_blocks_(\d+)_")
_FLUX_IN = ("lora_unet_img_in", "lora_unet_txt_in", "lora_unet_time_in_", "lora_unet_vector_in_",
            "lora_unet_guidance_in_")


def flux_block_of(module: str) -> str | None:
    """LBW's Flux block ID (``get_flux_blocks`` applied to Forge's keys): CLIP-L modules CLIP, T5's T5,
    double block N DNN, single block N SNN, the embedders (``*_in``) IN, ``final_layer`` OUT."""
    if module.startswith("lora_te3_"):
        return "T5"
    if is_text_encoder(module):
        return "CLIP"
    if m := _FLUX_BLOCK.match(module):
        return f"{'D' if m[1] == 'double' else 'S'}{int(m[2]):02d}"
    if module.startswith(_FLUX_IN):
        return "IN"
    if module.startswith("lora_unet_final_layer_"):
        return "OUT"
    return None


def block_of(module: str, arch: str) -> str | None:
    """LBW block ID of a kohya module name, or None when LBW would leave it at ratio 1."""
    if arch == "flux":
        return flux_block_of(module)
    if is_text_encoder(module):
        return BASE
    path = naming.ldm_unet_path(module, sdxl=arch == "sdxl")
    if path is None:
        return None
    m = _LDM_BLOCK.match(path)
    if m is None:
        return None
    if m[1] is None:
        return "M00"
    return f"{'IN' if m[1] == 'input_blocks' else 'OUT'}{int(m[2]):02d}"
