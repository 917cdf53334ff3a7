"""Reference layouts of SD1, SD2 and SDXL: every weight's key and shape, and the LoRA modules on them.

Built from the architectures' structure (channel multipliers, blocks, transformer depths, text
encoder widths), not from a model file, so tests and benchmarks can make LoRAs and checkpoints
with the real names and shapes without downloading anything. The shared test tier checks these
against key lists taken from real checkpoints. ``width_divisor`` narrows every width (names
and kinds stay) for small synthetic checkpoints.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

from . import naming

ARCHES = ("sd1", "sd2", "sdxl")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class UnetConfig:
    channel_mult: tuple[int, ...]
    transformer_depth: tuple[int, ...]  # per level; 0 = no attention at that level
    mid_depth: int
    context_dim: int
    linear_proj: bool
    adm_channels: int = 0  # SDXL's label embedding input
    model_channels: int = 320
    num_res_blocks: int = 2
    in_channels: int = 4


@dataclass(frozen=True)
class TextEncoderConfig:
    kind: str  # "clip" (HF CLIP text model) or "openclip" (fused attention)
    width: int
    layers: int  # layers in the checkpoint
    lora_layers: int  # layers kohya trains (SD2's OpenCLIP drops the last one)
    ckpt_prefix: str
    lora_prefix: str
    projection: int = 0  # OpenCLIP text_projection width


UNETS = {
    "sd1": UnetConfig((1, 2, 4, 4), (1, 1, 1, 0), 1, 768, linear_proj=False),
    "sd2": UnetConfig((1, 2, 4, 4), (1, 1, 1, 0), 1, 1024, linear_proj=True),
    "sdxl": UnetConfig((1, 2, 4), (0, 2, 10), 10, 2048, linear_proj=True, adm_channels=2816),
}

TEXT_ENCODERS = {
    "sd1": (TextEncoderConfig("clip", 768, 12, 12, "cond_stage_model.transformer.", "lora_te_"),),
    "sd2": (TextEncoderConfig("openclip", 1024, 24, 23, "cond_stage_model.model.", "lora_te_", projection=1024),),
    "sdxl": (
        TextEncoderConfig("clip", 768, 12, 12, "conditioner.embedders.0.transformer.", "lora_te1_"),
        TextEncoderConfig("openclip", 1280, 32, 32, "conditioner.embedders.1.model.", "lora_te2_", projection=1280),
    ),
}

UNET_CKPT_PREFIX = "model.diffusion_model."

# LoRA module scopes, as trainers choose them
SCOPE_ATTENTION = "attention"  # kohya LoRA default: everything inside the transformer blocks
SCOPE_LOCON = "locon"  # + ResNet blocks and down/upsamplers (kohya conv_dim)
SCOPE_ALL = "all"  # + conv_in, conv_out, time and label embeddings (LyCORIS "full" presets)


# ----------------------------------------------------------------------------------------------
# UNet


def _resblock(prefix: str, cin: int, cout: int, emb: int) -> Iterator[tuple[str, Shape]]:
    yield f"{prefix}.in_layers.0.weight", (cin,)
    yield f"{prefix}.in_layers.0.bias", (cin,)
    yield f"{prefix}.in_layers.2.weight", (cout, cin, 3, 3)
    yield f"{prefix}.in_layers.2.bias", (cout,)
    yield f"{prefix}.emb_layers.1.weight", (cout, emb)
    yield f"{prefix}.emb_layers.1.bias", (cout,)
    yield f"{prefix}.out_layers.0.weight", (cout,)
    yield f"{prefix}.out_layers.0.bias", (cout,)
    yield f"{prefix}.out_layers.3.weight", (cout, cout, 3, 3)
    yield f"{prefix}.out_layers.3.bias", (cout,)
    if cin != cout:
        yield f"{prefix}.skip_connection.weight", (cout, cin, 1, 1)
        yield f"{prefix}.skip_connection.bias", (cout,)


def _transformer(prefix: str, ch: int, depth: int, context: int, linear: bool) -> Iterator[tuple[str, Shape]]:
    proj: Shape = (ch, ch) if linear else (ch, ch, 1, 1)
    yield f"{prefix}.norm.weight", (ch,)
    yield f"{prefix}.norm.bias", (ch,)
    yield f"{prefix}.proj_in.weight", proj
    yield f"{prefix}.proj_in.bias", (ch,)
    for k in range(depth):
        tb = f"{prefix}.transformer_blocks.{k}"
        for attn, kv_in in (("attn1", ch), ("attn2", context)):
            yield f"{tb}.{attn}.to_q.weight", (ch, ch)
            yield f"{tb}.{attn}.to_k.weight", (ch, kv_in)
            yield f"{tb}.{attn}.to_v.weight", (ch, kv_in)
            yield f"{tb}.{attn}.to_out.0.weight", (ch, ch)
            yield f"{tb}.{attn}.to_out.0.bias", (ch,)
        yield f"{tb}.ff.net.0.proj.weight", (ch * 8, ch)
        yield f"{tb}.ff.net.0.proj.bias", (ch * 8,)
        yield f"{tb}.ff.net.2.weight", (ch, ch * 4)
        yield f"{tb}.ff.net.2.bias", (ch,)
        for norm in ("norm1", "norm2", "norm3"):
            yield f"{tb}.{norm}.weight", (ch,)
            yield f"{tb}.{norm}.bias", (ch,)
    yield f"{prefix}.proj_out.weight", proj
    yield f"{prefix}.proj_out.bias", (ch,)


def unet_tensors(arch: str, width_divisor: int = 1) -> Iterator[tuple[str, Shape]]:
    """Every UNet parameter of ``arch`` as (LDM key without ``model.diffusion_model.``, shape)."""
    cfg = UNETS[arch]
    mc = cfg.model_channels // width_divisor
    context = cfg.context_dim // width_divisor
    emb = 4 * mc
    yield "time_embed.0.weight", (emb, mc)
    yield "time_embed.0.bias", (emb,)
    yield "time_embed.2.weight", (emb, emb)
    yield "time_embed.2.bias", (emb,)
    if cfg.adm_channels:
        adm = cfg.adm_channels // width_divisor
        yield "label_emb.0.0.weight", (emb, adm)
        yield "label_emb.0.0.bias", (emb,)
        yield "label_emb.0.2.weight", (emb, emb)
        yield "label_emb.0.2.bias", (emb,)
    yield "input_blocks.0.0.weight", (mc, cfg.in_channels, 3, 3)
    yield "input_blocks.0.0.bias", (mc,)
    chans = [mc]
    ch = mc
    n = 1
    last = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            yield from _resblock(f"input_blocks.{n}.0", ch, mult * mc, emb)
            ch = mult * mc
            if cfg.transformer_depth[level]:
                yield from _transformer(f"input_blocks.{n}.1", ch, cfg.transformer_depth[level], context, cfg.linear_proj)
            chans.append(ch)
            n += 1
        if level != last:
            yield f"input_blocks.{n}.0.op.weight", (ch, ch, 3, 3)
            yield f"input_blocks.{n}.0.op.bias", (ch,)
            chans.append(ch)
            n += 1
    yield from _resblock("middle_block.0", ch, ch, emb)
    yield from _transformer("middle_block.1", ch, cfg.mid_depth, context, cfg.linear_proj)
    yield from _resblock("middle_block.2", ch, ch, emb)
    n = 0
    for level in reversed(range(len(cfg.channel_mult))):
        mult = cfg.channel_mult[level]
        for j in range(cfg.num_res_blocks + 1):
            yield from _resblock(f"output_blocks.{n}.0", ch + chans.pop(), mult * mc, emb)
            ch = mult * mc
            sub = 1
            if cfg.transformer_depth[level]:
                yield from _transformer(f"output_blocks.{n}.1", ch, cfg.transformer_depth[level], context, cfg.linear_proj)
                sub = 2
            if level and j == cfg.num_res_blocks:
                yield f"output_blocks.{n}.{sub}.conv.weight", (ch, ch, 3, 3)
                yield f"output_blocks.{n}.{sub}.conv.bias", (ch,)
            n += 1
    yield "out.0.weight", (ch,)
    yield "out.0.bias", (ch,)
    yield "out.2.weight", (cfg.in_channels, ch, 3, 3)
    yield "out.2.bias", (cfg.in_channels,)


def _unet_scope(ldm_path: str) -> str:
    """Which trainer scope first covers a UNet layer (by its LDM path, dotted)."""
    if ".transformer_blocks." in ldm_path or ldm_path.endswith((".proj_in", ".proj_out")):
        return SCOPE_ATTENTION
    if ldm_path.startswith(("time_embed", "label_emb", "out.")) or ldm_path == "input_blocks.0.0":
        return SCOPE_ALL
    return SCOPE_LOCON


# ----------------------------------------------------------------------------------------------
# Text encoders


def text_encoder_tensors(te: TextEncoderConfig, width_divisor: int = 1) -> Iterator[tuple[str, Shape]]:
    """Every parameter of a text encoder, as (key relative to its checkpoint prefix, shape)."""
    w = te.width // width_divisor
    vocab = 49408 // width_divisor
    if te.kind == "clip":
        yield "text_model.embeddings.token_embedding.weight", (vocab, w)
        yield "text_model.embeddings.position_embedding.weight", (77, w)
        yield "text_model.embeddings.position_ids", (1, 77)  # an int64 buffer in most checkpoints
        for n in range(te.layers):
            p = f"text_model.encoder.layers.{n}"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                yield f"{p}.self_attn.{proj}.weight", (w, w)
                yield f"{p}.self_attn.{proj}.bias", (w,)
            for norm in ("layer_norm1", "layer_norm2"):
                yield f"{p}.{norm}.weight", (w,)
                yield f"{p}.{norm}.bias", (w,)
            yield f"{p}.mlp.fc1.weight", (4 * w, w)
            yield f"{p}.mlp.fc1.bias", (4 * w,)
            yield f"{p}.mlp.fc2.weight", (w, 4 * w)
            yield f"{p}.mlp.fc2.bias", (w,)
        yield "text_model.final_layer_norm.weight", (w,)
        yield "text_model.final_layer_norm.bias", (w,)
        return
    yield "positional_embedding", (77, w)
    yield "token_embedding.weight", (vocab, w)
    for n in range(te.layers):
        p = f"transformer.resblocks.{n}"
        yield f"{p}.ln_1.weight", (w,)
        yield f"{p}.ln_1.bias", (w,)
        yield f"{p}.attn.in_proj_weight", (3 * w, w)
        yield f"{p}.attn.in_proj_bias", (3 * w,)
        yield f"{p}.attn.out_proj.weight", (w, w)
        yield f"{p}.attn.out_proj.bias", (w,)
        yield f"{p}.ln_2.weight", (w,)
        yield f"{p}.ln_2.bias", (w,)
        yield f"{p}.mlp.c_fc.weight", (4 * w, w)
        yield f"{p}.mlp.c_fc.bias", (4 * w,)
        yield f"{p}.mlp.c_proj.weight", (w, 4 * w)
        yield f"{p}.mlp.c_proj.bias", (w,)
    yield "ln_final.weight", (w,)
    yield "ln_final.bias", (w,)
    yield "text_projection", (w, te.projection // width_divisor)
    yield "logit_scale", ()


def text_encoder_lora_modules(te: TextEncoderConfig, width_divisor: int = 1) -> Iterator[tuple[str, Shape]]:
    """kohya TE modules (HF CLIP naming for every encoder) with their weight shapes."""
    w = te.width // width_divisor
    for n in range(te.lora_layers):
        p = f"{te.lora_prefix}text_model_encoder_layers_{n}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield f"{p}_self_attn_{proj}", (w, w)
        yield f"{p}_mlp_fc1", (4 * w, w)
        yield f"{p}_mlp_fc2", (w, 4 * w)


# ----------------------------------------------------------------------------------------------
# LoRA modules


def kohya_unet_name(arch: str, ldm_dotted: str, diffusers_names: bool | None = None) -> str:
    """The kohya module name of a UNet layer: diffusers paths for SD1/SD2, LDM paths for SDXL by default."""
    use_diffusers = arch != "sdxl" if diffusers_names is None else diffusers_names
    path = ldm_dotted.replace(".", "_")
    if use_diffusers:
        converted = naming.ldm_to_diffusers(path, sdxl=arch == "sdxl")
        if converted is None:
            raise ValueError(f"no diffusers name for {ldm_dotted}")
        path = converted
    return naming.UNET_PREFIX + path


def lora_modules(arch: str, scope: str = SCOPE_LOCON, text_encoder: bool = True,
                 diffusers_names: bool | None = None, width_divisor: int = 1) -> dict[str, Shape]:
    """kohya LoRA module name → weight shape, for every layer a trainer of ``scope`` targets."""
    order = (SCOPE_ATTENTION, SCOPE_LOCON, SCOPE_ALL)
    wanted = set(order[: order.index(scope) + 1])
    out: dict[str, Shape] = {}
    if text_encoder:
        for te in TEXT_ENCODERS[arch]:
            out.update(text_encoder_lora_modules(te, width_divisor))
    for key, shape in unet_tensors(arch, width_divisor):
        if not key.endswith(".weight") or len(shape) < 2:
            continue
        path = key[: -len(".weight")]
        if _unet_scope(path) in wanted:
            out[kohya_unet_name(arch, path, diffusers_names)] = shape
    return out


# ----------------------------------------------------------------------------------------------
# VAE (the same AutoencoderKL in SD1, SD2 and SDXL)

VAE_CKPT_PREFIX = "first_stage_model."


def _vae_resnet(prefix: str, cin: int, cout: int) -> Iterator[tuple[str, Shape]]:
    yield f"{prefix}.norm1.weight", (cin,)
    yield f"{prefix}.norm1.bias", (cin,)
    yield f"{prefix}.conv1.weight", (cout, cin, 3, 3)
    yield f"{prefix}.conv1.bias", (cout,)
    yield f"{prefix}.norm2.weight", (cout,)
    yield f"{prefix}.norm2.bias", (cout,)
    yield f"{prefix}.conv2.weight", (cout, cout, 3, 3)
    yield f"{prefix}.conv2.bias", (cout,)
    if cin != cout:
        yield f"{prefix}.nin_shortcut.weight", (cout, cin, 1, 1)
        yield f"{prefix}.nin_shortcut.bias", (cout,)


def _vae_mid(prefix: str, ch: int) -> Iterator[tuple[str, Shape]]:
    yield from _vae_resnet(f"{prefix}.block_1", ch, ch)
    yield f"{prefix}.attn_1.norm.weight", (ch,)
    yield f"{prefix}.attn_1.norm.bias", (ch,)
    for proj in ("q", "k", "v", "proj_out"):
        yield f"{prefix}.attn_1.{proj}.weight", (ch, ch, 1, 1)
        yield f"{prefix}.attn_1.{proj}.bias", (ch,)
    yield from _vae_resnet(f"{prefix}.block_2", ch, ch)


def vae_tensors(width_divisor: int = 1, ch_mult: tuple[int, ...] = (1, 2, 4, 4)) -> Iterator[tuple[str, Shape]]:
    """Every VAE parameter (key relative to ``first_stage_model.``, shape): ch 128, z 4, 2/3 blocks per level."""
    ch = 128 // width_divisor
    top = ch * ch_mult[-1]
    yield "encoder.conv_in.weight", (ch, 3, 3, 3)
    yield "encoder.conv_in.bias", (ch,)
    cin = ch
    for i, mult in enumerate(ch_mult):
        for j in range(2):
            yield from _vae_resnet(f"encoder.down.{i}.block.{j}", cin, ch * mult)
            cin = ch * mult
        if i != len(ch_mult) - 1:
            yield f"encoder.down.{i}.downsample.conv.weight", (cin, cin, 3, 3)
            yield f"encoder.down.{i}.downsample.conv.bias", (cin,)
    yield from _vae_mid("encoder.mid", top)
    yield "encoder.norm_out.weight", (top,)
    yield "encoder.norm_out.bias", (top,)
    yield "encoder.conv_out.weight", (8, top, 3, 3)
    yield "encoder.conv_out.bias", (8,)
    yield "decoder.conv_in.weight", (top, 4, 3, 3)
    yield "decoder.conv_in.bias", (top,)
    yield from _vae_mid("decoder.mid", top)
    cin = top
    for i in reversed(range(len(ch_mult))):
        for j in range(3):
            yield from _vae_resnet(f"decoder.up.{i}.block.{j}", cin, ch * ch_mult[i])
            cin = ch * ch_mult[i]
        if i:
            yield f"decoder.up.{i}.upsample.conv.weight", (cin, cin, 3, 3)
            yield f"decoder.up.{i}.upsample.conv.bias", (cin,)
    yield "decoder.norm_out.weight", (ch,)
    yield "decoder.norm_out.bias", (ch,)
    yield "decoder.conv_out.weight", (3, ch, 3, 3)
    yield "decoder.conv_out.bias", (3,)
    yield "quant_conv.weight", (8, 8, 1, 1)
    yield "quant_conv.bias", (8,)
    yield "post_quant_conv.weight", (4, 4, 1, 1)
    yield "post_quant_conv.bias", (4,)


@functools.lru_cache(maxsize=1)
def _layer_shape_table() -> dict[str, dict[str, Shape]]:
    table: dict[str, dict[str, Shape]] = {}
    for arch in ARCHES:
        for diffusers_names in (False, True):
            for name, shape in lora_modules(arch, SCOPE_ALL, diffusers_names=diffusers_names).items():
                table.setdefault(name, {})[arch] = shape
    from . import fluxlayout  # imports this module

    for name, shape in fluxlayout.module_shapes().items():
        table.setdefault(name, {})[fluxlayout.FLUX] = shape
    return table


def layer_shapes(name: str) -> dict[str, Shape]:
    """arch → weight shape of the layer a kohya module name (diffusers or LDM/SGM paths; Flux's BFL paths) targets there."""
    return dict(_layer_shape_table().get(name, {}))


def is_integer_tensor(key: str) -> bool:
    """Checkpoint buffers that are not floating point (kept as they are by a bake)."""
    return key.endswith("position_ids")


def checkpoint_tensors(arch: str, width_divisor: int = 1, vae: bool = False) -> Iterator[tuple[str, Shape]]:
    """Every UNet and text-encoder (and with ``vae``, VAE) parameter of an LDM-format checkpoint."""
    for key, shape in unet_tensors(arch, width_divisor):
        yield UNET_CKPT_PREFIX + key, shape
    for te in TEXT_ENCODERS[arch]:
        for key, shape in text_encoder_tensors(te, width_divisor):
            yield te.ckpt_prefix + key, shape
    if vae:
        for key, shape in vae_tensors(width_divisor):
            yield VAE_CKPT_PREFIX + key, shape
