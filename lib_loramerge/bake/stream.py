"""Bake LoRAs into a checkpoint, tensor by tensor: W′ = W + Σᵢ ΔWᵢ in fp32, then cast (fp8 Flux files too).

The checkpoint is read and the output written one tensor at a time (a safetensors file is a
header plus raw bytes), so peak memory is about one tensor plus the LoRAs' current module, not
two checkpoints. Untouched tensors are copied (cast only when a dtype change was asked for);
tensors that are not floating point are always copied as they are.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..blocks.layouts import ALL_IDS
from ..blocks.mapping import block_of
from ..errors import LoraMergeError
from ..formats.hashing import BackgroundHashes
from ..formats.safetensors_io import TensorSpec, write_safetensors
from ..formats.tensorfile import TensorFile, open_tensor_file
from ..model import LoraModule, NetworkModule
from ..ops.dora import SEMANTICS, apply_dora
from ..ops.merge import MergeInput, check_device, common_arch
from ..ops.verify import COMPUTE_SLACK, UNIT_ROUNDOFF, Verification
from ..runtime import torch_threads
from .keymap import CheckpointLayout, Target, fit_problem

Progress = Callable[[int, int, str], None]


@dataclass
class BakeReport:
    checkpoint: str
    arch: str
    inputs: list[str]
    keys_patched: int = 0
    modules_baked: int = 0
    by_block: dict[str, int] = field(default_factory=dict)  # LBW block → modules baked ("-": in no block)
    unmatched: list[tuple[str, str, str]] = field(default_factory=list)  # (lora, module, why)
    skipped_zero: int = 0  # modules whose strength × block weight is 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    verification: Verification | None = None  # --verify: the patched tensors re-read and recomputed

    def as_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "arch": self.arch, "inputs": self.inputs,
                "keys_patched": self.keys_patched, "modules_baked": self.modules_baked, "by_block": self.by_block,
                "unmatched": [{"lora": lo, "module": m, "why": w} for lo, m, w in self.unmatched],
                "skipped_zero": self.skipped_zero, "notes": self.notes, "seconds": round(self.seconds, 3),
                **({"verification": self.verification.as_dict()} if self.verification else {})}


@dataclass
class _Patch:
    module: NetworkModule
    multiplier: float  # the prompt strength (TE or UNet)
    ratio: float  # the block weight
    target: Target

    @property
    def strength(self) -> float:
        return self.multiplier * self.ratio


def plan_patches(layout: CheckpointLayout, inputs: Sequence[MergeInput], report: BakeReport,
                 ) -> dict[str, list[_Patch]]:
    """Checkpoint key → the module updates to add, in input order; unmatched modules go to the report."""
    patches: dict[str, list[_Patch]] = {}
    for inp in inputs:
        for name, module in inp.lora.modules.items():
            strength = inp.strength(name)
            if strength == 0.0:
                report.skipped_zero += 1
                continue
            target = layout.target(name)
            why = "no such layer in the checkpoint" if target is None else fit_problem(module.weight_shape, target)
            if not why and target.key in layout.non_float:
                why = f"the checkpoint's {target.key} is not a floating-point tensor"
            if not why and module.algo == "dora" and math.prod(module.weight_shape) != math.prod(target.weight_shape):
                why = f"a DoRA module on a padded layer ({target.key}) is not supported"
            if why:
                report.unmatched.append((inp.lora.name, name, why))
                continue
            patches.setdefault(target.key, []).append(_Patch(module, inp.multiplier(name), inp.ratio(name), target))
            block = block_of(name, layout.arch) or "-"
            report.by_block[block] = report.by_block.get(block, 0) + 1
            report.modules_baked += 1
    report.keys_patched = len(patches)
    order = {b: i for i, b in enumerate([*ALL_IDS, "-"])}
    report.by_block = dict(sorted(report.by_block.items(), key=lambda kv: order[kv[0]]))
    return patches


def _fit(delta: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW in the target's shape: linear ↔ 1×1 conv reshaped; extra conv_in input channels padded with 0."""
    if delta.numel() == torch.Size(shape).numel():
        return delta.reshape(shape)
    padded = delta.new_zeros(shape)
    padded[:, : delta.shape[1]] = delta
    return padded


class Scratch:
    """Reusable float32 buffers for one thread's patched tensors.

    A fresh out × in buffer for every weight and every ΔW costs more in page faults (the kernel
    zeroing new memory) than the arithmetic done in it; reusing two grown-as-needed buffers keeps
    the bake at memory speed. The results are the same bits as with fresh tensors.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.device != device:
            buf = self._buffers[name] = torch.empty(numel, dtype=torch.float32, device=device)
        return buf[:numel].view(shape)


# ΔW buffers beyond this are made a block of rows at a time (Flux's linear1 is 250 MiB in fp32). Each
# entry is the same rank-long dot product either way; blocks of whole multiples of 256 rows keep the
# matmul kernels' row tiling, so the bytes are those of one product (checked by the tests)
DELTA_BUFFER_BYTES = 64 << 20
_ROW_BLOCK = 256


def _add_lora(region: torch.Tensor, module: LoraModule, strength: float, scratch: Scratch) -> None:
    """region += strength · scale · (U @ D), computed as ``module.delta`` computes it, in a reused buffer."""
    up, down = module.factor_matrices(torch.float32, region.device)
    rows, cols = up.shape[0], down.shape[1]
    step = max(_ROW_BLOCK, DELTA_BUFFER_BYTES // (4 * cols) // _ROW_BLOCK * _ROW_BLOCK)
    target = region.view(rows, cols)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        product = scratch.take("delta", (stop - start, cols), region.device)
        torch.mm(up[start:stop], down, out=product)
        product.mul_(module.scale)
        target[start:stop].add_(product, alpha=strength)


def patched_tensor(tf: TensorFile, key: str, patches: list[_Patch], device: torch.device,
                   scratch: Scratch | None = None, semantics: str = "a1111") -> torch.Tensor:
    """The checkpoint tensor ``key`` with every patch applied (see :func:`patched_weight`)."""
    return patched_weight(tf.get(key), patches, device, scratch, semantics)


def patched_weight(source: torch.Tensor, patches: list[_Patch], device: torch.device,
                   scratch: Scratch | None = None, semantics: str = "a1111") -> torch.Tensor:
    """W with every patch applied in input order, accumulated in fp32 on ``device``.

    A LoRA/LoHa/LoKr patch adds strength·ΔW. A DoRA patch re-normalises the weight as it stands
    after the earlier patches (both WebUIs apply networks one after another, in prompt order), by
    the rule of the WebUI that will use the result (``semantics``, see :mod:`..ops.dora`). With a
    ``scratch``, the result is a view of its buffer, valid until the next call with it.
    """
    if scratch is None:
        weight = source.to(device=device, dtype=torch.float32, copy=True)
    else:
        weight = scratch.take("weight", tuple(source.shape), device)
        weight.copy_(source)
    for p in patches:
        region = weight if p.target.rows is None else weight[p.target.rows[0]:p.target.rows[1]]
        if p.module.algo == "dora":
            new = apply_dora(region.reshape(p.module.weight_shape), p.module, p.multiplier, inner_scale=p.ratio,
                             semantics=semantics)
            region.copy_(new.reshape(region.shape))
        elif scratch is not None and isinstance(p.module, LoraModule) and \
                region.numel() == math.prod(p.module.weight_shape):
            _add_lora(region, p.module, p.strength, scratch)
        else:
            region.add_(_fit(p.module.delta(torch.float32, device), tuple(region.shape)), alpha=p.strength)
    return weight


def bake(checkpoint: str | os.PathLike, inputs: Sequence[MergeInput], out: str | os.PathLike, *,
         dtype: torch.dtype | None = torch.float16, device: str = "cpu", overwrite: bool = False,
         allow_unmatched: bool = False, progress: Progress | None = None,
         metadata: dict[str, str] | None = None, finalize: Callable[[str], dict[str, str]] | None = None,
         semantics: str = "a1111", verify: bool = False, checkpoint_hash: BackgroundHashes | None = None
         ) -> tuple[BakeReport, dict[str, str]]:
    """Write ``checkpoint`` + the inputs' ΔW to ``out``; returns the report and the metadata written.

    ``dtype``: floating-point tensors are written in it (None: each keeps its own). ``metadata``
    is added to the checkpoint's own; ``finalize(checkpoint_sha256)`` may return late metadata
    values (same length as their placeholders), e.g. a recipe holding the checkpoint's hash.
    ``semantics``: whose DoRA rule to follow, ``"a1111"`` or ``"forge"`` (the WebUI that will run it).
    ``verify``: before the file takes its name, re-read every patched tensor and compare it with
    W + ΣΔW recomputed on the reference path (see :func:`check_patched`); a failure is an error.
    ``checkpoint_hash``: the checkpoint's hashing, if already started (the CLI starts it early).
    """
    if semantics not in SEMANTICS:
        raise LoraMergeError(f"unknown semantics '{semantics}' (choose {' or '.join(SEMANTICS)})")
    started = time.perf_counter()
    dev = check_device(device)
    if not inputs:
        raise LoraMergeError("nothing to bake: no LoRAs given")
    if os.fspath(checkpoint).lower().endswith(".gguf"):
        raise LoraMergeError("a GGUF checkpoint is quantised: its weights cannot take W + ΔW exactly; bake into "
                             "the bf16, fp16 or fp8 (float8_e4m3fn) .safetensors file instead", checkpoint)
    with open_tensor_file(checkpoint) as tf:
        try:
            layout = CheckpointLayout({k: i.shape for k, i in tf.infos.items()},
                                      non_float={k for k, i in tf.infos.items() if not i.dtype.is_floating_point})
        except LoraMergeError as e:
            raise e.with_path(tf.path) from None
        lora_arch = common_arch(inputs)
        if lora_arch != "unknown" and lora_arch != layout.arch:
            raise LoraMergeError(f"the LoRAs are {lora_arch.upper()} but the checkpoint is {layout.arch.upper()}",
                                 tf.path)
        report = BakeReport(checkpoint=tf.path.name, arch=layout.arch, inputs=[i.lora.name for i in inputs])
        patches = plan_patches(layout, inputs, report)
        if report.unmatched and not allow_unmatched:
            lora, module, why = report.unmatched[0]
            raise LoraMergeError(f"{len(report.unmatched)} LoRA modules have no matching layer in the checkpoint "
                                 f"(first: {lora}: {module}: {why}); use --allow-unmatched to bake the rest")
        if not patches:
            raise LoraMergeError("no LoRA module matches a layer of this checkpoint; nothing to bake", tf.path)
        hasher = BackgroundHashes.reuse(checkpoint_hash, [tf.path], whole=True)
        specs = _specs(tf, patches, dtype, dev, semantics)
        meta = {**tf.metadata, **(metadata or {})}
        late = (lambda: finalize(hasher.result())) if finalize else None

        def check(written: os.PathLike) -> None:
            report.verification = check_patched(written, tf, patches, dtype, dev, semantics)
            if not report.verification.ok:
                raise LoraMergeError(f"{report.verification.summary()}; nothing was written", out)

        # three things overlap: this thread writes, a prefetch thread computes W + ΔW, the hasher
        # hashes; torch keeps to one thread so none of them waits on a busy core
        try:
            with torch_threads(1 if dev.type == "cpu" else torch.get_num_threads()):
                written = write_safetensors(out, specs, meta, overwrite=overwrite, finalize=late,
                                            prefetch=_prefetch(tf, patches),
                                            progress=progress, before_publish=check if verify else None)
        finally:
            hasher.join()
    report.seconds = time.perf_counter() - started
    return report, written


def _prefetch(tf: TensorFile, patches: dict[str, list[_Patch]]) -> int:
    """Patched tensors made ahead of the writer: two, or one when they are as large as Flux's
    (``linear1``: 130 MiB in bf16), where each one ahead costs more memory than it saves time."""
    largest = max((math.prod(tf.infos[k].shape) * torch.empty((), dtype=tf.infos[k].dtype).element_size()
                   for k in patches), default=0)
    return 2 if largest <= 64 << 20 else 1


# fp8 checkpoints (Flux): 3 and 2 mantissa bits; absent on a torch without float8 types
_FP8_ROUNDOFF = {getattr(torch, name): u for name, u in (("float8_e4m3fn", 2.0**-4), ("float8_e5m2", 2.0**-3))
                 if hasattr(torch, name)}
# float32 arithmetic: a different summation order moves W + ΔW by a few ulps of W
_FP32_SLACK = 4 * 2.0**-24


def check_patched(written: str | os.PathLike, tf: TensorFile, patches: dict[str, list[_Patch]],
                  dtype: torch.dtype | None, device: torch.device, semantics: str) -> Verification:
    """Every patched tensor of the ``written`` file against W + ΣΔW, recomputed from the source on the
    reference path (each module's own ``delta``, fresh buffers), relative to ‖ΣΔW‖.

    The bound is the rounding of the result to the output dtype (u·‖W′‖_F, plus subnormals) and
    float32 slack: a tensor whose bytes changed, or that lost its patch, is far outside it.
    """
    result = Verification(what="patched tensors")
    with open_tensor_file(written, "safetensors") as out:
        result.missing = sorted(set(tf.infos) - set(out.infos))
        result.unexpected = sorted(set(out.infos) - set(tf.infos))
        for key, info in tf.infos.items():
            if key in out.infos and out.infos[key].shape != info.shape:
                result.missing.append(f"{key} (shape {tuple(out.infos[key].shape)}, not {tuple(info.shape)})")
        for key, key_patches in patches.items():
            if key not in out.infos:
                continue
            source = tf.get(key)
            target = patched_weight(source, key_patches, device, semantics=semantics)
            delta = float((target - source.to(device=device, dtype=torch.float32)).norm())
            got = out.get(key).to(device=device, dtype=torch.float32)
            gap = float((got - target).norm())
            out_dtype = out.infos[key].dtype
            u = UNIT_ROUNDOFF.get(out_dtype) or _FP8_ROUNDOFF.get(out_dtype, 2.0**-11)
            allowed = (u + _FP32_SLACK) * float(target.norm()) + 2.0**-24 * math.sqrt(target.numel())
            if delta > 0:
                result.errors[key] = gap / delta
                result.bounds[key] = allowed / delta + COMPUTE_SLACK
            else:
                result.errors[key] = 0.0 if gap <= allowed else math.inf
                result.bounds[key] = 0.0
    return result


def _specs(tf: TensorFile, patches: dict[str, list[_Patch]], dtype: torch.dtype | None,
           device: torch.device, semantics: str) -> list[TensorSpec]:
    """What to write for every checkpoint tensor: patched (computed, checked), cast, or copied as bytes.

    Producers run one after another on the writer's prefetch thread, so they share one scratch.
    """
    scratch = Scratch()
    specs = []
    for key, info in tf.infos.items():
        out_dtype = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        if key in patches:
            specs.append(TensorSpec(key, out_dtype, info.shape,
                                    _patcher(tf, key, patches[key], device, scratch, semantics), check="result"))
        elif out_dtype == info.dtype and (raw := tf.byte_range(key)) is not None:
            specs.append(TensorSpec(key, out_dtype, info.shape, raw))  # copied by the kernel, never read here
        else:
            specs.append(TensorSpec(key, out_dtype, info.shape, _reader(tf, key), check="cast"))
    return specs


def _patcher(tf: TensorFile, key: str, patches: list[_Patch], device: torch.device,
             scratch: Scratch, semantics: str) -> Callable[[], torch.Tensor]:
    return lambda: patched_tensor(tf, key, patches, device, scratch, semantics)


def _reader(tf: TensorFile, key: str) -> Callable[[], torch.Tensor]:
    return lambda: tf.get(key)
