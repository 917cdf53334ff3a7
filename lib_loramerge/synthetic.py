"""Random LoRAs with the real module names and shapes of SD1/SD2/SDXL, for tests, benchmarks and demos."""

from __future__ import annotations

import re

import torch

from . import sdlayouts
from .model import LoraModule


def random_modules(arch: str, *, scope: str = sdlayouts.SCOPE_LOCON, rank: int = 2, alpha: float | None = 1.0,
                   seed: int = 0, text_encoder: bool = True, diffusers_names: bool | None = None,
                   only: str | None = None, conv_rank: int | None = None, std: float = 0.1) -> list[LoraModule]:
    """One module per layer a trainer of ``scope`` targets; ``only`` keeps names matching that regex.

    Factors are Gaussian with standard deviation ``std`` (fp32); ``conv_rank`` sets the rank of
    k×k conv modules (default: ``rank``).
    """
    gen = torch.Generator().manual_seed(seed)
    modules = []
    for name, shape in sdlayouts.lora_modules(arch, scope, text_encoder, diffusers_names).items():
        if only and not re.search(only, name):
            continue
        out, inp, *kernel = shape
        r = conv_rank if conv_rank and kernel and kernel != [1, 1] else rank
        up = torch.randn(out, r, *([1, 1] if kernel else []), generator=gen)
        down = torch.randn(r, inp, *kernel, generator=gen)
        modules.append(LoraModule(name, up * std, down * std, alpha))
    return modules
