"""Synthetic LoRA files with the real module names and shapes of SD1, SD2 and SDXL (small ranks)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from lib_loramerge.model import LoraModule
from lib_loramerge.synthetic import random_modules

make_modules = random_modules


def kohya_state_dict(modules: list[LoraModule], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    sd = {}
    for m in modules:
        sd[f"{m.name}.lora_up.weight"] = m.up.to(dtype).contiguous()
        sd[f"{m.name}.lora_down.weight"] = m.down.to(dtype).contiguous()
        if m.mid is not None:
            sd[f"{m.name}.lora_mid.weight"] = m.mid.to(dtype).contiguous()
        if m.alpha is not None:
            sd[f"{m.name}.alpha"] = torch.tensor(float(m.alpha), dtype=dtype)
    return sd


def write_kohya(path: Path, modules: list[LoraModule], dtype: torch.dtype = torch.float32,
                metadata: dict[str, str] | None = None) -> Path:
    save_file(kohya_state_dict(modules, dtype), str(path), metadata=metadata)
    return path


# Diffusers/PEFT fixtures need dotted module paths; kohya names lost the dots, so put them back
# with the vocabulary of multi-word path components used by SD's UNet and text encoders.
_TOKENS = sorted([
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "time_emb_proj", "conv_shortcut",
    "downsamplers", "upsamplers", "time_embedding", "add_embedding", "linear_1", "linear_2", "proj_in",
    "proj_out", "to_q", "to_k", "to_v", "to_out", "conv_in", "conv_out", "text_model", "self_attn",
    "q_proj", "k_proj", "v_proj", "out_proj", "input_blocks", "output_blocks", "middle_block",
    "in_layers", "out_layers", "emb_layers", "skip_connection", "time_embed", "label_emb",
], key=len, reverse=True)


def dotted_path(kohya_name: str) -> str:
    """``lora_unet_down_blocks_0_attentions_0_proj_in`` → ``down_blocks.0.attentions.0.proj_in``."""
    rest = re.sub(r"^lora_(unet|te\d?)_", "", kohya_name)
    parts = []
    while rest:
        for tok in _TOKENS:
            if rest == tok or rest.startswith(tok + "_"):
                parts.append(tok)
                rest = rest[len(tok) + 1:]
                break
        else:
            head, _, rest = rest.partition("_")
            parts.append(head)
    return ".".join(parts)


def diffusers_component(kohya_name: str) -> str:
    if kohya_name.startswith("lora_unet_"):
        return "unet"
    return "text_encoder_2" if kohya_name.startswith("lora_te2_") else "text_encoder"


def peft_state_dict(modules: list[LoraModule], prefix: str = "", adapter: str | None = None) -> dict[str, torch.Tensor]:
    sd = {}
    tag = f".{adapter}" if adapter else ""
    for m in modules:
        base = f"{prefix}{diffusers_component(m.name)}.{dotted_path(m.name)}"
        sd[f"{base}.lora_A{tag}.weight"] = m.down.contiguous()
        sd[f"{base}.lora_B{tag}.weight"] = m.up.contiguous()
    return sd


def diffusers_state_dict(modules: list[LoraModule], linear_layer: bool = False) -> dict[str, torch.Tensor]:
    sd = {}
    mid = "lora_linear_layer" if linear_layer else "lora"
    for m in modules:
        base = f"{diffusers_component(m.name)}.{dotted_path(m.name)}"
        sd[f"{base}.{mid}.down.weight"] = m.down.contiguous()
        sd[f"{base}.{mid}.up.weight"] = m.up.contiguous()
    return sd


def attnproc_state_dict(modules: list[LoraModule]) -> dict[str, torch.Tensor]:
    sd = {}
    for m in modules:
        path = dotted_path(m.name)
        attn, proj = re.fullmatch(r"(.+\.attn[12])\.(to_q|to_k|to_v|to_out)(?:\.0)?", path).groups()
        sd[f"{attn}.processor.{proj}_lora.down.weight"] = m.down.contiguous()
        sd[f"{attn}.processor.{proj}_lora.up.weight"] = m.up.contiguous()
    return sd


def assert_same_delta(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5, label: str = "") -> None:
    """‖got − want‖_F ≤ rel·‖want‖_F (a fast check for big matrices; torch.isclose is slow on them)."""
    assert got.shape == want.shape, (label, got.shape, want.shape)
    diff = float((got.double() - want.double()).norm())
    assert diff <= rel * float(want.double().norm()) + 1e-12, (label, diff, float(want.norm()))


def write_tensors(path: Path, modules: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> Path:
    """A kohya-named file from ``{module: {key suffix: tensor}}`` (LyCORIS LoHa/LoKr/DoRA fixtures)."""
    sd = {f"{name}.{suffix}": t.contiguous() for name, parts in modules.items() for suffix, t in parts.items()}
    save_file(sd, str(path), metadata=metadata)
    return path
