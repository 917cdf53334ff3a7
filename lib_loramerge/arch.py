"""Which model a LoRA was trained for: sd1, sd2, sdxl, flux, or unknown — from names and shapes first.

Each piece of evidence narrows a set of candidates: the cross-attention context width of
``attn2.to_k``/``to_v`` (768 / 1024 / 2048), the text-encoder widths and prefixes, which UNet
blocks exist, SD1's 1×1-conv ``proj_in``, SDXL's deeper transformer stacks. Metadata
(``ss_base_model_version``, ``ss_v2``, ``modelspec.architecture``) breaks ties and is reported
when it disagrees with the shapes; the shapes win.

Flux LoRAs (kohya BFL names, which the reader gives every Flux file) are told by their block
names and by the ratios of their widths to the hidden width (qkv 3×, linear1 7×, modulations 6×
and 3×, MLP 4×); Flux.1 is 3072 wide with 19 double and 38 single blocks. Real Flux LoRAs often
carry ``ss_base_model_version=sd_1.5`` from their trainer: reported, and overruled.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .model import CONV1X1, LINEAR, kind_of

SD1, SD2, SDXL, FLUX, UNKNOWN = "sd1", "sd2", "sdxl", "flux", "unknown"
SD_ARCHES = (SD1, SD2, SDXL)
ALL = frozenset(SD_ARCHES)

_CONTEXT = {768: SD1, 1024: SD2, 2048: SDXL}
_TE_WIDTH = {768: SD1, 1024: SD2}
_NON_SD = re.compile(r"double_blocks|single_blocks|joint_blocks|lora_transformer_|lora_prior_unet_|context_embedder")
_TE_LAYER = re.compile(
    r"lora_te([12]?)_text_model_encoder_layers_(\d+)_(self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc1|mlp_fc2)")
_INPUT_BLOCK = re.compile(r"lora_unet_input_blocks_(\d+)_(\d+)_")
_OUTPUT_BLOCK = re.compile(r"lora_unet_output_blocks_(\d+)_")
_TBLOCK = re.compile(r"transformer_blocks_(\d+)_")
_UP_BLOCK = re.compile(r"lora_unet_up_blocks_(\d+)_")
_DOWN_ATTN = re.compile(r"lora_unet_down_blocks_(\d+)_attentions_")

PRETTY = {SD1: "SD1", SD2: "SD2", SDXL: "SDXL", FLUX: "Flux", UNKNOWN: "unknown"}

_FLUX_BLOCK = re.compile(r"lora_unet_(double|single)_blocks_(\d+)_(.+)")
# Flux layer → (output rows, input columns) in hidden widths; None where the width is not the hidden one
_FLUX_RATIOS = {
    "img_attn_qkv": (3, 1), "txt_attn_qkv": (3, 1), "img_attn_proj": (1, 1), "txt_attn_proj": (1, 1),
    "img_mlp_0": (4, 1), "txt_mlp_0": (4, 1), "img_mlp_2": (1, 4), "txt_mlp_2": (1, 4),
    "img_mod_lin": (6, 1), "txt_mod_lin": (6, 1),
    "linear1": (7, 1), "linear2": (1, 5), "modulation_lin": (3, 1),
}


@dataclass
class ArchInfo:
    arch: str
    source: str  # "shapes", "metadata" or "none"
    notes: list[str] = field(default_factory=list)


def arch_from_metadata(metadata: Mapping[str, str]) -> tuple[str | None, str]:
    """(arch or "other" or None, the metadata key/value that said so)."""
    base = metadata.get("ss_base_model_version", "")
    if base:
        b = base.lower()
        if b.startswith("sdxl"):
            return SDXL, f"ss_base_model_version={base}"
        if b.startswith("sd_v2"):
            return SD2, f"ss_base_model_version={base}"
        if b.startswith("sd_v1"):
            return SD1, f"ss_base_model_version={base}"
        if b.startswith("flux"):
            return FLUX, f"ss_base_model_version={base}"
        return "other", f"ss_base_model_version={base}"
    spec = metadata.get("modelspec.architecture", "")
    if spec:
        s = spec.lower()
        for prefix, arch in (("stable-diffusion-xl", SDXL), ("stable-diffusion-v2", SD2), ("stable-diffusion-v1", SD1)):
            if s.startswith(prefix):
                return arch, f"modelspec.architecture={spec}"
        if s.startswith("flux"):
            return FLUX, f"modelspec.architecture={spec}"
        return "other", f"modelspec.architecture={spec}"
    if metadata.get("ss_v2") == "True":
        return SD2, "ss_v2=True"
    if metadata.get("ss_v2") == "False":
        return SD1, "ss_v2=False"
    return None, ""


def shape_evidence(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[frozenset[str], str]]:
    """(candidate set, reason) for every clue in the module names and weight shapes."""
    clues: dict[str, tuple[frozenset[str], str]] = {}

    def add(key: str, cands: set[str], reason: str) -> None:
        clues.setdefault(key, (frozenset(cands), reason))

    for name, shape in shapes.items():
        if m := _TE_LAYER.fullmatch(name):
            width = shape[0] if m[3] == "mlp_fc2" else shape[1]
            if m[1]:  # lora_te1_ (CLIP-L, 768) and lora_te2_ (bigG, 1280) are SDXL's two encoders
                cands = {SDXL} if width == (768 if m[1] == "1" else 1280) else set()
            else:  # lora_te_: SD1's CLIP-L (768) or SD2's OpenCLIP-H (1024)
                cands = {_TE_WIDTH[width]} if width in _TE_WIDTH else set()
            add(f"te{m[1]}:{width}", cands, f"text encoder {'lora_te' + m[1]} width {width}")
            continue
        if not name.startswith("lora_unet_"):
            continue
        if name.endswith(("attn2_to_k", "attn2_to_v")) and len(shape) == 2:
            arch = _CONTEXT.get(shape[1])
            add(f"ctx:{shape[1]}", {arch} if arch else set(), f"cross-attention context {shape[1]}")
        if name.endswith(("_proj_in", "_proj_out")):
            kind = kind_of(shape)
            if kind == CONV1X1:
                add("proj:conv", {SD1}, "1×1-conv proj_in/proj_out")
            elif kind == LINEAR:
                add("proj:linear", {SD2, SDXL}, "linear proj_in/proj_out")
        if (m := _TBLOCK.search(name)) and int(m[1]) >= 1:
            add("deep", {SDXL}, "transformer blocks beyond the first")
        if "add_embedding" in name or "label_emb" in name:
            add("label", {SDXL}, "label (add) embedding")
        if (m := _UP_BLOCK.match(name)) and int(m[1]) >= 3:
            add("up3", {SD1, SD2}, "a fourth up block")
        if (m := _DOWN_ATTN.match(name)) and int(m[1]) == 0:
            add("down0attn", {SD1, SD2}, "attention in the first down block")
        if (m := _INPUT_BLOCK.match(name)) and m[2] == "1" and int(m[1]) in (1, 2):
            add("in12attn", {SD1, SD2}, "attention in input blocks 1–2")
        if (m := _INPUT_BLOCK.match(name)) and int(m[1]) >= 9:
            add("in9", {SD1, SD2}, "input blocks beyond 8")
        if (m := _OUTPUT_BLOCK.match(name)) and int(m[1]) >= 9:
            add("out9", {SD1, SD2}, "output blocks beyond 8")
    return list(clues.values())


def detect_arch(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> ArchInfo:
    """Architecture of a LoRA from its module names → weight shapes, cross-checked with metadata."""
    meta_arch, meta_why = arch_from_metadata(metadata)
    flux = flux_info(shapes, meta_arch, meta_why)
    if flux is not None:
        return flux
    non_sd = next((n for n in shapes if _NON_SD.search(n)), None)
    if non_sd is not None:
        return ArchInfo(UNKNOWN, "shapes", [f"not an SD1/SD2/SDXL LoRA (transformer keys such as '{non_sd}', "
                                            "e.g. Flux or SD3)"])
    clues = shape_evidence(shapes)
    cands = set(ALL)
    for c, _ in clues:
        cands &= c
    notes: list[str] = []
    if not clues:
        if meta_arch in SD_ARCHES:
            return ArchInfo(meta_arch, "metadata", [f"no telling layer shapes; from metadata ({meta_why})"])
        if meta_arch in ("other", FLUX):
            return ArchInfo(UNKNOWN, "metadata", [f"not an SD1/SD2/SDXL LoRA ({meta_why})"])
        return ArchInfo(UNKNOWN, "none", ["no module names or shapes of SD1, SD2 or SDXL"])
    if not cands:
        said = "; ".join(f"{reason} → {'/'.join(sorted(PRETTY[a] for a in c)) or 'none'}" for c, reason in clues)
        return ArchInfo(UNKNOWN, "shapes", [f"conflicting shapes: {said}"])
    if len(cands) > 1:
        if meta_arch in cands:
            return ArchInfo(meta_arch, "metadata", [f"shapes fit {'/'.join(sorted(PRETTY[a] for a in cands))}; "
                                                    f"metadata ({meta_why}) decides"])
        arch = min(cands, key=SD_ARCHES.index)
        notes.append(f"shapes fit {' or '.join(PRETTY[a] for a in sorted(cands, key=SD_ARCHES.index))}; "
                     f"assuming {PRETTY[arch]} (no metadata says otherwise)")
    else:
        arch = next(iter(cands))
    if meta_arch is not None and meta_arch != arch:
        notes.append(f"metadata says {PRETTY.get(meta_arch, meta_arch)} ({meta_why}) but the layer shapes are "
                     f"{PRETTY[arch]}; using {PRETTY[arch]}")
    return ArchInfo(arch, "shapes", notes)


def flux_info(shapes: Mapping[str, tuple[int, ...]], meta_arch: str | None = None,
              meta_why: str = "") -> ArchInfo | None:
    """Flux from kohya BFL module names and their widths; None when no name is a Flux block's."""
    blocks = {n: m for n in shapes if (m := _FLUX_BLOCK.fullmatch(n))}
    if not blocks and not any(n.startswith("lora_te3_") for n in shapes):
        return None
    widths: dict[int, str] = {}
    for name, m in blocks.items():
        shape = shapes[name]
        ratio = _FLUX_RATIOS.get(m[3])
        if len(shape) != 2 or ratio is None:
            continue
        out, inp = shape
        if out % ratio[0] or inp % ratio[1] or out // ratio[0] != inp // ratio[1]:
            return ArchInfo(UNKNOWN, "shapes", [f"Flux block names but '{name}' is {out}×{inp}, not a Flux "
                                                f"layer's shape ({ratio[0]}h × {ratio[1]}h)"])
        widths.setdefault(inp // ratio[1], name)
    if len(widths) > 1:
        listing = ", ".join(f"{w} ('{n}')" for w, n in widths.items())
        return ArchInfo(UNKNOWN, "shapes", [f"Flux block names with different hidden widths: {listing}"])
    deepest = {kind: max((int(m[2]) for m in blocks.values() if m[1] == kind), default=-1)
               for kind in ("double", "single")}
    if deepest["double"] > 18 or deepest["single"] > 37:
        return ArchInfo(UNKNOWN, "shapes", [f"Flux-like block names beyond Flux.1's 19 double / 38 single blocks "
                                            f"(double up to {deepest['double']}, single up to {deepest['single']})"])
    notes: list[str] = []
    hidden = next(iter(widths), None)
    if hidden is not None and hidden != 3072:
        notes.append(f"Flux layout with hidden width {hidden} (Flux.1 is 3072): a reduced or synthetic model")
    if meta_arch is not None and meta_arch != FLUX:
        said = f"says {PRETTY[meta_arch]} ({meta_why})" if meta_arch in PRETTY else f"has {meta_why}"
        notes.append(f"metadata {said} but the layer names and shapes are Flux; using Flux")
    return ArchInfo(FLUX, "shapes", notes)
