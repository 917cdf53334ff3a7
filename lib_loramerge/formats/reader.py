"""Read any supported LoRA file into a :class:`~lib_loramerge.model.LoraModel` with kohya names."""

from __future__ import annotations

import math
import os
from collections import Counter

import torch

from .. import naming, sdlayouts
from ..arch import SDXL, detect_arch
from ..errors import LoraMergeError
from ..lycoris import DORA_SCALE, PARTS, DoraModule, algorithm_label, is_lycoris, make_module
from ..model import LoraModel, LoraModule, NetworkModule, validate_module
from . import flux
from .base import ALPHA, DOWN, MID, UP, FormatAdapter, KeyMatch
from .diffusers import DiffusersAdapter
from .kohya import KohyaAdapter
from .tensorfile import TensorFile, open_tensor_file
from .unsupported import not_a_lora_reason, unsupported_format_reason
from .xlabs import XLabsAdapter

ADAPTERS: tuple[FormatAdapter, ...] = (KohyaAdapter(), XLabsAdapter(), DiffusersAdapter())
# the largest real LoRAs (full-layer LyCORIS on SDXL, every Flux layer with both text encoders)
# have a few thousand modules; far more is a file built to make every job slow
MAX_MODULES = 20_000


def read_lora(path: str | os.PathLike, *, lazy: bool = False, container: str | None = None) -> LoraModel:
    """Read a LoRA file (kohya, PEFT or diffusers keys) or raise a one-line LoraMergeError.

    ``lazy``: read names, shapes and alphas now and each module's factors only when it is used
    (then checked for NaN/Inf), so merging large files needs about one module's memory per input.
    ``container``: ``"safetensors"`` reads a file whatever its name (a temp file being verified).
    """
    with open_tensor_file(path, container) as tf:
        try:
            return _read(tf, lazy and tf.container == "safetensors")
        except LoraMergeError as e:
            raise e.with_path(tf.path) from None


_FACTORS = {UP, DOWN, MID, *PARTS}


def _read(tf: TensorFile, lazy: bool) -> LoraModel:
    keys = tf.keys()
    matches, extras = _match_keys(keys)
    reason = unsupported_format_reason(extras)
    if reason:
        raise LoraMergeError(reason, tf.path)
    if not any(m.part in _FACTORS for m in matches.values()):
        raise LoraMergeError(not_a_lora_reason(keys), tf.path)
    adapters = {a for a in (_adapter_of(m) for m in matches.values()) if a}
    if len(adapters) > 1:
        raise LoraMergeError(f"mixes key formats ({' and '.join(sorted(adapters))}) in one file", tf.path)
    groups = _group(matches, tf)
    if len(groups) > MAX_MODULES:
        raise LoraMergeError(f"{len(groups)} modules: more than any real LoRA has (the limit is {MAX_MODULES}); "
                             "refused", tf.path)
    modules: dict[str, NetworkModule] = {}
    notes: list[str] = []
    alpha_only = []
    for name, parts in groups.items():
        if not _FACTORS & parts.keys():
            if DORA_SCALE in parts:
                raise LoraMergeError("has dora_scale but no LoRA, LoHa or LoKr factors", tf.path, name)
            alpha_only.append(name)
            continue
        modules[name] = _module(tf, name, parts, lazy)
    if flux.looks_like_flux({n: m.weight_shape for n, m in modules.items()}):
        modules = flux.canonical_modules(modules, tf.path, notes)
    if alpha_only:
        notes.append(f"{len(alpha_only)} alpha values without factors ignored (e.g. '{alpha_only[0]}')")
    variants = Counter(m.variant for m in matches.values() if m.variant)
    fmt = variants.most_common(1)[0][0]
    model = LoraModel(modules=modules, metadata=dict(tf.metadata), format=fmt, path=tf.path, notes=notes)
    model.extras = {k: (str(tf.infos[k].dtype).replace("torch.", ""), tf.infos[k].shape) for k in extras}
    pending = _resolve_layer_shapes(model)
    model.arch, model.arch_notes = _detect(model, diffusers_te=fmt != "kohya", skip=set(pending))
    _resolve_pending(model, pending)
    _canonical_names(model, rename_te=fmt != "kohya")
    no_alpha = sum(m.alpha is None for m in modules.values())
    if no_alpha:
        notes.append(f"no alpha stored for {no_alpha} of {len(modules)} modules: scale 1 (alpha = rank), "
                     "as A1111 applies it")
    if any(getattr(m, "mid", None) is not None for m in modules.values()):
        notes.append("LyCORIS Tucker (lora_mid) factors: folded into the down factor when merging")
    lycoris = Counter(algorithm_label(m) for m in modules.values() if is_lycoris(m))
    if lycoris:
        listing = ", ".join(f"{algo} ×{n}" for algo, n in lycoris.items())
        notes.append(f"LyCORIS modules ({listing}): merged through their exact factor form (rank r₁·r₂), "
                     "written as plain LoRA/LoCon")
    dora = sum(getattr(m, "algo", "") == "dora" for m in modules.values())
    if dora:
        notes.append(f"DoRA (dora_scale) on {dora} modules: applied to the base weights when baking; "
                     "cannot be merged into a plain LoRA")
    if extras:
        shown = ", ".join(f"'{k}'" for k in extras[:4])
        notes.append(f"{len(extras)} tensors that are not LoRA factors are kept aside, not merged: {shown}")
    if tf.non_tensors:
        notes.append(f"{len(tf.non_tensors)} non-tensor entries ignored: {', '.join(tf.non_tensors[:4])}")
    return model


def _module(tf: TensorFile, name: str, parts: dict[str, str], lazy: bool) -> NetworkModule:
    """One module from its keys: LoRA/LoCon, LoHa or LoKr, wrapped as DoRA when it has a dora_scale."""

    def tensor(key: str) -> torch.Tensor:
        return _meta(tf, key) if lazy else tf.get(key)

    families = sorted({"LoRA" if p in (UP, DOWN, MID) else PARTS[p][0] for p in parts if p in _FACTORS})
    if len(families) > 1:
        raise LoraMergeError(f"mixes factors of different algorithms ({', '.join(sorted(parts))})", tf.path, name)
    alpha = _alpha(tf, parts.get(ALPHA), name)
    have = ", ".join(sorted(parts))
    if families == ["LoRA"]:
        for needed in (UP, DOWN):
            if needed not in parts:
                raise LoraMergeError(f"has {have} but no {needed} factor", tf.path, name)
        module: NetworkModule = LoraModule(name=name, up=tensor(parts[UP]), down=tensor(parts[DOWN]), alpha=alpha,
                                           mid=tensor(parts[MID]) if MID in parts else None,
                                           loader=FactorLoader(tf, parts) if lazy else None, source=tf.path)
        validate_module(module, tf.path)
    else:
        algo = families[0]
        fields = {PARTS[p][1]: key for p, key in parts.items() if p in PARTS}
        if algo == "hada":  # what A1111's ModuleTypeHada / ModuleTypeLokr require
            missing = [f"hada_{f}" for f in ("w1_a", "w1_b", "w2_a", "w2_b") if f not in fields]
        else:
            missing = [f"lokr_{w} (or lokr_{w}_a and lokr_{w}_b)" for w in ("w1", "w2")
                       if w not in fields and not {f"{w}_a", f"{w}_b"} <= fields.keys()]
        if missing:
            raise LoraMergeError(f"has {have} but no {', '.join(missing)}", tf.path, name)
        loader = (lambda: {f: tf.get(k) for f, k in fields.items()}) if lazy else None
        module = make_module(algo, name, {f: tensor(k) for f, k in fields.items()}, alpha, loader, tf.path)
    if DORA_SCALE in parts:
        key = parts[DORA_SCALE]
        module = DoraModule(module, tensor(key), loader=(lambda: tf.get(key)) if lazy else None, source=tf.path)
        module.validate(tf.path)
    return module


def _resolve_layer_shapes(model: LoraModel) -> dict[str, dict[str, tuple[int, ...]]]:
    """Give LyCORIS modules with flat (out, in·kh·kw) factors their layer's shape from the SD layouts.

    A name whose layer has one shape in every SD version that has it is resolved now; a name whose
    shape differs between versions (SD1's 1×1-conv proj_in against SD2's linear one) waits for the
    architecture (returned: name → {arch: shape}) and is left out of its detection.
    """
    pending: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, module in model.modules.items():
        if getattr(module, "layer_shape_known", True):
            continue
        out, *rest = module.weight_shape
        flat = math.prod(rest)
        candidates = {arch: shape for arch, shape in sdlayouts.layer_shapes(name).items()
                      if shape[0] == out and math.prod(shape[1:]) == flat}
        shapes = set(candidates.values())
        if len(shapes) == 1:
            model.modules[name] = module.with_layer_shape(shapes.pop())
        elif shapes:
            pending[name] = candidates
    return pending


def _resolve_pending(model: LoraModel, pending: dict[str, dict[str, tuple[int, ...]]]) -> None:
    for name, candidates in pending.items():
        if model.arch in candidates:
            model.modules[name] = model.modules[name].with_layer_shape(candidates[model.arch])
    flat = [n for n, m in model.modules.items() if not getattr(m, "layer_shape_known", True)]
    if flat:
        model.notes.append(f"{len(flat)} LyCORIS modules have flat factors on layers not found in the SD1/SD2/SDXL "
                           f"layouts (e.g. '{flat[0]}'): treated as linear layers")


def _meta(tf: TensorFile, key: str) -> torch.Tensor:
    info = tf.infos[key]
    return torch.empty(info.shape, dtype=info.dtype, device="meta")


class FactorLoader:
    """Reads a lazily read LoRA/LoCon module's factors into new tensors (a call), or says how to read
    up and down into buffers the caller reuses (:meth:`requests`, for ``tf.read_many_into``)."""

    def __init__(self, tf: TensorFile, parts: dict[str, str]) -> None:
        self.tf, self.parts = tf, parts

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        tf, parts = self.tf, self.parts
        return tf.get(parts[UP]), tf.get(parts[DOWN]), tf.get(parts[MID]) if MID in parts else None

    def requests(self, up: torch.Tensor, down: torch.Tensor) -> tuple[tuple[str, torch.Tensor], ...]:
        """(key, buffer) pairs reading up and down (contiguous, of their file dtype and shape) from :attr:`tf`."""
        return (self.parts[UP], up), (self.parts[DOWN], down)


def _adapter_of(m: KeyMatch) -> str | None:
    if m.part == ALPHA:
        return None
    return m.variant if m.variant in ("kohya", "xlabs") else "diffusers/PEFT"


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


def _detect(model: LoraModel, diffusers_te: bool, skip: set[str] = frozenset()) -> tuple[str, list[str]]:
    shapes = {n: m.weight_shape for n, m in model.modules.items() if n not in skip}
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
    renamed: dict[str, NetworkModule] = {}
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
