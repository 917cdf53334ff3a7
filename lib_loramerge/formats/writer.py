"""Write kohya-format LoRA files that A1111 files under the right SD version, with correct hashes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoraMergeError
from ..model import LoraModule
from .safetensors_io import MODELSPEC_HASH_KEY, TensorSpec, check_writable_target, file_size, write_safetensors

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}

# what kohya writes, and what A1111/Forge read to file a LoRA under an SD version (network.py: sdxl_* → SDXL,
# ss_v2 "True" → SD2, else SD1; Forge files Flux by modelspec.implementation or architecture)
_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}
_MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                   "sdxl": "stable-diffusion-xl-v1-base/lora", "flux": "flux-1-dev/lora"}
_MODELSPEC_ARCH_V = {"sd2": "stable-diffusion-v2-768-v/lora"}  # v-prediction SD2 (kohya's naming)
# sai modelspec 1.0.1 implementation: the code the weights are laid out for (kohya's values)
_MODELSPEC_IMPLEMENTATION = {"sd1": "diffusers", "sd2": "diffusers",
                             "sdxl": "https://github.com/Stability-AI/generative-models",
                             "flux": "https://github.com/black-forest-labs/flux"}
_NETWORK_MODULE = {"flux": "networks.lora_flux"}
MODELSPEC_VERSION = "1.0.1"


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


def modelspec_date(when: float | None = None) -> str:
    """modelspec.date: ISO 8601 to the second, local time (as kohya writes it); fixed length."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(when))


def lora_metadata(modules: list[LoraModule], arch: str, title: str, *, facts: Mapping[str, str] | None = None,
                  date: str | None = None, minimal: bool = False) -> dict[str, str]:
    """The keys that describe the file as written: kohya's ``ss_*`` (network dim/alpha, base model) and
    sai modelspec 1.0.1 (architecture, implementation, title, date, and ``facts`` such as resolution,
    prediction type, merged_from). ``modelspec.hash_sha256`` is a placeholder the writer fills in
    (see :func:`save_lora`). ``minimal``: only what the WebUIs need to file the LoRA.
    """
    dims = {m.rank for m in modules}
    alphas = {m.rank if m.alpha is None else m.alpha for m in modules}
    facts = dict(facts or {})
    meta = {
        "ss_network_module": _NETWORK_MODULE.get(arch, "networks.lora"),
        "ss_network_dim": _number(dims.pop()) if len(dims) == 1 else "Dynamic",
        "ss_network_alpha": _number(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        "ss_output_name": title,
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
    }
    if arch in _BASE_MODEL_VERSION:
        meta["ss_base_model_version"] = _BASE_MODEL_VERSION[arch]
        if arch != "flux":
            meta["ss_v2"] = str(arch == "sd2")
        v_pred = facts.get("modelspec.prediction_type") == "v"
        meta["modelspec.architecture"] = (_MODELSPEC_ARCH_V.get(arch) if v_pred else None) or _MODELSPEC_ARCH[arch]
        meta["modelspec.implementation"] = _MODELSPEC_IMPLEMENTATION[arch]
    if minimal:
        return meta
    meta["modelspec.title"] = title
    meta["modelspec.date"] = date or modelspec_date()
    meta.update(facts)
    meta[MODELSPEC_HASH_KEY] = "0x" + "0" * 64  # the final length; the hash of the data goes in once it is written
    return meta


def save_lora(modules: Iterable[LoraModule], path: str | os.PathLike, *, dtype: torch.dtype = torch.float16,
              arch: str = "unknown", metadata: Mapping[str, str] | None = None, overwrite: bool = False,
              facts: Mapping[str, str] | None = None, date: str | None = None, minimal: bool = False,
              before_publish: Callable[[Path], None] | None = None) -> SavedLora:
    """Write ``modules`` as a kohya LoRA file, atomically; never replaces a file unless ``overwrite``.

    Metadata: ``metadata`` (the caller's: inherited keys, a recipe), then the keys of
    :func:`lora_metadata` on top (they describe this file, so an input's value never wins), then
    ``sshs_model_hash``/``sshs_legacy_hash`` and ``modelspec.hash_sha256`` computed over the
    tensors exactly as written (after the cast to ``dtype``). ``before_publish(temp_path)`` sees
    the complete file before it takes its name (a verification); if it raises, nothing is written.
    """
    path = Path(path)
    check_writable_target(path, overwrite)
    modules = list(modules)
    if not modules:
        raise LoraMergeError("nothing to write: no modules left (every module was dropped)", path)
    meta = _file_metadata(modules, arch, path, metadata, facts, date, minimal)
    specs = lora_tensor_specs(modules, dtype)
    written = write_safetensors(path, specs, meta, overwrite=overwrite, sshs=True, before_publish=before_publish)
    return SavedLora(path=path, metadata=written, tensors=len(specs))


def _file_metadata(modules: list[LoraModule], arch: str, path: Path, metadata: Mapping[str, str] | None,
                   facts: Mapping[str, str] | None, date: str | None, minimal: bool) -> dict[str, str]:
    meta = dict(metadata or {})
    if arch == "flux":
        meta.pop("ss_v2", None)  # an SD key a Flux trainer's inputs may carry (with ss_base_model_version=sd_1.5)
    meta.update(lora_metadata(modules, arch, path.stem, facts=facts, date=date, minimal=minimal))
    return meta


def lora_file_size(modules: Iterable[LoraModule], path: str | os.PathLike, *, dtype: torch.dtype = torch.float16,
                   arch: str = "unknown", metadata: Mapping[str, str] | None = None,
                   facts: Mapping[str, str] | None = None, minimal: bool = False) -> int:
    """The exact size in bytes of the file :func:`save_lora` would write with these arguments.

    Only shapes are used, so modules may hold shape-only ("meta") tensors: a job can size a file
    before computing it. (The date has a fixed length, so it does not matter which.)
    """
    modules = list(modules)
    meta = _file_metadata(modules, arch, Path(path), metadata, facts, None, minimal)
    return file_size(lora_tensor_specs(modules, dtype), meta, sshs=True)
