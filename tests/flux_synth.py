"""Synthetic Flux LoRAs in every input naming, with the test's own table of where each layer lands.

The table below is written from the BFL / diffusers model definitions independently of the code
under test: diffusers layer → (kohya BFL module, first row in hidden widths, rows in hidden
widths). Expected ΔW of a fused layer is built densely here, from the split parts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

DIVISOR = 32
H = 3072 // DIVISOR  # 96
MLP = 4 * H
IN_CH, TIME, VEC, CTX = 64 // DIVISOR, 256 // DIVISOR, 768 // DIVISOR, 4096 // DIVISOR


def diffusers_layers() -> dict[str, tuple[tuple[int, int], str, int, int]]:
    """diffusers dotted path → ((out, in), BFL kohya name, first row / H, height of the BFL layer / H)."""
    t: dict[str, tuple[tuple[int, int], str, int, int]] = {}
    top = {
        "x_embedder": ((H, IN_CH), "img_in"), "context_embedder": ((H, CTX), "txt_in"),
        "time_text_embed.timestep_embedder.linear_1": ((H, TIME), "time_in_in_layer"),
        "time_text_embed.timestep_embedder.linear_2": ((H, H), "time_in_out_layer"),
        "time_text_embed.text_embedder.linear_1": ((H, VEC), "vector_in_in_layer"),
        "time_text_embed.text_embedder.linear_2": ((H, H), "vector_in_out_layer"),
        "time_text_embed.guidance_embedder.linear_1": ((H, TIME), "guidance_in_in_layer"),
        "time_text_embed.guidance_embedder.linear_2": ((H, H), "guidance_in_out_layer"),
        "proj_out": ((IN_CH, H), "final_layer_linear"),
    }
    for path, (shape, bfl) in top.items():
        t[path] = (shape, f"lora_unet_{bfl}", 0, 0)
    t["norm_out.linear"] = ((2 * H, H), "lora_unet_final_layer_adaLN_modulation_1", -1, 2)  # halves swapped
    for n in range(19):
        d, b = f"transformer_blocks.{n}", f"lora_unet_double_blocks_{n}"
        for i, proj in enumerate(("to_q", "to_k", "to_v")):
            t[f"{d}.attn.{proj}"] = ((H, H), f"{b}_img_attn_qkv", i, 3)
        for i, proj in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            t[f"{d}.attn.{proj}"] = ((H, H), f"{b}_txt_attn_qkv", i, 3)
        whole = {"attn.to_out.0": ((H, H), "img_attn_proj"), "attn.to_add_out": ((H, H), "txt_attn_proj"),
                 "ff.net.0.proj": ((MLP, H), "img_mlp_0"), "ff.net.2": ((H, MLP), "img_mlp_2"),
                 "ff_context.net.0.proj": ((MLP, H), "txt_mlp_0"), "ff_context.net.2": ((H, MLP), "txt_mlp_2"),
                 "norm1.linear": ((6 * H, H), "img_mod_lin"), "norm1_context.linear": ((6 * H, H), "txt_mod_lin")}
        for path, (shape, bfl) in whole.items():
            t[f"{d}.{path}"] = (shape, f"{b}_{bfl}", 0, 0)
    for n in range(38):
        d, b = f"single_transformer_blocks.{n}", f"lora_unet_single_blocks_{n}"
        for i, proj in enumerate(("to_q", "to_k", "to_v")):
            t[f"{d}.attn.{proj}"] = ((H, H), f"{b}_linear1", i, 7)
        t[f"{d}.proj_mlp"] = ((MLP, H), f"{b}_linear1", 3, 7)
        t[f"{d}.proj_out"] = ((H, H + MLP), f"{b}_linear2", 0, 0)
        t[f"{d}.norm.linear"] = ((3 * H, H), f"{b}_modulation_lin", 0, 0)
    return t


def random_parts(seed: int = 0, rank: int = 2, vary: bool = True, only: set[str] | None = None
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """diffusers path → (up, down, alpha). ``vary``: ranks 1–3 and alphas that differ by part."""
    gen = torch.Generator().manual_seed(seed)
    parts = {}
    for i, (path, ((out, inp), *_)) in enumerate(diffusers_layers().items()):
        if only is not None and path not in only:
            continue
        r = 1 + i % 3 if vary else rank
        alpha = (0.5 + (i % 5)) if vary else float(rank)
        parts[path] = (torch.randn(out, r, generator=gen) * 0.1, torch.randn(r, inp, generator=gen) * 0.1, alpha)
    return parts


def part_delta(up: torch.Tensor, down: torch.Tensor, alpha: float | None) -> torch.Tensor:
    scale = 1.0 if alpha is None else alpha / down.shape[0]
    return scale * (up.double() @ down.double())


def expected_deltas(parts: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]) -> dict[str, torch.Tensor]:
    """kohya BFL module → dense ΔW, stacking split parts at their rows (zeros where a part is absent)."""
    table = diffusers_layers()
    out: dict[str, torch.Tensor] = {}
    for path, (up, down, alpha) in parts.items():
        (o, i), name, first, height = table[path]
        delta = part_delta(up, down, alpha)
        if height == 0:
            out[name] = delta
        elif first == -1:  # norm_out (scale, shift) → adaLN_modulation (shift, scale)
            out[name] = torch.cat([delta[H:], delta[:H]])
        else:
            full = out.setdefault(name, torch.zeros(height * H, i, dtype=torch.float64))
            full[first * H:first * H + o] += delta
    return out


def write_peft(path: Path, parts, prefix: str = "transformer.") -> Path:
    sd = {}
    for p, (up, down, _alpha) in parts.items():
        sd[f"{prefix}{p}.lora_A.weight"] = down.contiguous()
        sd[f"{prefix}{p}.lora_B.weight"] = up.contiguous()
    save_file(sd, str(path))
    return path


def write_diffusers(path: Path, parts) -> Path:
    sd = {}
    for p, (up, down, alpha) in parts.items():
        sd[f"transformer.{p}.lora.down.weight"] = down.contiguous()
        sd[f"transformer.{p}.lora.up.weight"] = up.contiguous()
        if alpha is not None:
            sd[f"transformer.{p}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def write_kohya_diffusers_names(path: Path, parts, metadata: dict[str, str] | None = None) -> Path:
    """SimpleTuner-style: kohya keys on diffusers paths (``lora_transformer_transformer_blocks_0_attn_to_q``)."""
    sd = {}
    for p, (up, down, alpha) in parts.items():
        name = "lora_transformer_" + p.replace(".", "_")
        sd[f"{name}.lora_down.weight"] = down.contiguous()
        sd[f"{name}.lora_up.weight"] = up.contiguous()
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path), metadata=metadata)
    return path


def bfl_path(kohya_name: str) -> str:
    """``lora_unet_double_blocks_0_img_attn_qkv`` → ``double_blocks.0.img_attn.qkv`` (the test's own table)."""
    rest = kohya_name[len("lora_unet_"):]
    for word in ("double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod",
                 "txt_mod", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "in_layer", "out_layer",
                 "final_layer", "adaLN_modulation", "modulation"):
        rest = rest.replace(word, word.replace("_", "~"))
    return rest.replace("_", ".").replace("~", "_")


def write_bfl_lora_ab(path: Path, modules, prefix: str = "diffusion_model.") -> Path:
    sd = {}
    for m in modules:
        base = prefix + bfl_path(m.name)
        sd[f"{base}.lora_A.weight"] = m.down.contiguous()
        sd[f"{base}.lora_B.weight"] = m.up.contiguous()
        if m.alpha is not None:
            sd[f"{base}.alpha"] = torch.tensor(float(m.alpha))
    save_file(sd, str(path))
    return path
