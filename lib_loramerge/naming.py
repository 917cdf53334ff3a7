"""Module names: diffusers UNet paths ↔ LDM (original/SGM) paths, in kohya's underscore form.

kohya names SD1/SD2 UNet modules by their diffusers paths (``lora_unet_down_blocks_1_…``) and
SDXL UNet modules by their LDM paths (``lora_unet_input_blocks_4_1_…``). Some SDXL LoRAs use
diffusers paths instead. These functions convert between the two, so that block weights, baking
and merging can treat every naming alike. The conversion mirrors A1111's own
(``convert_diffusers_name_to_compvis``), except that the upsampler index follows the real UNet
(A1111 hard-codes the SD1 layout, which is wrong for SDXL).
"""

from __future__ import annotations

import re

UNET_PREFIX = "lora_unet_"

_RESNET_PARTS = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}
_RESNET_PARTS_BACK = {v: k for k, v in _RESNET_PARTS.items()}

_RE_DOWN = re.compile(r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")
_RE_DOWNSAMPLE = re.compile(r"down_blocks_(\d+)_downsamplers_0_conv(.*)")
_RE_MID_ATTN = re.compile(r"mid_block_attentions_0_(.+)")
_RE_MID_RES = re.compile(r"mid_block_resnets_(\d+)_(.+)")
_RE_UP = re.compile(r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")
_RE_UPSAMPLE = re.compile(r"up_blocks_(\d+)_upsamplers_0_conv(.*)")
_SIMPLE_TO_LDM = {
    "conv_in": "input_blocks_0_0",
    "conv_out": "out_2",
    "conv_norm_out": "out_0",
    "time_embedding_linear_1": "time_embed_0",
    "time_embedding_linear_2": "time_embed_2",
    "add_embedding_linear_1": "label_emb_0_0",
    "add_embedding_linear_2": "label_emb_0_2",
}
_SIMPLE_TO_DIFFUSERS = {v: k for k, v in _SIMPLE_TO_LDM.items()}

_RE_LDM_IN = re.compile(r"input_blocks_(\d+)_(\d+)_(.+)")
_RE_LDM_MID = re.compile(r"middle_block_(\d+)_(.+)")
_RE_LDM_OUT = re.compile(r"output_blocks_(\d+)_(\d+)_(.+)")

LDM_MARKERS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")
DIFFUSERS_MARKERS = ("down_blocks_", "mid_block_", "up_blocks_", "conv_in", "conv_out", "conv_norm_out",
                     "time_embedding_", "add_embedding_")


def _resnet_part(rest: str) -> str:
    for diffusers, ldm in _RESNET_PARTS.items():
        if rest == diffusers or rest.startswith(diffusers + "_"):
            return ldm + rest[len(diffusers):]
    return rest


def _resnet_part_back(rest: str) -> str:
    for ldm, diffusers in _RESNET_PARTS_BACK.items():
        if rest == ldm or rest.startswith(ldm + "_"):
            return diffusers + rest[len(ldm):]
    return rest


def up_block_has_attention(block: int, sdxl: bool) -> bool:
    """Diffusers up_blocks with cross-attention: SD1/SD2 blocks 1–3, SDXL blocks 0–1."""
    return block < 2 if sdxl else block > 0


def diffusers_to_ldm(path: str, sdxl: bool) -> str | None:
    """``down_blocks_1_attentions_0_proj_in`` → ``input_blocks_4_1_proj_in``; None if not a diffusers UNet path."""
    if path in _SIMPLE_TO_LDM:
        return _SIMPLE_TO_LDM[path]
    if m := _RE_DOWN.fullmatch(path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "attentions":
            return f"input_blocks_{1 + 3 * i + j}_1_{rest}"
        return f"input_blocks_{1 + 3 * i + j}_0_{_resnet_part(rest)}"
    if m := _RE_DOWNSAMPLE.fullmatch(path):
        return f"input_blocks_{3 + 3 * int(m[1])}_0_op{m[2]}"
    if m := _RE_MID_ATTN.fullmatch(path):
        return f"middle_block_1_{m[1]}"
    if m := _RE_MID_RES.fullmatch(path):
        return f"middle_block_{2 * int(m[1])}_{_resnet_part(m[2])}"
    if m := _RE_UP.fullmatch(path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "attentions":
            return f"output_blocks_{3 * i + j}_1_{rest}"
        return f"output_blocks_{3 * i + j}_0_{_resnet_part(rest)}"
    if m := _RE_UPSAMPLE.fullmatch(path):
        i = int(m[1])
        index = 2 if up_block_has_attention(i, sdxl) else 1
        return f"output_blocks_{3 * i + 2}_{index}_conv{m[2]}"
    return None


def ldm_to_diffusers(path: str, sdxl: bool) -> str | None:
    """The inverse of :func:`diffusers_to_ldm` (``input_blocks_4_1_proj_in`` → ``down_blocks_1_attentions_0_proj_in``)."""
    if path in _SIMPLE_TO_DIFFUSERS:
        return _SIMPLE_TO_DIFFUSERS[path]
    if m := _RE_LDM_IN.fullmatch(path):
        n, sub, rest = int(m[1]), int(m[2]), m[3]
        if n == 0:
            return None
        i, j = divmod(n - 1, 3)
        if j == 2:  # the downsampler that ends level i
            return f"down_blocks_{i}_downsamplers_0_conv{rest[2:]}" if sub == 0 and rest.startswith("op") else None
        if sub == 1:
            return f"down_blocks_{i}_attentions_{j}_{rest}"
        return f"down_blocks_{i}_resnets_{j}_{_resnet_part_back(rest)}"
    if m := _RE_LDM_MID.fullmatch(path):
        n, rest = int(m[1]), m[2]
        if n == 1:
            return f"mid_block_attentions_0_{rest}"
        return f"mid_block_resnets_{n // 2}_{_resnet_part_back(rest)}"
    if m := _RE_LDM_OUT.fullmatch(path):
        n, sub, rest = int(m[1]), int(m[2]), m[3]
        i, j = divmod(n, 3)
        if rest.startswith("conv") and sub == (2 if up_block_has_attention(i, sdxl) else 1):
            return f"up_blocks_{i}_upsamplers_0_{rest}"
        if sub == 1:
            return f"up_blocks_{i}_attentions_{j}_{rest}"
        return f"up_blocks_{i}_resnets_{j}_{_resnet_part_back(rest)}"
    return None


def unet_path(name: str) -> str | None:
    """The part of a kohya UNet module name after ``lora_unet_`` (None for text-encoder modules)."""
    return name[len(UNET_PREFIX):] if name.startswith(UNET_PREFIX) else None


def uses_diffusers_paths(path: str) -> bool:
    return path.startswith(DIFFUSERS_MARKERS)


def ldm_unet_path(name: str, sdxl: bool) -> str | None:
    """The LDM path of a kohya UNet module in either naming (None if it is not a known UNet path)."""
    path = unet_path(name)
    if path is None:
        return None
    if uses_diffusers_paths(path):
        return diffusers_to_ldm(path, sdxl)
    if path.startswith(LDM_MARKERS):
        return path
    return None
