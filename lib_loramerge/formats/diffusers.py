"""diffusers and PEFT LoRA keys, converted to kohya module names.

Handled forms (``<path>`` is a dotted module path, optionally behind ``base_model.model.`` and a
component prefix ``unet.``, ``text_encoder.``, ``text_encoder_2.``, ``transformer.``):

- PEFT: ``<path>.lora_A.weight`` (down) / ``<path>.lora_B.weight`` (up), also ``lora_A.<adapter>.weight``;
- diffusers: ``<path>.lora.down.weight`` / ``.lora.up.weight`` and ``<path>.lora_linear_layer.down.weight``;
- old attention processors: ``<attn path>.processor.to_q_lora.down.weight`` (to_q/to_k/to_v/to_out);
- an optional ``<path>.alpha``.
"""

from __future__ import annotations

import re

from .base import ALPHA, DOWN, UP, KeyMatch

_PEFT = re.compile(r"(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")
_DIFFUSERS = re.compile(r"(?P<path>.+)\.lora(?:_linear_layer)?\.(?P<ud>up|down)\.weight")
_ATTNPROC = re.compile(r"(?P<path>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ud>up|down)\.weight")
_ALPHA = re.compile(r"(?P<path>.+\..+|img_in|txt_in)\.alpha")  # (Flux's one-word top-level layers, bare BFL keys)

_UNET_ROOTS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "conv_norm_out",
               "time_embedding", "add_embedding")
# component prefix → kohya prefix (text encoders are renamed te1/te2 once the file is known to be SDXL)
_COMPONENTS = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_",
               "transformer": "lora_transformer_", "prior": "lora_prior_unet_",
               "diffusion_model": "lora_unet_"}  # BFL-named Flux LoRAs (diffusion_model.double_blocks.…)


def kohya_name(path: str) -> str:
    """``unet.down_blocks.0.attentions.0.proj_in`` → ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    if path.startswith("base_model.model."):
        path = path[len("base_model.model."):]
    head, _, rest = path.partition(".")
    if head in _COMPONENTS and rest:
        return _COMPONENTS[head] + rest.replace(".", "_")
    if head in _UNET_ROOTS:
        return "lora_unet_" + path.replace(".", "_")
    if head == "text_model":
        return "lora_te_" + path.replace(".", "_")
    return "lora_" + path.replace(".", "_")


def _attnproc_path(path: str, proj: str) -> str:
    if path.endswith("self_attn"):  # text-encoder attention processors
        return f"{path}.{proj[3:]}_proj"
    return f"{path}.{proj}.0" if proj == "to_out" else f"{path}.{proj}"


class DiffusersAdapter:
    name = "diffusers"

    def match(self, key: str) -> KeyMatch | None:
        if m := _ATTNPROC.fullmatch(key):
            part = UP if m["ud"] == "up" else DOWN
            return KeyMatch(kohya_name(_attnproc_path(m["path"], m["proj"])), part, "diffusers-attnprocs")
        if m := _PEFT.fullmatch(key):
            variant = "peft" if m["adapter"] is None else f"peft:{m['adapter']}"
            return KeyMatch(kohya_name(m["path"]), DOWN if m["ab"] == "A" else UP, variant)
        if m := _DIFFUSERS.fullmatch(key):
            return KeyMatch(kohya_name(m["path"]), UP if m["ud"] == "up" else DOWN, "diffusers")
        if m := _ALPHA.fullmatch(key):
            return KeyMatch(kohya_name(m["path"]), ALPHA, "")
        return None
