"""Where each LoRA module lands in an LDM-format checkpoint, built from the checkpoint's own keys.

kohya names lost the dots of the module paths, so we index the checkpoint the other way round:
every ``….weight`` key, minus its component prefix, with dots turned into underscores. UNet
modules in either naming (diffusers or LDM paths) are converted to LDM paths first. The
OpenCLIP text encoders (SD2, SDXL's second) fuse q/k/v into one ``attn.in_proj_weight``: those
modules land on a third of its rows, as A1111 applies them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import naming
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
}


def checkpoint_arch(keys: list[str]) -> str:
    """sd1 / sd2 / sdxl from the checkpoint's keys (A1111's own tests), or a LoraMergeError."""
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
        self._unet = self._index(UNET)
        self._clip: dict[str, dict[str, str]] = {}
        self._encoders = [e for e in _ENCODERS[self.arch] if any(k.startswith(e[1]) for k in shapes)]
        for lora_prefix, ckpt_prefix, kind in self._encoders:
            if kind == "clip":
                self._clip[lora_prefix] = self._index(ckpt_prefix, text_model=True)

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
            if kind == "clip":
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
