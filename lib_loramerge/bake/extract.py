"""Extract a LoRA from two checkpoints: per layer ΔW = tuned − base, its leading singular triplets, a LoRA.

The inverse of a bake. Both checkpoints are read one tensor at a time through the checkpoint key
map, in the order of the tuned file's data (a thread reads the next pair while this one is
decomposed), so memory holds a layer or two, never a model. ΔW of a layer is dense by nature
— the difference of two dense weights — so it is formed, in float32 on the chosen device, one
layer at a time; its SVD is not: :func:`~lib_loramerge.ops.sketch.sketched_svd` finds the
leading triplets by randomized subspace iteration sized to the rank, and reports per module the
fraction of ‖ΔW‖² kept and the estimated excess over the optimal rank-k error.

Which layers: those a kohya trainer targets (``sdlayouts.lora_modules``): the attention scope
(every linear and 1×1 layer of the transformer blocks, and the text encoders' attention and MLP
layers), plus with a conv rank the ResNet blocks and down/upsamplers (LoCon: 3×3 convs at the
conv rank, their linear and 1×1 layers at the rank), as kohya's ``extract_lora_from_models.py``.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import fluxlayout, sdlayouts
from ..errors import LoraMergeError
from ..formats.readahead import read_ahead
from ..formats.safetensors_io import all_finite
from ..formats.tensorfile import SAFETENSORS_SUFFIXES, TensorFile, open_tensor_file
from ..model import CONV, LoraModule, is_text_encoder, kind_of
from ..ops.lowrank import split_factors
from ..ops.merge import MAX_WORKERS, check_device, parallel_map, shaped_module
from ..ops.policies import RANK, SV_RATIO, THRESHOLD, RankPolicy
from ..ops.sketch import SketchedSVD, sketched_svd
from ..runtime import full_precision_matmul
from .keymap import CheckpointLayout, Target
from .stream import Scratch

Progress = Callable[[int, int, str], None]
DEFAULT_RANK = 32
READ_AHEAD_BYTES = 128 << 20  # tensors read ahead of the decomposition (beside the pairs in use)
NOISE = 1e-6


@dataclass
class ExtractOptions:
    rank: int = DEFAULT_RANK  # linear and 1×1 layers; the cap of a dynamic policy
    conv_rank: int | None = None  # 3×3 convs (LoCon); None: no ResNet layers at all, as kohya without conv_dim
    threshold: float | None = None  # per module, the smallest rank keeping this fraction of ‖ΔW‖² (≤ the rank)
    sv_ratio: float | None = None  # per module, keep σ ≥ σ_max / R (≤ the rank)
    min_diff: float = 0.0  # skip a module whose largest |ΔW| entry is at most this
    text_encoder: bool = True
    device: str = "cpu"
    dtype: torch.dtype = torch.float16

    def validate(self) -> None:
        for what, value in (("rank", self.rank), ("conv rank", self.conv_rank)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise LoraMergeError(f"{what} must be a whole number of at least 1, got {value!r}")
        if self.threshold is not None and self.sv_ratio is not None:
            raise LoraMergeError("give --threshold or --sv-ratio, not both")
        for policy in self.policies().values():
            policy.validate()
        if not (isinstance(self.min_diff, (int, float)) and math.isfinite(self.min_diff) and self.min_diff >= 0):
            raise LoraMergeError(f"--min-diff must be a finite number ≥ 0, got {self.min_diff!r}")
        check_device(self.device)

    def policies(self) -> dict[str, RankPolicy]:
        """The rank policy of linear/1×1 layers ("linear") and of 3×3 convs ("conv", with a conv rank)."""
        caps = {"linear": self.rank, **({"conv": self.conv_rank} if self.conv_rank is not None else {})}
        if self.threshold is not None:
            return {kind: RankPolicy(THRESHOLD, self.threshold, cap) for kind, cap in caps.items()}
        if self.sv_ratio is not None:
            return {kind: RankPolicy(SV_RATIO, self.sv_ratio, cap) for kind, cap in caps.items()}
        return {kind: RankPolicy(RANK, cap) for kind, cap in caps.items()}

    @property
    def scope(self) -> str:
        return sdlayouts.SCOPE_LOCON if self.conv_rank is not None else sdlayouts.SCOPE_ATTENTION


@dataclass
class ModuleQuality:
    """How well one extracted module reproduces its layer's ΔW."""

    rank: int
    retained: float  # ‖ΔW_k‖² / ‖ΔW‖²
    excess: float | None  # estimated ‖ΔW − ΔW_k‖ / optimal rank-k error − 1 (None: below fp32 resolution)
    energy: float  # ‖ΔW‖_F²
    steps: int  # products by ΔW or ΔWᵀ after the first (0: the layer was small enough for an exact SVD)

    def as_dict(self) -> dict:
        return {"rank": self.rank, "retained": self.retained, "excess": self.excess, "energy": self.energy,
                "steps": self.steps}


@dataclass
class ExtractReport:
    base: str
    tuned: str
    arch: str
    modules_out: int = 0
    quality: dict[str, ModuleQuality] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module, why)
    ranks_by_kind: dict[str, dict[int, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def energy(self) -> dict[str, float]:
        """Retained fraction of ‖ΔW‖² per module (as ``MergeReport.energy``, for the per-block report)."""
        return {n: q.retained for n, q in self.quality.items()}

    @property
    def target_energy(self) -> dict[str, float]:
        return {n: q.energy for n, q in self.quality.items()}

    def summary(self, worst: int = 5) -> dict | None:
        if not self.quality:
            return None
        items = list(self.quality.items())
        retained = sorted(items, key=lambda kv: kv[1].retained)
        resolved = [(n, q.excess) for n, q in items if q.excess is not None]
        excess = sorted(resolved, key=lambda kv: -kv[1])
        return {
            "retained_min": retained[0][1].retained,
            "retained_mean": sum(q.retained for _, q in items) / len(items),
            "excess_max": excess[0][1] if excess else None,
            "excess_resolved": len(resolved),
            "excess_over_1_percent": sum(e > 0.01 for _, e in resolved),
            "worst_retained": [{"module": n, "retained": q.retained, "rank": q.rank} for n, q in retained[:worst]],
            "worst_excess": [{"module": n, "excess": e} for n, e in excess[:worst]],
        }

    def as_dict(self) -> dict:
        return {"base": self.base, "tuned": self.tuned, "arch": self.arch, "modules_out": self.modules_out,
                "skipped": [{"module": n, "why": w} for n, w in self.skipped],
                "ranks_by_kind": {k: {str(r): n for r, n in sorted(v.items())} for k, v in self.ranks_by_kind.items()},
                "summary": self.summary(), "modules": {n: q.as_dict() for n, q in self.quality.items()},
                "notes": self.notes, "seconds": round(self.seconds, 3),
                "timings": {k: round(v, 3) for k, v in self.timings.items()}}


@dataclass
class ExtractResult:
    modules: list[LoraModule]
    arch: str
    report: ExtractReport


@dataclass
class _Layer:
    """A checkpoint tensor and the modules it holds (one, or a fused OpenCLIP in_proj's three)."""

    key: str
    modules: list[tuple[str, Target]]


def module_names(arch: str, options: ExtractOptions) -> list[str]:
    """The modules an extraction writes, in kohya's order (Flux: the double and single blocks, as kohya trains)."""
    if arch == fluxlayout.FLUX:
        encoders = ("clip", "t5") if options.text_encoder else ()
        return list(fluxlayout.lora_modules(text_encoders=encoders, only_blocks=True))
    return list(sdlayouts.lora_modules(arch, options.scope, options.text_encoder))


def _layout(tf: TensorFile) -> CheckpointLayout:
    try:
        return CheckpointLayout({k: i.shape for k, i in tf.infos.items()},
                                non_float={k for k, i in tf.infos.items() if not i.dtype.is_floating_point})
    except LoraMergeError as e:
        raise e.with_path(tf.path) from None


def plan_layers(base: TensorFile, tuned: TensorFile, options: ExtractOptions) -> tuple[str, list[_Layer]]:
    """(architecture, the layers to read in order), refusing mismatched checkpoints before any tensor is read."""
    base_layout, tuned_layout = _layout(base), _layout(tuned)
    if base_layout.arch != tuned_layout.arch:
        raise LoraMergeError(f"is an {tuned_layout.arch.upper()} checkpoint but the base {base.path.name} is an "
                             f"{base_layout.arch.upper()} one; extract needs two checkpoints of the same model", tuned.path)
    arch = base_layout.arch
    layers: dict[str, _Layer] = {}
    for name in module_names(arch, options):
        if arch == fluxlayout.FLUX and is_text_encoder(name) and base_layout.target(name) is None:
            continue  # a BFL single file holds the transformer only
        found = {}
        for tf, layout in ((base, base_layout), (tuned, tuned_layout)):
            target = layout.target(name)
            if target is None:
                raise LoraMergeError("no layer for this module (not a complete checkpoint?)", tf.path, name)
            if target.key in layout.non_float:
                raise LoraMergeError(f"{target.key} is not a floating-point tensor", tf.path, name)
            found[tf.path] = target
        b, t = found[base.path], found[tuned.path]
        if b.key != t.key or b.rows != t.rows or b.tensor_shape != t.tensor_shape:
            raise LoraMergeError(f"{t.key} has shape {list(t.tensor_shape)} here but {list(b.tensor_shape)} in the "
                                 f"base {base.path.name}: not the same model", tuned.path, name)
        layers.setdefault(t.key, _Layer(t.key, [])).modules.append((name, t))
    if tuned.header is not None:  # read in file order: sequential on disk
        entries = tuned.header.entries
        return arch, sorted(layers.values(), key=lambda layer: entries[layer.key].begin)
    return arch, list(layers.values())


def check_pair(base_path: str | os.PathLike, tuned_path: str | os.PathLike, options: ExtractOptions) -> str | None:
    """The pair's architecture when both are safetensors files (headers only), refusing a mismatched pair;
    None for a ``.ckpt`` (it would be loaded whole just to check it: the extraction checks it instead)."""
    if not all(Path(p).suffix.lower() in SAFETENSORS_SUFFIXES for p in (base_path, tuned_path)):
        return None
    with open_tensor_file(base_path) as base, open_tensor_file(tuned_path) as tuned:
        return plan_layers(base, tuned, options)[0]


def _read_pairs(base: TensorFile, tuned: TensorFile, layers: list[_Layer]
                ) -> Iterator[tuple[_Layer, torch.Tensor, torch.Tensor]]:
    """(layer, base tensor, tuned tensor) in order, read by a thread up to :data:`READ_AHEAD_BYTES` ahead."""
    def size(layer: _Layer) -> int:
        info = tuned.infos[layer.key]
        return 2 * math.prod(info.shape) * torch.empty((), dtype=info.dtype).element_size()  # (torch 2.1 safe)

    return read_ahead(layers, lambda layer: (layer, base.get(layer.key), tuned.get(layer.key)), size, ahead=1,
                      budget=READ_AHEAD_BYTES, name="lora-extract-read")


def _difference(base_t: torch.Tensor, tuned_t: torch.Tensor, scratch: Scratch, device: torch.device) -> torch.Tensor:
    """tuned − base in float32 on ``device``, in the scratch buffer (valid until the next layer)."""
    delta = scratch.take("delta", tuple(tuned_t.shape), device)
    delta.copy_(tuned_t)
    delta.sub_(base_t.to(device))
    return delta


def _size_of_difference(delta: torch.Tensor, name: str, layer: _Layer, target: Target,
                        inputs: tuple[tuple[os.PathLike, torch.Tensor], ...], min_diff: float) -> tuple[float, float]:
    """(‖ΔW‖_F², max |ΔW|) of one module — the largest entry only when ``min_diff`` asks for it (0 otherwise:
    ΔW = 0 is then told by its norm). NaN/Inf is refused, naming the checkpoint that holds it."""
    energy = float(torch.linalg.vector_norm(delta)) ** 2
    largest = 0.0
    if min_diff > 0 and math.isfinite(energy):
        low, high = torch.aminmax(delta)
        largest = max(-float(low), float(high))
    if not (math.isfinite(energy) and math.isfinite(largest)):
        for path, t in inputs:
            part = t if target.rows is None else t[target.rows[0]:target.rows[1]]
            if not all_finite(part):
                raise LoraMergeError(f"{layer.key} holds NaN or Inf values", path, name)
        raise LoraMergeError(f"tuned − base overflows float32 in {layer.key}", inputs[1][0], name)
    return energy, largest


def extract_lora(base_path: str | os.PathLike, tuned_path: str | os.PathLike, options: ExtractOptions,
                 progress: Progress | None = None) -> ExtractResult:
    """The LoRA (kohya names, alpha = rank) whose ΔW at strength 1 best approximates tuned − base.

    Output factors are CPU tensors in ``options.dtype``; ``progress(done, total, module)`` after
    each module (it may raise to stop the job: nothing is kept).
    """
    started = time.perf_counter()
    options.validate()
    device = check_device(options.device)
    policies = options.policies()
    with open_tensor_file(base_path) as base, open_tensor_file(tuned_path) as tuned:
        arch, layers = plan_layers(base, tuned, options)
        report = ExtractReport(base=base.path.name, tuned=tuned.path.name, arch=arch)
        if base.container == "pickle" or tuned.container == "pickle":
            report.notes.append("a .ckpt checkpoint is loaded whole by the safe unpickler (a .safetensors one is "
                                "read a tensor at a time)")
        total = sum(len(layer.modules) for layer in layers)
        results: dict[str, LoraModule] = {}
        done = 0
        local = threading.local()  # one scratch buffer per worker thread

        def work(item: tuple[_Layer, torch.Tensor, torch.Tensor]) -> list[tuple[str, _Outcome]]:
            layer, base_t, tuned_t = item
            scratch = getattr(local, "scratch", None)
            if scratch is None:
                scratch = local.scratch = Scratch()
            delta = _difference(base_t, tuned_t, scratch, device)
            outcomes = []
            for name, target in layer.modules:
                rows = delta if target.rows is None else delta[target.rows[0]:target.rows[1]]
                energy, largest = _size_of_difference(rows, name, layer, target,
                                                      ((base.path, base_t), (tuned.path, tuned_t)), options.min_diff)
                outcomes.append((name, _extract_module(name, rows, energy, largest, target.weight_shape, policies,
                                                       options)))
            return outcomes

        # modules are decomposed in parallel on the CPU (one thread each, as merges do); a few layers
        # ahead at most, so memory holds a handful of layers whatever the checkpoint's size
        window = min(torch.get_num_threads(), MAX_WORKERS) + 1
        pairs = _read_pairs(base, tuned, layers)
        with full_precision_matmul(), contextlib.closing(pairs):  # an interrupt stops the reader thread too
            for outcomes in parallel_map(work, pairs, device, window=window):
                for name, outcome in outcomes:
                    if outcome.module is None:
                        report.skipped.append((name, outcome.skipped))
                    else:
                        results[name] = outcome.module
                        report.quality[name] = outcome.quality
                    done += 1
                    if progress:
                        progress(done, total, name)
    order = {name: i for i, name in enumerate(module_names(arch, options))}
    modules = sorted(results.values(), key=lambda m: order[m.name])
    report.quality = {m.name: report.quality[m.name] for m in modules}
    for m in modules:
        by_kind = report.ranks_by_kind.setdefault(m.kind, {})
        by_kind[m.rank] = by_kind.get(m.rank, 0) + 1
    report.modules_out = len(modules)
    report.seconds = time.perf_counter() - started
    return ExtractResult(modules=modules, arch=arch, report=report)


@dataclass
class _Outcome:
    module: LoraModule | None
    quality: ModuleQuality | None = None
    skipped: str = ""  # why there is no module


def _extract_module(name: str, delta: torch.Tensor, energy: float, largest: float, weight_shape: tuple[int, ...],
                    policies: dict[str, RankPolicy], options: ExtractOptions) -> _Outcome:
    if energy == 0:
        return _Outcome(None, skipped="identical in both checkpoints")
    if options.min_diff > 0 and largest <= options.min_diff:
        return _Outcome(None, skipped=f"largest |ΔW| {largest:.3g} ≤ --min-diff {options.min_diff:g}")
    policy = policies["conv" if kind_of(weight_shape) == CONV else "linear"]
    matrix = delta.reshape(weight_shape[0], -1)
    sketch: SketchedSVD = sketched_svd(matrix, policy.most, seed=zlib.crc32(name.encode()), energy=energy)
    # singular values under 1e-6·‖ΔW‖_F are fp32 rounding of the difference (an exactly low-rank ΔW
    # has them beyond its rank), not part of the update: never kept
    significant = int((sketch.svd.values > NOISE * math.sqrt(sketch.energy)).sum())
    k = policy.choose(sketch.svd.values[:max(significant, 1)], sketch.energy)
    up, down = split_factors(sketch.svd, k)
    quality = ModuleQuality(rank=k, retained=sketch.retained(k), excess=sketch.excess(k), energy=sketch.energy,
                            steps=sketch.steps)
    return _Outcome(shaped_module(name, weight_shape, up, down, float(k), options.dtype), quality)
