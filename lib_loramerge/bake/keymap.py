"""Where each LoRA module lands in an LDM-format (or Flux) checkpoint, built from the checkpoint's own keys.

kohya names lost the dots of the module paths, so we index the checkpoint the other way round:
every ``….weight`` key, minus its component prefix, with dots turned into underscores. UNet
modules in either naming (diffusers or LDM paths) are converted to LDM paths first. The
OpenCLIP text encoders (SD2, SDXL's second) fuse q/k/v into one ``attn.in_proj_weight``: those
modules land on a third of its rows, as A1111 applies them. Flux modules (kohya BFL names) land
on the BFL keys, bare in a BFL single file or under ``model.diffusion_model.`` in an all-in-one
file (with CLIP-L and T5 under ``text_encoders.``); quantised (nf4) Flux files are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import fluxlayout, naming
from ..errors import LoraMergeError

UNET = "model.diffusion_model."
_OPENCLIP_LAYER = re.compile(r"text_model_encoder_layers_(\d+)_(self_attn_([qkv])_proj|self_attn_out_proj|mlp_fc1|mlp_fc2)")
_OPENCLIP_PARTS = {"self_attn_out_proj": "attn.out_proj.weight", "mlp_fc1": "mlp.c_fc.weight",
                   "mlp_fc2": "mlp.c_proj.weight"}

# text encoders per architecture: (kohya module prefix, checkpoint key prefix, kind). The OpenCLIP
# encoders are stored as OpenCLIP (fused in_proj) in LDM checkpoints and in A1111's model, and
# converted to the HF CLIP layout (separate q/k/v) in Forge's model, presented under ``transformer.``.
_ENCODERS = {
    "sd1": (("lora_te_", "cond_stage_model.transformer.", "clip"),),
    "sd2": (("lora_te_", "cond_stage_model.model.", "openclip"), ("lora_te_", "cond_stage_model.transformer.", "clip")),
    "sdxl": (("lora_te1_", "conditioner.embedders.0.transformer.", "clip"),
             ("lora_te2_", "conditioner.embedders.1.model.", "openclip"),
             ("lora_te2_", "conditioner.embedders.1.transformer.", "clip")),
    # Flux all-in-one files (ComfyUI / Forge); the BFL single file holds the transformer alone
    "flux": (("lora_te1_", fluxlayout.CKPT_CLIP_PREFIX, "clip"), ("lora_te3_", fluxlayout.CKPT_T5_PREFIX, "t5")),
}
_FLUX_KEYS = tuple(f"{prefix}{root}." for prefix in ("", UNET) for root in ("double_blocks", "single_blocks"))
# markers of quantised weights (bitsandbytes nf4/fp4 as Forge and ComfyUI store them)
_QUANTISED = (".absmax", ".quant_map", ".quant_state", "bitsandbytes__", ".nested_absmax")


def quantised_reason(keys: list[str], non_float: set[str] | frozenset[str] = frozenset()) -> str | None:
    """Why a checkpoint's weights cannot be baked (quantised: nf4/fp4 blocks), or None."""
    marker = next((k for k in keys if any(q in k for q in _QUANTISED)), None)
    packed = next((k for k in non_float if k.endswith(".weight") and k.startswith(_FLUX_KEYS)), None)
    if marker is None and packed is None:
        return None
    return (f"a quantised checkpoint (bitsandbytes nf4/fp4 weights, e.g. '{marker or packed}'): its weights cannot "
            "take W + ΔW exactly; bake into the bf16, fp16 or fp8 (float8_e4m3fn) file instead")


def is_flux_checkpoint(keys: list[str]) -> bool:
    """BFL transformer keys, bare (BFL single file) or under ``model.diffusion_model.`` (all-in-one)."""
    return any(k.startswith(_FLUX_KEYS) for k in keys)


def checkpoint_arch(keys: list[str]) -> str:
    """sd1 / sd2 / sdxl / flux from the checkpoint's keys (A1111's own tests), or a LoraMergeError."""
    if is_flux_checkpoint(keys):
        return "flux"
    if not any(k.startswith(UNET) for k in keys):
        raise LoraMergeError("not an LDM-format Stable Diffusion checkpoint (no model.diffusion_model.* keys)")
    if any(k.startswith(("conditioner.embedders.1.model.", "conditioner.embedders.1.transformer.")) for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise LoraMergeError("an SDXL refiner checkpoint: LoRAs are trained for the base model, not supported")
    if any(k.startswith("cond_stage_model.model.transformer.resblocks.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    if any(k.startswith(UNET + "x_embedder") or k.startswith(UNET + "joint_blocks") for k in keys):
        raise LoraMergeError("an SD3 checkpoint: not supported (SD1, SD2 and SDXL are)")
    raise LoraMergeError("unrecognised checkpoint: no SD1/SD2/SDXL text encoder keys")


@dataclass(frozen=True)
class Target:
    """A checkpoint tensor (or a block of its rows) that one LoRA module updates."""

    key: str
    tensor_shape: tuple[int, ...]
    rows: tuple[int, int] | None = None  # fused OpenCLIP q/k/v: rows [start, stop) of in_proj_weight

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.rows is None:
            return self.tensor_shape
        return (self.rows[1] - self.rows[0], *self.tensor_shape[1:])


class CheckpointLayout:
    """Module name → Target for one checkpoint."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], non_float: set[str] | frozenset[str] = frozenset(),
                 arch: str | None = None):
        self.shapes = shapes
        self.non_float = non_float  # integer / bool tensors: never patched
        # a loaded model says what it is (an SD2 TE in the HF layout looks like SD1's by its keys)
        self.arch = arch or checkpoint_arch(list(shapes))
        if self.arch == "flux" and (why := quantised_reason(list(shapes), non_float)):
            raise LoraMergeError(why)
        # a BFL single file has bare transformer keys
        prefixed = self.arch != "flux" or any(k.startswith(UNET) for k in shapes)
        self._unet = self._index(UNET if prefixed else "")
        self._clip: dict[str, dict[str, str]] = {}  # HF-layout encoders (CLIP, T5): kohya name → key
        self._encoders = [e for e in _ENCODERS[self.arch] if any(k.startswith(e[1]) for k in shapes)]
        for lora_prefix, ckpt_prefix, kind in self._encoders:
            if kind in ("clip", "t5"):
                self._clip[lora_prefix] = self._index(ckpt_prefix, text_model=kind == "clip")

    def _index(self, prefix: str, text_model: bool = False) -> dict[str, str]:
        index = {}
        for key, shape in self.shapes.items():
            if key.startswith(prefix) and key.endswith(".weight") and len(shape) >= 2:
                path = key[len(prefix): -len(".weight")]
                if text_model and not path.startswith("text_model."):
                    path = "text_model." + path  # old SD1 checkpoints omit it (A1111 normalises the same way)
                index[path.replace(".", "_")] = key
        return index

    def _target(self, key: str | None, rows: tuple[int, int] | None = None) -> Target | None:
        if key is None or key not in self.shapes:
            return None
        return Target(key, self.shapes[key], rows)

    def target(self, module: str) -> Target | None:
        """Where ``module`` lands, or None when the checkpoint has no such layer."""
        for lora_prefix, ckpt_prefix, kind in self._encoders:
            if not module.startswith(lora_prefix):
                continue
            rest = module[len(lora_prefix):]
            if kind in ("clip", "t5"):
                return self._target(self._clip[lora_prefix].get(rest))
            m = _OPENCLIP_LAYER.fullmatch(rest)
            if m is None:
                return None
            block = f"{ckpt_prefix}transformer.resblocks.{m[1]}."
            if m[3]:  # q, k or v: a third of the fused in_proj rows
                key = block + "attn.in_proj_weight"
                if key not in self.shapes:
                    return None
                width = self.shapes[key][0] // 3
                start = "qkv".index(m[3]) * width
                return self._target(key, (start, start + width))
            return self._target(block + _OPENCLIP_PARTS[m[2]])
        if self.arch == "flux":
            path = fluxlayout.transformer_path(module)
            return self._target(self._unet.get(path)) if path else None
        path = naming.ldm_unet_path(module, sdxl=self.arch == "sdxl")
        return self._target(self._unet.get(path)) if path else None


def fit_problem(module_shape: tuple[int, ...], target: Target) -> str | None:
    """Why a module's ΔW cannot be added to its target (None when it can, possibly after padding)."""
    want = target.weight_shape
    if module_shape == want:
        return None
    flat = module_shape[2:] == (1, 1) or len(module_shape) == 2
    if flat and want[:2] == module_shape[:2] and (len(want) == 2 or want[2:] == (1, 1)):
        return None  # linear vs 1×1 conv: the same update
    if (target.key == UNET + "input_blocks.0.0.weight" and len(want) == 4 and module_shape[0] == want[0]
            and module_shape[2:] == want[2:] and module_shape[1] < want[1]):
        return None  # inpainting / instruct-pix2pix conv_in: extra input channels get 0, as in A1111
    return f"shape {list(module_shape)} does not fit the checkpoint's {list(want)} ({target.key})"
