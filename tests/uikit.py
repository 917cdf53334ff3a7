"""Shared by the UI tests: small LoRA folders and the rules for the optional UI dependencies."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lib_loramerge.formats.writer import save_lora
from lib_loramerge.synthetic import random_modules, write_random_checkpoint

# a handful of real SD1 module names and shapes per LoRA: files of a few hundred KiB, merged in well under a second
SMALL = "|".join(["down_blocks_1_attentions_0_transformer_blocks_0_attn1", "mid_block_attentions_0_proj_in",
                  "up_blocks_2_attentions_1_transformer_blocks_0_attn2_to_k", "layers_[03]_self_attn_q"])


NARROW = 8  # checkpoints for bake tests: SD1's real keys at 1/8 of the widths (~30 MB)


def write_small_lora(path: Path, seed: int, rank: int = 4, arch: str = "sd1", width_divisor: int = 1) -> Path:
    save_lora(random_modules(arch, rank=rank, alpha=rank / 2, seed=seed, only=SMALL, width_divisor=width_divisor),
              path, dtype=torch.float16, arch=arch)
    return path


def checkpoint_folder(root: Path) -> Path:
    """A checkpoint folder with a narrow SD1 checkpoint, and narrow LoRAs for it in ``root``/Lora."""
    folder = root / "Stable-diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    write_random_checkpoint(folder / "base_sd1.safetensors", "sd1", width_divisor=NARROW, vae=False,
                            metadata={"modelspec.title": "narrow sd1"})
    loras = root / "Lora"
    loras.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(("narrow_a", "narrow_b")):
        write_small_lora(loras / f"{name}.safetensors", 10 + seed, width_divisor=NARROW)
    return folder


def lora_folder(root: Path, names: tuple[str, ...] = ("style_a", "character_b", "detail_c")) -> Path:
    folder = root / "Lora"
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        write_small_lora(folder / f"{name}.safetensors", seed)
    return folder


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def need(condition: bool, reason: str) -> None:
    """Skip locally when an optional UI dependency is missing; in CI (CI=true) that is a failure."""
    import pytest  # not in the gradio-4 venv, which imports this module for its LoRA folders

    if condition:
        return
    if in_ci():
        pytest.fail(f"{reason} — CI must provide it (.ci/setup installs it)")
    pytest.skip(reason)
