"""Reference layout of the Flux.1 transformer (BFL single file) and the LoRA modules on it.

Facts from the BFL reference code (``flux/model.py``, ``flux/modules/layers.py``) and kohya's
``networks/lora_flux.py``: hidden width 3072 (24 heads of 128), MLP ratio 4 (12288), 19 double
blocks and 38 single blocks. A double block's ``img_attn.qkv`` / ``txt_attn.qkv`` hold the rows
of q, k and v in that order (3 × 3072); a single block's ``linear1`` holds q, k, v and the MLP
input in that order (3 × 3072 + 12288 = 21504 rows) and its ``linear2`` reads the attention output
and the MLP hidden state side by side (3072 + 12288 columns). Modulations: a double block's
``*_mod.lin`` gives 6 × 3072 (shift, scale, gate twice), a single block's ``modulation.lin``
3 × 3072, ``final_layer.adaLN_modulation.1`` 2 × 3072 as (shift, scale) — diffusers' ``norm_out``
stores the same two halves as (scale, shift).

Internal module names are kohya's (``lora_unet_`` + the BFL path with ``_`` for ``.``; CLIP-L
``lora_te1_``, T5-XXL ``lora_te3_``), which is also what Forge and ComfyUI load. ``width_divisor``
narrows every width (names and ratios stay) for small synthetic checkpoints and LoRAs.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

from .sdlayouts import Shape, TextEncoderConfig, text_encoder_lora_modules, text_encoder_tensors

FLUX = "flux"
UNET_PREFIX = "lora_unet_"
CLIP_PREFIX = "lora_te1_"
T5_PREFIX = "lora_te3_"  # kohya's choice (lora_te2 is unused for Flux), "ComfyUI compatible"

# component prefixes of a ComfyUI/Forge all-in-one Flux checkpoint; a BFL single file has bare keys
CKPT_UNET_PREFIX = "model.diffusion_model."
CKPT_CLIP_PREFIX = "text_encoders.clip_l.transformer."
CKPT_T5_PREFIX = "text_encoders.t5xxl.transformer."

# the roots of BFL transformer keys (how a Flux key or kohya Flux name is recognised)
ROOTS = ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
         "final_layer")


@dataclass(frozen=True)
class FluxConfig:
    hidden: int = 3072
    heads: int = 24
    mlp_ratio: int = 4
    double_blocks: int = 19
    single_blocks: int = 38
    in_channels: int = 64  # 16 latent channels × 2×2 patches
    vec_in: int = 768  # CLIP-L pooled output
    context_in: int = 4096  # T5-XXL width
    time_dim: int = 256  # sinusoidal embedding of t (and of the guidance scale)
    guidance: bool = True  # dev has guidance_in; schnell does not


FLUX_DEV = FluxConfig()
CLIP_L = TextEncoderConfig("clip", 768, 12, 12, CKPT_CLIP_PREFIX, CLIP_PREFIX)


@dataclass(frozen=True)
class T5Config:
    width: int = 4096
    ff: int = 10240
    layers: int = 24
    vocab: int = 32128


T5_XXL = T5Config()

# Fused layers and the parts their rows hold, in order, with each part's height in hidden widths.
# A LoRA trained on the split diffusers layers (to_q, to_k, to_v, proj_mlp) lands on these rows.
FUSED_PARTS: dict[str, tuple[tuple[str, int], ...]] = {
    "img_attn_qkv": (("q", 1), ("k", 1), ("v", 1)),
    "txt_attn_qkv": (("q", 1), ("k", 1), ("v", 1)),
    "linear1": (("q", 1), ("k", 1), ("v", 1), ("mlp", 4)),
}


def _w(width: int, divisor: int) -> int:
    return max(1, width // divisor)


def transformer_tensors(cfg: FluxConfig = FLUX_DEV, width_divisor: int = 1) -> Iterator[tuple[str, Shape]]:
    """Every transformer parameter as (BFL key, shape), in the order of a flux1-dev single file's modules."""
    h = _w(cfg.hidden, width_divisor)
    head = max(1, h // cfg.heads)
    mlp = cfg.mlp_ratio * h

    def linear(key: str, out: int, inp: int) -> Iterator[tuple[str, Shape]]:
        yield f"{key}.weight", (out, inp)
        yield f"{key}.bias", (out,)

    yield from linear("img_in", h, _w(cfg.in_channels, width_divisor))
    for name, inp in (("time_in", _w(cfg.time_dim, width_divisor)), ("vector_in", _w(cfg.vec_in, width_divisor)),
                      *((("guidance_in", _w(cfg.time_dim, width_divisor)),) if cfg.guidance else ())):
        yield from linear(f"{name}.in_layer", h, inp)
        yield from linear(f"{name}.out_layer", h, h)
    yield from linear("txt_in", h, _w(cfg.context_in, width_divisor))
    for n in range(cfg.double_blocks):
        for stream in ("img", "txt"):
            p = f"double_blocks.{n}.{stream}"
            yield from linear(f"{p}_mod.lin", 6 * h, h)
            yield from linear(f"{p}_attn.qkv", 3 * h, h)
            yield f"{p}_attn.norm.query_norm.scale", (head,)
            yield f"{p}_attn.norm.key_norm.scale", (head,)
            yield from linear(f"{p}_attn.proj", h, h)
            yield from linear(f"{p}_mlp.0", mlp, h)
            yield from linear(f"{p}_mlp.2", h, mlp)
    for n in range(cfg.single_blocks):
        p = f"single_blocks.{n}"
        yield from linear(f"{p}.linear1", 3 * h + mlp, h)
        yield from linear(f"{p}.linear2", h, h + mlp)
        yield f"{p}.norm.query_norm.scale", (head,)
        yield f"{p}.norm.key_norm.scale", (head,)
        yield from linear(f"{p}.modulation.lin", 3 * h, h)
    yield from linear("final_layer.linear", _w(cfg.in_channels, width_divisor), h)
    yield from linear("final_layer.adaLN_modulation.1", 2 * h, h)


def t5_tensors(cfg: T5Config = T5_XXL, width_divisor: int = 1) -> Iterator[tuple[str, Shape]]:
    """The T5-XXL encoder's parameters (HF ``T5EncoderModel`` keys), as far as LoRAs and bakes need them."""
    w, ff = _w(cfg.width, width_divisor), _w(cfg.ff, width_divisor)
    yield "shared.weight", (_w(cfg.vocab, width_divisor), w)
    for n in range(cfg.layers):
        p = f"encoder.block.{n}.layer"
        for proj in ("q", "k", "v", "o"):
            yield f"{p}.0.SelfAttention.{proj}.weight", (w, w)
        if n == 0:
            yield f"{p}.0.SelfAttention.relative_attention_bias.weight", (32, max(1, 64 // width_divisor))
        yield f"{p}.0.layer_norm.weight", (w,)
        yield f"{p}.1.DenseReluDense.wi_0.weight", (ff, w)
        yield f"{p}.1.DenseReluDense.wi_1.weight", (ff, w)
        yield f"{p}.1.DenseReluDense.wo.weight", (w, ff)
        yield f"{p}.1.layer_norm.weight", (w,)
    yield "encoder.final_layer_norm.weight", (w,)


def t5_lora_modules(cfg: T5Config = T5_XXL, width_divisor: int = 1) -> Iterator[tuple[str, Shape]]:
    """kohya T5 modules (``T5Attention`` and ``T5DenseGatedActDense`` linears) with their weight shapes."""
    for key, shape in t5_tensors(cfg, width_divisor):
        if key.startswith("encoder.block.") and key.endswith(".weight") and "relative_attention" not in key \
                and len(shape) == 2:
            yield T5_PREFIX + key[: -len(".weight")].replace(".", "_"), shape


def lora_modules(cfg: FluxConfig = FLUX_DEV, text_encoders: tuple[str, ...] = (), width_divisor: int = 1,
                 only_blocks: bool = False) -> dict[str, Shape]:
    """kohya Flux module name → weight shape for every linear layer of the transformer.

    ``only_blocks``: the double and single blocks only (what kohya trains by default; the
    embedders and final layer need ``train_blocks``/``in_dims``). ``text_encoders``: add
    ``"clip"`` (CLIP-L, ``lora_te1_``) and/or ``"t5"`` (``lora_te3_``) modules.
    """
    out: dict[str, Shape] = {}
    if "clip" in text_encoders:
        out.update(text_encoder_lora_modules(CLIP_L, width_divisor))
    if "t5" in text_encoders:
        out.update(t5_lora_modules(width_divisor=width_divisor))
    for key, shape in transformer_tensors(cfg, width_divisor):
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        if only_blocks and not key.startswith(("double_blocks.", "single_blocks.")):
            continue
        out[UNET_PREFIX + key[: -len(".weight")].replace(".", "_")] = shape
    return out


def checkpoint_tensors(width_divisor: int = 1, *, prefixed: bool = False,
                       text_encoders: bool = False) -> Iterator[tuple[str, Shape]]:
    """A Flux checkpoint's parameters: the BFL single file (bare keys), or with ``prefixed`` the
    all-in-one layout (``model.diffusion_model.`` and, with ``text_encoders``, CLIP-L and T5)."""
    unet = CKPT_UNET_PREFIX if prefixed else ""
    for key, shape in transformer_tensors(FLUX_DEV, width_divisor):
        yield unet + key, shape
    if text_encoders:
        for key, shape in text_encoder_tensors(CLIP_L, width_divisor):
            yield CKPT_CLIP_PREFIX + key, shape
        for key, shape in t5_tensors(T5_XXL, width_divisor):
            yield CKPT_T5_PREFIX + key, shape


@functools.lru_cache(maxsize=1)
def module_shapes() -> dict[str, Shape]:
    """Every kohya Flux module (transformer, CLIP-L, T5) → its full-size weight shape."""
    return lora_modules(text_encoders=("clip", "t5"))


def transformer_path(name: str) -> str | None:
    """``lora_unet_double_blocks_0_img_attn_qkv`` → ``double_blocks_0_img_attn_qkv`` (None if not a Flux name)."""
    if not name.startswith(UNET_PREFIX):
        return None
    path = name[len(UNET_PREFIX):]
    return path if path.startswith(ROOTS) else None
