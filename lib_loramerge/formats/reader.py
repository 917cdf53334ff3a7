"""Read any supported LoRA file into a :class:`~lib_loramerge.model.LoraModel` with kohya names."""

from __future__ import annotations

import os
from collections import Counter

import torch

from .. import naming
from ..arch import SDXL, detect_arch
from ..errors import LoraMergeError
from ..model import LoraModel, LoraModule, validate_module
from .base import ALPHA, DOWN, MID, UP, FormatAdapter, KeyMatch
from .diffusers import DiffusersAdapter
from .kohya import KohyaAdapter
from .tensorfile import TensorFile, open_tensor_file
from .unsupported import not_a_lora_reason, unsupported_format_reason

ADAPTERS: tuple[FormatAdapter, ...] = (KohyaAdapter(), DiffusersAdapter())


def read_lora(path: str | os.PathLike, *, lazy: bool = False) -> LoraModel:
    """Read a LoRA file (kohya, PEFT or diffusers keys) or raise a one-line LoraMergeError.

    ``lazy``: read names, shapes and alphas now and each module's factors only when it is used
    (then checked for NaN/Inf), so merging large files needs about one module's memory per input.
    """
    with open_tensor_file(path) as tf:
        try:
            return _read(tf, lazy and tf.container == "safetensors")
        except LoraMergeError as e:
            raise e.with_path(tf.path) from None


def _read(tf: TensorFile, lazy: bool) -> LoraModel:
    keys = tf.keys()
    reason = unsupported_format_reason(keys)
    if reason:
        raise LoraMergeError(reason, tf.path)
    matches, extras = _match_keys(keys)
    if not any(m.part in (UP, DOWN) for m in matches.values()):
        raise LoraMergeError(not_a_lora_reason(keys), tf.path)
    adapters = {a for a in (_adapter_of(m) for m in matches.values()) if a}
    if len(adapters) > 1:
        raise LoraMergeError(f"mixes key formats ({' and '.join(sorted(adapters))}) in one file", tf.path)
    groups = _group(matches, tf)
    modules: dict[str, LoraModule] = {}
    notes: list[str] = []
    alpha_only = []
    for name, parts in groups.items():
        if UP not in parts and DOWN not in parts:
            alpha_only.append(name)
            continue
        for needed in (UP, DOWN):
            if needed not in parts:
                have = ", ".join(sorted(parts))
                raise LoraMergeError(f"has {have} but no {needed} factor", tf.path, name)
        def tensor(key: str) -> torch.Tensor:
            return _meta(tf, key) if lazy else tf.get(key)

        module = LoraModule(name=name, up=tensor(parts[UP]), down=tensor(parts[DOWN]),
                            alpha=_alpha(tf, parts.get(ALPHA), name),
                            mid=tensor(parts[MID]) if MID in parts else None,
                            loader=_loader(tf, parts) if lazy else None, source=tf.path)
        validate_module(module, tf.path)
        modules[name] = module
    if alpha_only:
        notes.append(f"{len(alpha_only)} alpha values without factors ignored (e.g. '{alpha_only[0]}')")
    variants = Counter(m.variant for m in matches.values() if m.variant)
    fmt = variants.most_common(1)[0][0]
    model = LoraModel(modules=modules, metadata=dict(tf.metadata), format=fmt, path=tf.path, notes=notes)
    model.extras = {k: (str(tf.infos[k].dtype).replace("torch.", ""), tf.infos[k].shape) for k in extras}
    model.arch, model.arch_notes = _detect(model, diffusers_te=fmt != "kohya")
    _canonical_names(model, rename_te=fmt != "kohya")
    no_alpha = sum(m.alpha is None for m in modules.values())
    if no_alpha:
        notes.append(f"no alpha stored for {no_alpha} of {len(modules)} modules: scale 1 (alpha = rank), "
                     "as A1111 applies it")
    if any(m.mid is not None for m in modules.values()):
        notes.append("LyCORIS Tucker (lora_mid) factors: folded into the down factor when merging")
    if extras:
        shown = ", ".join(f"'{k}'" for k in extras[:4])
        notes.append(f"{len(extras)} tensors that are not LoRA factors are kept aside, not merged: {shown}")
    if tf.non_tensors:
        notes.append(f"{len(tf.non_tensors)} non-tensor entries ignored: {', '.join(tf.non_tensors[:4])}")
    return model


def _meta(tf: TensorFile, key: str) -> torch.Tensor:
    info = tf.infos[key]
    return torch.empty(info.shape, dtype=info.dtype, device="meta")


def _loader(tf: TensorFile, parts: dict[str, str]):
    def load() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return tf.get(parts[UP]), tf.get(parts[DOWN]), tf.get(parts[MID]) if MID in parts else None
    return load


def _adapter_of(m: KeyMatch) -> str | None:
    if m.part == ALPHA:
        return None
    return "kohya" if m.variant == "kohya" else "diffusers/PEFT"


def _match_keys(keys: list[str]) -> tuple[dict[str, KeyMatch], list[str]]:
    matches: dict[str, KeyMatch] = {}
    extras: list[str] = []
    for key in keys:
        for adapter in ADAPTERS:
            m = adapter.match(key)
            if m is not None:
                matches[key] = m
                break
        else:
            extras.append(key)
    return matches, extras


def _group(matches: dict[str, KeyMatch], tf: TensorFile) -> dict[str, dict[str, str]]:
    groups: dict[str, dict[str, str]] = {}
    for key, m in matches.items():
        parts = groups.setdefault(m.module, {})
        if m.part in parts:
            hint = " (a PEFT file with several adapters?)" if m.variant.startswith("peft:") else ""
            raise LoraMergeError(f"two tensors for the same {m.part} factor: '{parts[m.part]}' and '{key}'{hint}",
                                 tf.path, m.module)
        parts[m.part] = key
    return groups


def _alpha(tf: TensorFile, key: str | None, module: str) -> float | None:
    if key is None:
        return None
    t = tf.get(key)
    if t.numel() != 1:
        raise LoraMergeError(f"alpha must be a single number, got shape {list(t.shape)}", tf.path, module)
    return float(t.reshape(()).to(torch.float64))


def _detect(model: LoraModel, diffusers_te: bool) -> tuple[str, list[str]]:
    shapes = {n: m.weight_shape for n, m in model.modules.items()}
    if diffusers_te:
        # diffusers' "text_encoder." is SD1/SD2's only encoder but SDXL's first: decide without it first
        others = {n: s for n, s in shapes.items() if not n.startswith("lora_te_")}
        if others and len(others) < len(shapes) and detect_arch(others, model.metadata).arch == SDXL:
            shapes = {("lora_te1_" + n[len("lora_te_"):] if n.startswith("lora_te_") else n): s
                      for n, s in shapes.items()}
    info = detect_arch(shapes, model.metadata)
    return info.arch, info.notes


def _canonical_names(model: LoraModel, rename_te: bool) -> None:
    """SDXL: UNet modules by SGM paths (as kohya names them) and, from diffusers/PEFT, text encoders te1/te2.

    One layer then has one name whatever tool made the file, so merges combine its modules, and
    A1111's SDXL upsampler lookup (which assumes the SD1 layout for diffusers names) is avoided.
    """
    if model.arch != SDXL:
        return
    renamed: dict[str, LoraModule] = {}
    converted = 0
    for name, module in model.modules.items():
        new = name
        if rename_te and name.startswith("lora_te_"):
            new = "lora_te1_" + name[len("lora_te_"):]
        elif (path := naming.unet_path(name)) is not None and naming.uses_diffusers_paths(path):
            ldm = naming.diffusers_to_ldm(path, sdxl=True)
            if ldm is not None:
                new = naming.UNET_PREFIX + ldm
                converted += 1
        if new in renamed:
            raise LoraMergeError(f"two modules land on the same layer '{new}'", model.path, name)
        module.name = new
        renamed[new] = module
    model.modules = renamed
    if converted:
        model.notes.append(f"{converted} SDXL UNet modules renamed from diffusers paths to kohya's SGM paths")
