"""Random LoRAs with the real module names and shapes of SD1/SD2/SDXL/Flux, for tests, benchmarks and demos."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from . import fluxlayout, sdlayouts
from .formats.safetensors_io import TensorSpec, write_safetensors
from .model import LoraModule


def random_modules(arch: str, *, scope: str = sdlayouts.SCOPE_LOCON, rank: int = 2, alpha: float | None = 1.0,
                   seed: int = 0, text_encoder: bool = True, diffusers_names: bool | None = None,
                   only: str | None = None, conv_rank: int | None = None, std: float = 0.1,
                   width_divisor: int = 1) -> list[LoraModule]:
    """One module per layer a trainer of ``scope`` targets; ``only`` keeps names matching that regex.

    Factors are Gaussian with standard deviation ``std`` (fp32); ``conv_rank`` sets the rank of
    k×k conv modules (default: ``rank``). Flux: ``scope`` "all" adds the embedders and the final
    layer to the double and single blocks; ``text_encoder`` adds CLIP-L and T5 modules.
    """
    gen = torch.Generator().manual_seed(seed)
    modules = []
    if arch == fluxlayout.FLUX:
        layers = fluxlayout.lora_modules(text_encoders=("clip", "t5") if text_encoder else (),
                                         width_divisor=width_divisor, only_blocks=scope != sdlayouts.SCOPE_ALL)
    else:
        layers = sdlayouts.lora_modules(arch, scope, text_encoder, diffusers_names, width_divisor)
    for name, shape in layers.items():
        if only and not re.search(only, name):
            continue
        out, inp, *kernel = shape
        r = conv_rank if conv_rank and kernel and kernel != [1, 1] else rank
        up = torch.randn(out, r, *([1, 1] if kernel else []), generator=gen)
        down = torch.randn(r, inp, *kernel, generator=gen)
        modules.append(LoraModule(name, up * std, down * std, alpha))
    return modules


def write_random_checkpoint(path: str | os.PathLike, arch: str, *, width_divisor: int = 1,
                            dtype: torch.dtype = torch.float16, seed: int = 0, vae: bool = True,
                            metadata: dict[str, str] | None = None, prefixed: bool = False) -> Path:
    """An LDM-format checkpoint with every real key and shape of ``arch`` (narrowed by ``width_divisor``).

    Written tensor by tensor, so even a full-size (2–7 GB) checkpoint needs little memory. Flux: a
    BFL single file (bare transformer keys), or with ``prefixed`` the all-in-one layout with both
    text encoders (``vae`` is not written for Flux).
    """
    specs = []
    if arch == fluxlayout.FLUX:
        tensors = fluxlayout.checkpoint_tensors(width_divisor, prefixed=prefixed, text_encoders=prefixed)
    else:
        tensors = sdlayouts.checkpoint_tensors(arch, width_divisor, vae=vae)
    for i, (key, shape) in enumerate(tensors):
        if sdlayouts.is_integer_tensor(key):
            specs.append(TensorSpec(key, torch.int64, shape, torch.arange(shape[-1]).reshape(shape)))
            continue

        def make(shape: tuple[int, ...] = shape, i: int = i) -> torch.Tensor:
            return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100_003 + i)) * 0.02
        specs.append(TensorSpec(key, dtype, shape, make))
    write_safetensors(path, specs, metadata or {}, overwrite=True)
    return Path(path)
