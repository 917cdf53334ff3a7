"""Formats we recognise but do not merge, and files that are not LoRAs at all.

Every one of these is refused with a message that names what the file is, never dropped
silently: a silently dropped module is a LoRA that "does nothing" with no hint why.
"""

from __future__ import annotations

import re
from collections import Counter

# key suffix (after ``<module>.``) → algorithm name, for keys no format adapter reads. LoHa, LoKr
# and DoRA are read in kohya naming (``lora_unet_…``); the same keys under dotted (diffusers/PEFT)
# paths are not, and are refused by name rather than dropped.
ALGORITHM_SUFFIXES = {
    "diff": "LyCORIS full (diff)", "diff_b": "LyCORIS full (diff)",
    "on_input": "LyCORIS IA3",
    "a1.weight": "LyCORIS GLoRA", "a2.weight": "LyCORIS GLoRA",
    "b1.weight": "LyCORIS GLoRA", "b2.weight": "LyCORIS GLoRA",
    "oft_blocks": "OFT/BOFT", "oft_diag": "OFT/BOFT", "oft_R": "OFT/BOFT",
    "w_norm": "LyCORIS norm", "b_norm": "LyCORIS norm",
    **{f"hada_{p}": "LyCORIS LoHa" for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{p}": "LyCORIS LoKr" for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    "dora_scale": "DoRA",
}
READ_IN_KOHYA_NAMING = frozenset({"LyCORIS LoHa", "LyCORIS LoKr", "DoRA"})
_ALGO_KEY = re.compile(r"(?P<module>.+?)\.(?P<suffix>" + "|".join(re.escape(s) for s in ALGORITHM_SUFFIXES) + ")")
_CLONEOFSIMO = re.compile(r"(unet|text_encoder):\d+:(up|down)")
_MALFORMED_KOHYA = re.compile(r"lora_(unet|te\d?)_[^.]+_lora_(up|down)\.weight")

_WHY = {algo: "read in kohya naming only ('lora_unet_…'), not under dotted diffusers/PEFT paths"
        for algo in READ_IN_KOHYA_NAMING}


def unsupported_algorithms(keys: list[str]) -> dict[str, list[str]]:
    """Algorithm name → modules that use it, for every recognised module in ``keys`` (keys no adapter read)."""
    found: dict[str, set[str]] = {}
    for key in keys:
        m = _ALGO_KEY.fullmatch(key)
        if m:
            found.setdefault(ALGORITHM_SUFFIXES[m["suffix"]], set()).add(m["module"])
    return {algo: sorted(mods) for algo, mods in found.items()}


def unsupported_format_reason(keys: list[str]) -> str | None:
    """Why a file in a recognised but unsupported key format is refused, or None."""
    algos = unsupported_algorithms(keys)
    if algos:
        parts = []
        for algo, mods in sorted(algos.items(), key=lambda kv: -len(kv[1])):
            why = f" ({_WHY[algo]})" if algo in _WHY else ""
            parts.append(f"{algo} on {len(mods)} modules (e.g. '{mods[0]}'){why}")
        return "unsupported format: " + "; ".join(parts) + "; LoRA, LoCon, LoHa and LoKr modules can be merged"
    positional = [k for k in keys if _CLONEOFSIMO.fullmatch(k)]
    if positional:
        return (f"unsupported format: cloneofsimo lora_diffusion keys ('{positional[0]}', {len(positional)} tensors) "
                "address layers by position in a model walk, not by name, so they cannot be matched to layers")
    malformed = [k for k in keys if _MALFORMED_KOHYA.fullmatch(k)]
    if malformed:
        return (f"malformed kohya keys ('{malformed[0]}'): the factor must be separated by a dot "
                "('<module>.lora_down.weight'); A1111 ignores such keys, so this LoRA has no effect there")
    return None


_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.embedders.",
                        "first_stage_model.", "model_ema.")
_DIFFUSERS_MODEL_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "time_embedding.",
                          "text_model.", "encoder.", "decoder.")


def not_a_lora_reason(keys: list[str]) -> str:
    """Describe a file that holds no LoRA tensors at all."""
    if not keys:
        return "not a LoRA: the file holds no tensors"
    prefixes = Counter(next((p for p in _CHECKPOINT_PREFIXES if k.startswith(p)), "") for k in keys)
    if sum(n for p, n in prefixes.items() if p) > len(keys) // 2:
        return f"not a LoRA: this is a model checkpoint ({len(keys)} tensors, e.g. '{_first(keys, _CHECKPOINT_PREFIXES)}')"
    if any(k in ("emb_params", "clip_l", "clip_g") or k.startswith("string_to_param") for k in keys):
        return "not a LoRA: this is a textual-inversion embedding"
    if sum(k.startswith(_DIFFUSERS_MODEL_ROOTS) for k in keys) > len(keys) // 2:
        return f"not a LoRA: these are full model weights in diffusers layout ({len(keys)} tensors)"
    return f"not a LoRA: no LoRA tensors found ({len(keys)} tensors, e.g. '{keys[0]}')"


def _first(keys: list[str], prefixes: tuple[str, ...]) -> str:
    return next((k for k in keys if k.startswith(prefixes)), keys[0])
