"""Bake LoRAs into the model a WebUI has loaded: patch its weights in place, revert them bit-exactly.

The planning is the file bake's (:func:`plan_patches` over a :class:`CheckpointLayout` of the
loaded model's own keys) and so is the arithmetic (:func:`patched_weight`: W ← cast(W.float() +
Σ sᵢ·ΔWᵢ), DoRA by the host's rule), on the device and in the dtype where each weight lives. What
differs between hosts — where a layer's *base* weight is (the weight prompt LoRAs stack on), how to
write it so that the WebUI's own LoRA handling keeps working — is behind :class:`LiveModel`,
implemented by the host adapter (``lib_loramerge.webui``) and by the tests' stand-ins.

Every patched weight is snapshotted first (a CPU copy in its own dtype): an apply that fails or
is interrupted restores the snapshots of what it already changed, and a revert restores all of
them, so the model ends exactly as it was. The snapshots belong to one model object: a live bake
is dropped (never re-applied) when the WebUI loads or reloads a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import LoraMergeError
from ..formats.hashing import BackgroundHashes
from ..ops.merge import MergeInput, common_arch
from .keymap import CheckpointLayout
from .stream import BakeReport, patched_weight, plan_patches

Progress = Callable[[int, int, str], None]


class LiveWeight(Protocol):
    """One weight of the loaded model, as the host exposes it."""

    def base(self) -> torch.Tensor:
        """The weight prompt LoRAs stack on (without their deltas), on its device, in its dtype."""
        ...

    def snapshot(self) -> object:
        """Everything :meth:`restore` needs to put this weight back bit-exactly (CPU copies)."""
        ...

    def restore(self, snapshot: object) -> None: ...

    def write(self, value: torch.Tensor) -> None:
        """Make ``value`` (float32, any device) the new base weight, cast to the weight's own dtype."""
        ...

    def snapshot_bytes(self, snapshot: object) -> int: ...


class LiveModel(Protocol):
    """The loaded model of a WebUI: its weights by LDM checkpoint key, and what to do after writing them."""

    name: str  # the checkpoint it was loaded from (for reports)
    arch: str  # sd1 / sd2 / sdxl
    semantics: str  # whose DoRA rule: "a1111" or "forge"

    def identity(self) -> object:
        """Equal for the same loaded model object with the same checkpoint; anything else for another."""
        ...

    def weights(self) -> dict[str, LiveWeight]: ...

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def non_float(self) -> set[str]: ...

    def commit(self, keys: list[str], text_encoder: bool) -> None:
        """After weights were written (or restored): make the WebUI use them (reset its caches)."""
        ...


@dataclass
class LiveBake:
    """A bake applied to a loaded model, with what it takes to undo it and to save it as a file."""

    identity: object
    inputs: list[MergeInput]
    label: str  # "name:te:unet[:lbw=…], …" as the infotext shows it
    recipe_hash: str
    report: BakeReport
    snapshots: dict[str, object] = field(default_factory=dict)
    snapshot_bytes: int = 0
    text_encoder: bool = False


def bake_label(inputs: Sequence[MergeInput]) -> str:
    """How a live bake is written in an image's generation parameters: one ``name:te:unet[:lbw=…]`` per LoRA."""
    parts = []
    for inp in inputs:
        text = f"{inp.lora.name}:{inp.te_strength:g}:{inp.unet:g}"
        if inp.recipe.get("lbw"):
            text += ":lbw=" + ",".join(f"{v:g}" for v in inp.recipe["lbw_values"])
        parts.append(text)
    return ", ".join(parts)


def recipe_hash(inputs: Sequence[MergeInput], file_hashes: Sequence[str], semantics: str) -> str:
    """A short, stable identifier of what was baked: the files' data hashes, strengths, block weights, rule."""
    facts = [{"hash": digest, "unet": i.unet, "te": i.te_strength,
              **{k: v for k, v in i.recipe.items() if k != "lbw_layout"}} for i, digest in zip(inputs, file_hashes,
                                                                                           strict=True)]
    return hashlib.sha256(json.dumps([facts, semantics], sort_keys=True).encode()).hexdigest()[:12]


def apply(model: LiveModel, inputs: Sequence[MergeInput], *, allow_unmatched: bool = False,
          progress: Progress | None = None) -> LiveBake:
    """Patch ``model``'s weights with the inputs; on any failure (or interrupt) undo what was done, then raise."""
    started = time.perf_counter()
    if not inputs:
        raise LoraMergeError("nothing to bake: no LoRAs given")
    layout = CheckpointLayout(model.shapes(), non_float=model.non_float(), arch=model.arch)
    lora_arch = common_arch(inputs)
    if lora_arch != "unknown" and lora_arch != layout.arch:
        raise LoraMergeError(f"the LoRAs are {lora_arch.upper()} but the loaded model is {layout.arch.upper()}")
    report = BakeReport(checkpoint=model.name, arch=layout.arch, inputs=[i.lora.name for i in inputs])
    patches = plan_patches(layout, inputs, report)
    if report.unmatched and not allow_unmatched:
        lora, module, why = report.unmatched[0]
        raise LoraMergeError(f"{len(report.unmatched)} LoRA modules have no matching layer in the loaded model "
                             f"(first: {lora}: {module}: {why})")
    if not patches:
        raise LoraMergeError("no LoRA module matches a layer of the loaded model; nothing to bake")
    hashes = BackgroundHashes([i.lora.path for i in inputs])
    weights = model.weights()
    text_encoder = any(not key.startswith("model.diffusion_model.") for key in patches)
    bake = LiveBake(identity=model.identity(), inputs=list(inputs), label=bake_label(inputs), recipe_hash="",
                    report=report, text_encoder=text_encoder)
    try:
        with torch.no_grad():
            for done, (key, key_patches) in enumerate(patches.items(), 1):
                weight = weights[key]
                snapshot = weight.snapshot()
                bake.snapshots[key] = snapshot
                bake.snapshot_bytes += weight.snapshot_bytes(snapshot)
                base = weight.base()
                weight.write(patched_weight(base, key_patches, base.device, semantics=model.semantics))
                if progress:
                    progress(done, len(patches), key)
    except BaseException:
        with torch.no_grad():
            _restore(model, weights, bake.snapshots)
        model.commit(list(bake.snapshots), text_encoder)
        raise
    model.commit(list(patches), text_encoder)
    bake.recipe_hash = recipe_hash(inputs, [hashes.result(i) for i in range(len(inputs))], model.semantics)
    report.seconds = time.perf_counter() - started
    return bake


def revert(model: LiveModel, bake: LiveBake) -> None:
    """Put every weight the bake changed back as it was (bit-exact), and let the WebUI use them."""
    if model.identity() != bake.identity:
        raise LoraMergeError("the live bake belongs to a model that is no longer loaded; nothing to revert")
    weights = model.weights()
    with torch.no_grad():
        _restore(model, weights, bake.snapshots)
    model.commit(list(bake.snapshots), bake.text_encoder)


def _restore(model: LiveModel, weights: dict[str, LiveWeight], snapshots: dict[str, object]) -> None:
    for key, snapshot in snapshots.items():
        weights[key].restore(snapshot)
