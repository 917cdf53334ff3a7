"""Write kohya-format LoRA files that A1111 files under the right SD version, with correct hashes."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoraMergeError
from ..model import LoraModule
from .safetensors_io import TensorSpec, check_writable_target, file_size, write_safetensors

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}

# what kohya writes, and what A1111/Forge read to file a LoRA under an SD version
_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                   "sdxl": "stable-diffusion-xl-v1-base/lora"}


def parse_dtype(name: str) -> torch.dtype:
    """``fp32``/``fp16``/``bf16`` (or float32/float16/bfloat16) → torch dtype."""
    key = DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise LoraMergeError(f"unknown dtype '{name}' (choose fp32, fp16 or bf16)")
    return DTYPES[key]


@dataclass
class SavedLora:
    path: Path
    metadata: dict[str, str]
    tensors: int


def lora_tensor_specs(modules: Iterable[LoraModule], dtype: torch.dtype) -> list[TensorSpec]:
    """The tensors of kohya-format modules; alpha is stored in fp32 so any value survives exactly."""
    specs: list[TensorSpec] = []
    for m in modules:
        if not isinstance(m, LoraModule):  # LoHa / LoKr / DoRA: the writer writes kohya LoRA/LoCon only
            raise LoraMergeError(f"a {getattr(m, 'label', type(m).__name__)} module is written as LoRA/LoCon only "
                                 "after a merge (merge --mode concat converts it exactly)", module=m.name)
        specs.append(TensorSpec(f"{m.name}.lora_up.weight", dtype, tuple(m.up.shape), m.up, check="result"))
        specs.append(TensorSpec(f"{m.name}.lora_down.weight", dtype, tuple(m.down.shape), m.down, check="result"))
        if m.mid is not None:
            specs.append(TensorSpec(f"{m.name}.lora_mid.weight", dtype, tuple(m.mid.shape), m.mid, check="result"))
        if m.alpha is not None:
            specs.append(TensorSpec(f"{m.name}.alpha", torch.float32, (), torch.tensor(float(m.alpha))))
    return specs


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def lora_metadata(modules: list[LoraModule], arch: str, title: str) -> dict[str, str]:
    """The kohya ``ss_*`` keys (network dim/alpha, base model) and sai modelspec keys for a LoRA."""
    dims = {m.rank for m in modules}
    alphas = {m.rank if m.alpha is None else m.alpha for m in modules}
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _number(dims.pop()) if len(dims) == 1 else "Dynamic",
        "ss_network_alpha": _number(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": title,
    }
    if arch in _BASE_MODEL_VERSION:
        meta["ss_base_model_version"] = _BASE_MODEL_VERSION[arch]
        meta["ss_v2"] = str(arch == "sd2")
        meta["modelspec.architecture"] = _MODELSPEC_ARCH[arch]
    return meta


def save_lora(modules: Iterable[LoraModule], path: str | os.PathLike, *, dtype: torch.dtype = torch.float16,
              arch: str = "unknown", metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> SavedLora:
    """Write ``modules`` as a kohya LoRA file, atomically; never replaces a file unless ``overwrite``.

    Metadata: the kohya keys of :func:`lora_metadata`, then ``metadata`` (the caller's, e.g. a
    recipe), then ``sshs_model_hash``/``sshs_legacy_hash`` computed over the tensors exactly as
    written (after the cast to ``dtype``).
    """
    path = Path(path)
    check_writable_target(path, overwrite)
    modules = list(modules)
    if not modules:
        raise LoraMergeError("nothing to write: no modules left (every module was dropped)", path)
    meta = lora_metadata(modules, arch, path.stem)
    meta.update(metadata or {})
    specs = lora_tensor_specs(modules, dtype)
    written = write_safetensors(path, specs, meta, overwrite=overwrite, sshs=True)
    return SavedLora(path=path, metadata=written, tensors=len(specs))


def lora_file_size(modules: Iterable[LoraModule], path: str | os.PathLike, *, dtype: torch.dtype = torch.float16,
                   arch: str = "unknown", metadata: Mapping[str, str] | None = None) -> int:
    """The exact size in bytes of the file :func:`save_lora` would write with these arguments.

    Only shapes are used, so modules may hold shape-only ("meta") tensors: a job can size a file
    before computing it.
    """
    modules = list(modules)
    meta = lora_metadata(modules, arch, Path(path).stem)
    meta.update(metadata or {})
    return file_size(lora_tensor_specs(modules, dtype), meta, sshs=True)
