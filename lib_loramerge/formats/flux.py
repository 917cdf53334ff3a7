"""Flux LoRAs in any naming → one set of modules in kohya's BFL naming, split layers fused exactly.

Trainers name Flux layers three ways: by BFL path (kohya ``lora_unet_double_blocks_0_img_attn_qkv``,
``diffusion_model.double_blocks.0.img_attn.qkv.lora_A``, XLabs processors), or by diffusers path
(``transformer.transformer_blocks.0.attn.to_q``, ai-toolkit, SimpleTuner), where the fused BFL
layers are split: ``to_q``/``to_k``/``to_v`` are the rows of ``img_attn.qkv``, ``add_*_proj`` those of
``txt_attn.qkv``, and a single block's ``to_q``/``to_k``/``to_v``/``proj_mlp`` those of ``linear1``.

Parts landing on one fused layer become one LoRA module whose update is exactly the parts'
updates stacked by rows: U = blockdiag(s₁U₁, s₂U₂, …) placed at each part's rows, D = [D₁; D₂; …]
(rank r₁ + r₂ + …). A part that is absent leaves zero rows. No dense ΔW is ever formed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import fluxlayout
from ..errors import LoraMergeError
from ..model import LoraModule, NetworkModule

# (source row start, target row start, rows), in hidden widths
Segment = tuple[int, int, int]


@dataclass(frozen=True)
class Placement:
    """Where a module read under some Flux naming lands: a kohya BFL module, whole or on some rows."""

    target: str
    segments: tuple[Segment, ...] | None = None  # None: the whole layer, as it is
    height: int = 0  # the target's rows in hidden widths (with segments)

    @property
    def whole(self) -> bool:
        return self.segments is None


def _rows(part: str, fused: str) -> Placement:
    start = 0
    for name, size in fluxlayout.FUSED_PARTS[fused]:
        if name == part:
            height = sum(s for _, s in fluxlayout.FUSED_PARTS[fused])
            return Placement("", ((0, start, size),), height)
        start += size
    raise KeyError(part)


def _fused(block: str, fused: str, part: str) -> Placement:
    rows = _rows(part, fused)
    return Placement(f"{fluxlayout.UNET_PREFIX}{block}_{fused}", rows.segments, rows.height)


def _whole(path: str) -> Placement:
    return Placement(fluxlayout.UNET_PREFIX + path)


_DOUBLE = {  # diffusers FluxTransformerBlock layer → BFL double-block layer (or fused part)
    "attn_to_q": ("img_attn_qkv", "q"), "attn_to_k": ("img_attn_qkv", "k"), "attn_to_v": ("img_attn_qkv", "v"),
    "attn_add_q_proj": ("txt_attn_qkv", "q"), "attn_add_k_proj": ("txt_attn_qkv", "k"),
    "attn_add_v_proj": ("txt_attn_qkv", "v"),
    "attn_to_out_0": ("img_attn_proj", None), "attn_to_add_out": ("txt_attn_proj", None),
    "ff_net_0_proj": ("img_mlp_0", None), "ff_net_2": ("img_mlp_2", None),
    "ff_context_net_0_proj": ("txt_mlp_0", None), "ff_context_net_2": ("txt_mlp_2", None),
    "norm1_linear": ("img_mod_lin", None), "norm1_context_linear": ("txt_mod_lin", None),
}
_SINGLE = {  # diffusers FluxSingleTransformerBlock layer → BFL single-block layer (or fused part)
    "attn_to_q": ("linear1", "q"), "attn_to_k": ("linear1", "k"), "attn_to_v": ("linear1", "v"),
    "proj_mlp": ("linear1", "mlp"), "proj_out": ("linear2", None), "norm_linear": ("modulation_lin", None),
}
_TOP = {  # diffusers top-level layers → BFL
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed_timestep_embedder_linear_1": "time_in_in_layer",
    "time_text_embed_timestep_embedder_linear_2": "time_in_out_layer",
    "time_text_embed_text_embedder_linear_1": "vector_in_in_layer",
    "time_text_embed_text_embedder_linear_2": "vector_in_out_layer",
    "time_text_embed_guidance_embedder_linear_1": "guidance_in_in_layer",
    "time_text_embed_guidance_embedder_linear_2": "guidance_in_out_layer",
    "proj_out": "final_layer_linear",
}
# diffusers' norm_out.linear gives (scale, shift); BFL's final_layer.adaLN_modulation.1 (shift, scale)
_NORM_OUT = Placement(fluxlayout.UNET_PREFIX + "final_layer_adaLN_modulation_1", ((1, 0, 1), (0, 1, 1)), 2)
_XLABS = {"qkv_lora1": "img_attn_qkv", "qkv_lora2": "txt_attn_qkv", "proj_lora1": "img_attn_proj",
          "proj_lora2": "txt_attn_proj"}

_RE_DIFFUSERS_BLOCK = re.compile(r"(single_transformer_blocks|transformer_blocks)_(\d+)_(.+)")
_RE_XLABS = re.compile(r"(double|single)_blocks_(\d+)_processor_(qkv_lora[12]?|proj_lora[12]?)")
# longest first: kohya, diffusers component, bare; LyCORIS names diffusers-path Flux modules lycoris_…
_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_", "lycoris_")


def _diffusers(path: str) -> Placement | None:
    if path == "norm_out_linear":
        return _NORM_OUT
    if path in _TOP:
        return _whole(_TOP[path])
    m = _RE_DIFFUSERS_BLOCK.fullmatch(path)
    if m is None:
        return None
    single = m[1] == "single_transformer_blocks"
    entry = (_SINGLE if single else _DOUBLE).get(m[3])
    if entry is None:
        return None
    layer, part = entry
    block = f"{'single' if single else 'double'}_blocks_{m[2]}"
    return _whole(f"{block}_{layer}") if part is None else _fused(block, layer, part)


def _bfl(path: str) -> Placement | None:
    if m := _RE_XLABS.fullmatch(path):
        block = f"{m[1]}_blocks_{m[2]}"
        if m[1] == "double":
            layer = _XLABS.get(m[3])
            return _whole(f"{block}_{layer}") if layer else None
        if m[3] == "qkv_lora":  # q, k and v rows of linear1; the MLP rows get nothing
            return Placement(f"{fluxlayout.UNET_PREFIX}{block}_linear1", ((0, 0, 3),), 7)
        return _whole(f"{block}_linear2") if m[3] == "proj_lora" else None
    return _whole(path) if path.startswith(fluxlayout.ROOTS) else None


def _place(name: str) -> tuple[str, Placement] | None:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            path = name[len(prefix):]
            found = _bfl(path) or _diffusers(path)
            if found is not None:
                return path, found
    return None


def placement(name: str) -> Placement | None:
    """Where a provisional module name (as the key adapters give it) lands on Flux, or None."""
    found = _place(name)
    return found[1] if found else None


def looks_like_flux(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Names only Flux has (BFL blocks, XLabs processors, diffusers single blocks, T5 as Flux's
    text encoder), or diffusers double blocks 3072 wide (SD3 names its joint blocks alike but is 1536 or 2432 wide)."""
    for name, shape in shapes.items():
        if name.startswith(("lora_te3_", "lora_te2_encoder_block_")):  # T5 as kohya / diffusers' Flux pipeline name it
            return True
        found = _place(name)
        if found is None:
            continue
        path = found[0]
        if path.startswith(("double_blocks_", "single_blocks_", "single_transformer_blocks_")):
            return True
        if path.startswith("transformer_blocks_") and len(shape) == 2 and shape[1] == fluxlayout.FLUX_DEV.hidden:
            return True
    return False


def _text_encoder_name(name: str) -> str:
    """diffusers' Flux pipeline: ``text_encoder`` is CLIP-L (kohya ``lora_te1_``), ``text_encoder_2`` T5 (``lora_te3_``)."""
    if name.startswith("lora_te_text_model_"):
        return fluxlayout.CLIP_PREFIX + name[len("lora_te_"):]
    if name.startswith("lora_te2_encoder_block_"):
        return fluxlayout.T5_PREFIX + name[len("lora_te2_"):]
    return name


def canonical_modules(modules: Mapping[str, NetworkModule], path: Path | None,
                      notes: list[str]) -> dict[str, NetworkModule]:
    """Every module under its kohya BFL name; parts of a fused layer fused into one exact LoRA module."""
    out: dict[str, NetworkModule] = {}
    groups: dict[str, list[tuple[NetworkModule, Placement]]] = {}
    renamed = 0
    for name, module in modules.items():
        where = placement(name)
        if where is None:
            new = _text_encoder_name(name)
            renamed += new != name
            _put(out, new, module, path, name)
            continue
        if where.whole and where.target == name:
            _put(out, name, module, path, name)
            continue
        groups.setdefault(where.target, []).append((module, where))
    fused = 0
    for target, parts in groups.items():
        if len(parts) == 1 and parts[0][1].whole:
            module = parts[0][0]
            module.name, renamed = target, renamed + 1
            _put(out, target, module, path, target)
            continue
        if any(p.whole for _, p in parts):
            raise LoraMergeError(f"modules {', '.join(m.name for m, _ in parts)} all land on the same layer",
                                 path, target)
        _put(out, target, fuse(target, parts, path), path, target)
        fused += len(parts)
    if renamed:
        notes.append(f"{renamed} Flux modules renamed to kohya's BFL naming (lora_unet_double_blocks_…)")
    if fused:
        notes.append(f"{fused} split Flux modules (q/k/v, MLP) fused exactly onto their BFL layers "
                     "(up block-diagonal, down stacked)")
    return out


def _put(out: dict[str, NetworkModule], name: str, module: NetworkModule, path: Path | None, source: str) -> None:
    if name in out:
        raise LoraMergeError(f"two modules land on the same layer '{name}'", path, source)
    module.name = name
    out[name] = module


def fuse(target: str, parts: list[tuple[NetworkModule, Placement]], path: Path | None = None) -> LoraModule:
    """One LoRA module on ``target`` holding every part's update on its rows (exact; see the module doc)."""
    parts = sorted(parts, key=lambda part: part[1].segments[0][1])  # columns in row order: q, k, v, mlp
    for module, _ in parts:
        if module.algo == "dora":
            raise LoraMergeError("a DoRA module on a split Flux layer cannot be fused onto its BFL layer",
                                 path, module.name)
    hidden = parts[0][0].in_features
    height = parts[0][1].height
    used: set[int] = set()
    for module, where in parts:
        if module.in_features != hidden or len(module.weight_shape) != 2:
            raise LoraMergeError(f"shape {list(module.weight_shape)} does not fit beside the other parts of "
                                 f"{target} (input width {hidden})", path, module.name)
        rows = sum(n for _, _, n in where.segments)
        if module.out_features != rows * hidden:
            raise LoraMergeError(f"{module.out_features} output rows, but its place in {target} has "
                                 f"{rows * hidden} (hidden width {hidden})", path, module.name)
        for _, dst, n in where.segments:
            span = set(range(dst, dst + n))
            if used & span:
                raise LoraMergeError(f"overlaps another module on the rows of {target}", path, module.name)
            used |= span
    scales = {m.scale for m, _ in parts}
    plain = all(isinstance(m, LoraModule) and m.mid is None for m, _ in parts)
    dtypes = {m.dtype for m, _ in parts}
    # one shared scale stays the module's scale (factors untouched, in their dtype); else each part's is folded in
    keep_scale = len(scales) == 1 and plain and len(dtypes) == 1
    dtype = dtypes.pop() if keep_scale else torch.float32
    rank = sum(m.rank for m, _ in parts)
    alpha: float | None = float(rank)  # scale 1: each part's scale is in its up factor
    if keep_scale:
        alpha = None if all(m.alpha is None for m, _ in parts) else next(iter(scales)) * rank

    def build() -> tuple[torch.Tensor, torch.Tensor, None]:
        up = torch.zeros(height * hidden, rank, dtype=dtype)
        downs = []
        col = 0
        for module, where in parts:
            if keep_scale:
                module = module.load() if module.is_lazy else module
                u = module.up.reshape(module.out_features, module.rank)
                d = module.down.reshape(module.rank, -1)
            else:
                u, d = module.factor_matrices(torch.float32)
                u = u * module.scale
            for src, dst, n in where.segments:
                up[dst * hidden:(dst + n) * hidden, col:col + module.rank] = u[src * hidden:(src + n) * hidden]
            downs.append(d.to(dtype))
            col += module.rank
        return up, torch.cat(downs), None

    lazy = any(m.is_lazy for m, _ in parts)
    if lazy:
        up = torch.empty(height * hidden, rank, dtype=dtype, device="meta")
        down = torch.empty(rank, hidden, dtype=dtype, device="meta")
        return LoraModule(target, up, down, alpha, loader=build, source=path)
    up, down, _ = build()
    return LoraModule(target, up, down, alpha, source=path)
