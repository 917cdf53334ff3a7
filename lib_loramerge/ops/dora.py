"""Apply a DoRA module to a base weight exactly as A1111 1.10 does (for the bake).

A1111 1.10 (``extensions-builtin/Lora/network.py``): ``NetworkModule.finalize_updown`` scales the
module's update by ``calc_scale()`` (alpha / dim), then, when the module has a ``dora_scale``,
calls ``apply_weight_decompose(updown, orig_weight)``, and only then multiplies by the prompt's
multiplier::

    W' = W + ΔW                                   ΔW = scale · (the LoRA / LoHa / LoKr update)
    n[j] = ‖W'[:, j, …]‖₂                          one norm per input column: over every dim but dim 1
    updown = W' · (dora_scale / n) − W            dora_scale broadcast as stored: (1, in[, 1, 1])
    W_new = W + multiplier · updown

So the multiplier scales the *difference* the decomposition makes, not ΔW inside it: at
multiplier 0.5 the layer lands halfway between W and the fully applied DoRA weight, and at 0 it
is W. ``dora_scale`` is broadcast against the (1, in[, 1, 1]) norms as it is stored, as A1111 does:
the per-input-column form (1, in[, 1, 1]) that A1111 targets; a per-output-row LyCORIS form
(out, 1[, 1, 1]) broadcasts to an (out, in) grid there too, and this function reproduces that
(Forge and ComfyUI instead normalise per output row for such files).
"""

from __future__ import annotations

import math

import torch

from ..errors import LoraMergeError


def apply_dora(weight: torch.Tensor, module, multiplier: float = 1.0, inner_scale: float = 1.0) -> torch.Tensor:
    """The layer weight after applying the DoRA ``module`` at ``multiplier``, in float32 (A1111 1.10).

    ``weight`` is the base layer weight (any float dtype, the layer's shape); ``module`` a
    :class:`~lib_loramerge.lycoris.DoraModule` (lazy modules are read now). ``inner_scale``
    multiplies ΔW before the decomposition: that is where an LBW block weight goes in A1111 (LBW
    scales the module's up factor), so block weights act non-linearly on DoRA there.
    """
    module = module.load()
    if getattr(module, "algo", "") != "dora":
        raise LoraMergeError("not a DoRA module (no dora_scale)", module=getattr(module, "name", None))
    base = weight.to(torch.float32)
    inner = module.inner
    if base.numel() != math.prod(inner.weight_shape) or base.shape[0] != inner.out_features:  # A1111 reshapes
        raise LoraMergeError(f"base weight {list(base.shape)} does not fit the module's layer "
                             f"{list(inner.weight_shape)}", module.source, module.name)
    delta = inner_scale * inner.delta(torch.float32, base.device).reshape(base.shape)
    merged = base + delta
    columns = merged.shape[1]
    norm = merged.transpose(0, 1).reshape(columns, -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(columns, *[1] * (merged.ndim - 1)).transpose(0, 1)  # (1, in[, 1, 1])
    scaled = merged * (module.dora_scale.to(device=base.device, dtype=torch.float32) / norm)
    if scaled.shape != base.shape:
        raise LoraMergeError(f"dora_scale {list(module.dora_scale.shape)} does not broadcast to the layer "
                             f"{list(base.shape)}", module.source, module.name)
    return base + multiplier * (scaled - base)
