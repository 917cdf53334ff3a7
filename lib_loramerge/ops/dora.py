"""Apply a DoRA module to a base weight exactly as the WebUI that will use it does (for the bakes).

Two hosts, two rules (``semantics``):

``"a1111"`` — A1111 1.10 (``extensions-builtin/Lora/network.py``): ``NetworkModule.finalize_updown``
scales the module's update by ``calc_scale()`` (alpha / dim), then, when the module has a
``dora_scale``, calls ``apply_weight_decompose(updown, orig_weight)``, and only then multiplies by
the prompt's multiplier::

    W' = W + r·ΔW                                 ΔW = scale · (the LoRA / LoHa / LoKr update)
    n[j] = ‖W'[:, j, …]‖₂                          one norm per input column: over every dim but dim 1
    updown = W' · (dora_scale / n) − W            dora_scale broadcast as stored: (1, in[, 1, 1])
    W_new = W + multiplier · updown

  where r is LBW's block weight, which LBW puts into the up factor, i.e. inside the decomposition.
  A per-output-row ``dora_scale`` (out, 1[, 1, 1]) broadcasts to an (out, in) grid there too.

``"forge"`` — Forge (``backend/patcher/lora.py``, ``weight_decompose``, from ComfyUI)::

    W' = W + ΔW
    n = ‖W[i, …]‖₂ per output row of the *pre-update* W   when dora_scale has one value per output row
      = ‖W'[:, j, …]‖₂ per input column of W'            otherwise
    n += ε (float32's, the offline merge's computation dtype)
    W' ← W' · dora_scale / n
    W_new = W + s · (W' − W)   (W_new = W' when s = 1)

  with s = prompt strength × block weight (Forge's LBW multiplies the patch strength).
"""

from __future__ import annotations

import math

import torch

from ..errors import LoraMergeError

SEMANTICS = ("a1111", "forge")


def apply_dora(weight: torch.Tensor, module, multiplier: float = 1.0, inner_scale: float = 1.0,
               semantics: str = "a1111") -> torch.Tensor:
    """The layer weight after applying the DoRA ``module``, in float32, as ``semantics`` (a1111/forge) does.

    ``weight`` is the base layer weight (any float dtype, the layer's shape); ``module`` a
    :class:`~lib_loramerge.lycoris.DoraModule` (lazy modules are read now). ``multiplier`` is the
    prompt strength, ``inner_scale`` the block weight (inside the decomposition for A1111, a factor
    of the strength for Forge).
    """
    if semantics not in SEMANTICS:
        raise LoraMergeError(f"unknown semantics '{semantics}' (choose {' or '.join(SEMANTICS)})")
    module = module.load()
    if getattr(module, "algo", "") != "dora":
        raise LoraMergeError("not a DoRA module (no dora_scale)", module=getattr(module, "name", None))
    base = weight.to(torch.float32)
    inner = module.inner
    if base.numel() != math.prod(inner.weight_shape) or base.shape[0] != inner.out_features:  # the hosts reshape
        raise LoraMergeError(f"base weight {list(base.shape)} does not fit the module's layer "
                             f"{list(inner.weight_shape)}", module.source, module.name)
    delta = inner.delta(torch.float32, base.device).reshape(base.shape)
    scale = module.dora_scale.to(device=base.device, dtype=torch.float32)
    if semantics == "forge":
        return _forge(base, delta, scale, multiplier * inner_scale, module)
    merged = base + inner_scale * delta
    norm = _column_norms(merged)
    scaled = merged * (scale / norm)
    if scaled.shape != base.shape:
        raise LoraMergeError(f"dora_scale {list(module.dora_scale.shape)} does not broadcast to the layer "
                             f"{list(base.shape)}", module.source, module.name)
    return base + multiplier * (scaled - base)


def _column_norms(w: torch.Tensor) -> torch.Tensor:
    """‖w[:, j, …]‖ for every input column j, shaped (1, in[, 1, 1]) to broadcast against w."""
    columns = w.shape[1]
    norm = w.transpose(0, 1).reshape(columns, -1).norm(dim=1, keepdim=True)
    return norm.reshape(columns, *[1] * (w.ndim - 1)).transpose(0, 1)


def _forge(base: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, strength: float, module) -> torch.Tensor:
    merged = base + delta
    if scale.shape[0] == merged.shape[0]:  # one magnitude per output row: norms of the pre-update rows
        norm = base.reshape(base.shape[0], -1).norm(dim=1, keepdim=True).reshape(base.shape[0], *[1] * (base.ndim - 1))
    else:
        norm = _column_norms(merged)
    norm = norm + torch.finfo(torch.float32).eps
    factor = scale / norm
    if torch.broadcast_shapes(factor.shape, merged.shape) != merged.shape:
        raise LoraMergeError(f"dora_scale {list(module.dora_scale.shape)} does not broadcast to the layer "
                             f"{list(base.shape)}", module.source, module.name)
    merged *= factor
    if strength == 1.0:
        return merged
    merged -= base
    return base + strength * merged
