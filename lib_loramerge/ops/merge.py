"""Merge N LoRAs into one: concat (exact), svd (optimal rank-k), add (the seed's factor sum).

For every module m the target is ΔW_m = Σᵢ cᵢ · (αᵢ / rᵢ) · Uᵢ Dᵢ, where cᵢ is LoRA i's UNet
strength (text-encoder strength for ``lora_te*`` modules) times its block-weight ratio for m —
exactly what stacking ``<lora:name:te:unet>`` tags does in A1111.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from .. import sdlayouts
from ..checks import as_strength
from ..errors import LoraMergeError
from ..formats.safetensors_io import all_finite, short_dtype_name
from ..lycoris import algorithm_label, is_lycoris, network_dim
from ..model import LoraModel, LoraModule, NetworkModule, is_text_encoder, validate_values
from ..runtime import torch_threads
from .lowrank import (
    BatchedSVD,
    FactorSVD,
    Scratch,
    batched_svd,
    clamp_factors,
    compact_factors,
    factor_svd,
    kron_svd,
    rank_for_threshold,
)
from .verify import Verification

T = TypeVar("T")
R = TypeVar("R")
MODES = ("add", "concat", "svd")
MAX_WORKERS = 4
# singular values below this fraction of the largest (times the stacked rank) are rounding noise
_NOISE = 1.2e-7
# concat: a module whose output rank exceeds this multiple of its inputs' declared ranks is reported
WIDE_CONCAT = 4


@dataclass
class MergeInput:
    """One LoRA with its strengths: ``te`` defaults to ``unet``; ``block_ratio(module)`` to 1."""

    lora: LoraModel
    unet: float = 1.0
    te: float | None = None
    block_ratio: Callable[[str], float] | None = None
    recipe: dict = field(default_factory=dict)  # extra facts for the output's recipe (e.g. block weights)

    def __post_init__(self) -> None:
        where = self.lora.path or self.lora.name
        try:
            self.unet = as_strength(self.unet, "UNet strength")
            self.te = None if self.te is None else as_strength(self.te, "TE strength")
        except LoraMergeError as e:
            raise e.with_path(where) from None

    @property
    def te_strength(self) -> float:
        return self.unet if self.te is None else self.te

    def multiplier(self, module: str) -> float:
        """The prompt strength for this module: TE strength for text-encoder modules, else UNet strength."""
        return self.te_strength if is_text_encoder(module) else self.unet

    def ratio(self, module: str) -> float:
        """The block weight for this module (1 without block weights)."""
        return self.block_ratio(module) if self.block_ratio else 1.0

    def strength(self, module: str) -> float:
        return self.multiplier(module) * self.ratio(module)


@dataclass
class MergeOptions:
    mode: str = "svd"
    rank: int | None = None  # svd: cap on the output rank (default: the largest input rank)
    threshold: float | None = None  # svd: keep this fraction of ‖ΔW‖_F² per module (rank capped by ``rank``)
    clamp: float | None = None  # svd: clip factors to this quantile of |entries| (off by default)
    device: str = "cpu"
    dtype: torch.dtype = torch.float16  # output factor dtype
    # svd: rank_policy(module, singular values) → the rank to keep (capped by ``rank``), instead of a
    # threshold; how resize applies its policies (ops.policies) through this one-input merge
    rank_policy: Callable[[str, torch.Tensor], int] | None = None
    # a merge method other than the weighted sum (ops.methods.MethodSpec); None: the sum
    method: object | None = None

    def validate(self) -> None:
        if self.mode not in MODES:
            raise LoraMergeError(f"unknown mode '{self.mode}' (choose {', '.join(MODES)})")
        if self.rank is not None and self.rank < 1:
            raise LoraMergeError(f"rank must be at least 1, got {self.rank}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise LoraMergeError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.clamp is not None and not 0 < self.clamp < 1:
            raise LoraMergeError(f"clamp quantile must be in (0, 1), got {self.clamp}")
        if self.mode != "svd" and (self.threshold is not None or self.clamp is not None):
            raise LoraMergeError(f"--threshold and --clamp apply to svd mode only, not {self.mode}")
        if self.rank_policy is not None and (self.mode != "svd" or self.threshold is not None):
            raise LoraMergeError("a rank policy applies to svd mode only, and replaces --threshold")
        if self.method is not None:
            self.method.validate(self.mode)
        check_device(self.device)


def check_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch.device; anything else (meta, mps, a typo) is refused."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise LoraMergeError(f"unknown device '{device}' (use cpu or cuda)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoraMergeError(f"device '{device}' requested but CUDA is not available here (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LoraMergeError(f"device '{device}' does not exist ({torch.cuda.device_count()} CUDA devices here)")
    return dev


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class MergeReport:
    mode: str
    inputs: list[str]
    modules_out: int = 0
    dropped: list[tuple[str, str]] = field(default_factory=list)
    ranks_by_kind: dict[str, dict[int, int]] = field(default_factory=dict)
    energy: dict[str, float] = field(default_factory=dict)  # svd: retained fraction of ‖ΔW‖_F² per module
    # svd: ‖ΔW‖_F² of each module's exact target, so retained fractions can be pooled by energy (per block, say)
    target_energy: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"  # where the merge's products ran (small r×r decompositions: always the CPU)
    seconds: float = 0.0  # the merge itself
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage of the whole job (read, math, write)
    verification: Verification | None = None  # --verify: the written file compared with its targets

    def energy_summary(self, worst: int = 5) -> dict | None:
        if not self.energy:
            return None
        values = sorted(self.energy.items(), key=lambda kv: kv[1])
        return {"min": values[0][1], "mean": sum(v for _, v in values) / len(values),
                "worst": [{"module": n, "energy": e} for n, e in values[:worst]]}

    def as_dict(self) -> dict:
        return {"mode": self.mode, "inputs": self.inputs, "modules_out": self.modules_out,
                "dropped": [{"module": n, "why": w} for n, w in self.dropped],
                "ranks_by_kind": {k: {str(r): n for r, n in sorted(v.items())} for k, v in self.ranks_by_kind.items()},
                "energy": self.energy_summary(), "notes": self.notes, "device": self.device,
                "seconds": round(self.seconds, 3),
                "timings": {k: round(v, 3) for k, v in self.timings.items()},
                **({"verification": self.verification.as_dict()} if self.verification else {})}


@dataclass
class MergeResult:
    modules: list[LoraModule]
    arch: str
    report: MergeReport
    method: object | None = None  # the bound merge method (ops.methods.MethodMerge) when not the sum


@dataclass
class _Outcome:
    module: LoraModule | None
    dropped: str = ""  # why there is no module
    energy: float | None = None  # svd: retained fraction of ‖ΔW‖_F²
    target_energy: float | None = None  # svd: ‖ΔW‖_F² of the exact target
    notes: list[str] = field(default_factory=list)
    wide: int | None = None  # concat with LyCORIS parts: the inputs' largest declared rank, when far exceeded


@dataclass
class _Part:
    """One input's contribution to one module: ΔW part = scale · up @ down (factors in fp32)."""

    source: str
    module: NetworkModule
    strength: float  # strength × block ratio

    @property
    def scale(self) -> float:
        return self.strength * self.module.scale


def common_arch(inputs: Sequence[MergeInput]) -> str:
    """The architecture all inputs share; different SD versions are refused before any work.

    An input whose architecture is unknown joins a known one only when every module it has is a
    layer of that architecture (a small LoRA whose shapes tell nothing); otherwise the output
    would be filed under a model most of it does not belong to.
    """
    known = {i.lora.arch for i in inputs} - {"unknown"}
    if len(known) > 1:
        listing = ", ".join(f"{i.lora.name} is {i.lora.arch}" for i in inputs)
        raise LoraMergeError(f"cannot merge LoRAs for different models ({listing})")
    if not known:
        return "unknown"
    arch = known.pop()
    for inp in inputs:
        if inp.lora.arch != "unknown":
            continue
        foreign = next((n for n in inp.lora.modules if arch not in sdlayouts.layer_shapes(n)), None)
        if foreign is not None:
            raise LoraMergeError(f"its architecture is unknown and its module '{foreign}' is no layer of "
                                 f"{arch.upper()}, which the other inputs are; cannot merge them",
                                 inp.lora.path or inp.lora.name)
    return arch


def merge_loras(inputs: Sequence[MergeInput], options: MergeOptions,
                progress: Callable[[int, int, str], None] | None = None) -> MergeResult:
    """Merge ``inputs`` module by module; the output factors are CPU tensors in ``options.dtype``."""
    started = time.perf_counter()
    if not inputs:
        raise LoraMergeError("nothing to merge: no input LoRAs")
    options.validate()
    arch = common_arch(inputs)
    report = MergeReport(mode=options.mode, inputs=[i.lora.name for i in inputs])
    unknown = [i.lora.name for i in inputs if i.lora.arch == "unknown"]
    if unknown:
        report.notes.append(f"architecture unknown for {', '.join(unknown)}; merged by module name only")
    lycoris = _check_lycoris(inputs, options)
    if lycoris:
        listing = "; ".join(f"{src}: {', '.join(f'{algo} ×{n}' for algo, n in algos.items())}"
                            for src, algos in lycoris.items())
        report.notes.append(f"LyCORIS modules merged exactly through their factor forms ({listing}); "
                            "the output is a plain LoRA/LoCon")
    rank_cap = options.rank
    if options.mode == "svd" and rank_cap is None and options.threshold is None and options.rank_policy is None:
        rank_cap, why = default_rank(inputs)
        report.notes.append(f"rank not given: using {why}, {rank_cap}")
    names: dict[str, None] = {}
    for inp in inputs:
        names.update(dict.fromkeys(inp.lora.modules))
    device = check_device(options.device)
    report.device = str(device)
    method = None if options.method is None or options.method.is_sum else options.method.bind(inputs)
    if method is not None:
        report.notes.append(method.note())

    def parts_of(name: str) -> list[_Part]:
        return [_Part(inp.lora.name, inp.lora.modules[name], inp.strength(name))
                for inp in inputs if name in inp.lora.modules]

    per_thread = threading.local()  # each worker's Scratch: dropped with this call

    def work(unit: list[str]) -> list[_Outcome]:
        if method is not None:  # per module: its coefficients or new factors come from its own inputs
            return [method.merge_module(n, options, rank_cap, device) for n in unit]
        if len(unit) > 1 or _batchable(parts_of(unit[0]), options):
            if not hasattr(per_thread, "scratch"):
                per_thread.scratch = Scratch(device)
            return _merge_batch(unit, [parts_of(n) for n in unit], options, rank_cap, device, per_thread.scratch)
        return [_merge_module(unit[0], parts_of(unit[0]), options, rank_cap, device)]

    outcomes: dict[str, _Outcome] = {}
    done = 0
    units = _work_units(list(names), parts_of, options) if method is None else [[n] for n in names]
    for unit, results in zip(units, parallel_map(work, units, device), strict=True):
        for name, outcome in zip(unit, results, strict=True):
            outcomes[name] = outcome
            done += 1
            if progress:
                progress(done, len(names), name)
    out: list[LoraModule] = []
    wide: list[tuple[str, int, int]] = []
    for name in names:
        outcome = outcomes[name]
        report.notes += outcome.notes
        if outcome.wide is not None and outcome.module is not None:
            wide.append((name, outcome.module.rank, outcome.wide))
        if outcome.module is None:
            report.dropped.append((name, outcome.dropped))
        else:
            out.append(outcome.module)
            by_kind = report.ranks_by_kind.setdefault(outcome.module.kind, {})
            by_kind[outcome.module.rank] = by_kind.get(outcome.module.rank, 0) + 1
            if outcome.energy is not None:
                report.energy[name] = outcome.energy
                report.target_energy[name] = outcome.target_energy
    if wide:
        name, rank, declared = max(wide, key=lambda w: w[1])
        report.notes.append(
            f"concat: {len(wide)} modules have a rank above {WIDE_CONCAT}× their inputs' ranks (up to {rank}, e.g. "
            f"{name}, inputs of rank {declared}): LoHa/LoKr factor forms have rank r₁·r₂, so the file is large; "
            f"--mode svd --rank N gives the best rank-N approximation")
    report.modules_out = len(out)
    report.seconds = time.perf_counter() - started
    return MergeResult(modules=out, arch=arch, report=report, method=method)


def _check_lycoris(inputs: Sequence[MergeInput], options: MergeOptions) -> dict[str, dict[str, int]]:
    """Refuse what cannot merge before any work (DoRA; LyCORIS in add mode); count LyCORIS modules per input."""
    found: dict[str, dict[str, int]] = {}
    for inp in inputs:
        for name, m in inp.lora.modules.items():
            if inp.strength(name) == 0.0:
                continue
            where = inp.lora.path or inp.lora.name
            if getattr(m, "algo", "") == "dora":
                raise LoraMergeError("DoRA module (dora_scale): its update depends on the base model's weights, so "
                                     "it cannot be merged into a plain LoRA; bake it into a checkpoint instead",
                                     where, name)
            if is_lycoris(m):
                label = algorithm_label(m)
                if options.mode == "add":
                    raise LoraMergeError(f"add mode is the seed's factor sum, defined for LoRA/LoCon only, not {label}; "
                                         "use --mode concat (exact) or svd", where, name)
                algos = found.setdefault(inp.lora.name, {})
                algos[label] = algos.get(label, 0) + 1
    return found


def default_rank(inputs: Sequence[MergeInput]) -> tuple[int, str]:
    """The svd rank cap when none is given: the largest rank of the plain LoRA/LoCon modules.

    A LoHa/LoKr module's exact factor rank (r₁·r₂) says nothing about the size a user expects
    (a dim-8 LoKr has factor rank 64 but is smaller than a rank-8 LoRA), so it never sets the
    default. Inputs with LyCORIS modules only: their factor rank, so one LoKr converts exactly.
    """
    modules = [m for i in inputs for m in i.lora.modules.values()]
    plain = [m.rank for m in modules if not is_lycoris(m)]
    if plain:
        return max(plain), "the largest LoRA/LoCon input rank" + (" (LyCORIS factor ranks not counted)"
                                                                      if len(plain) < len(modules) else "")
    return max(m.rank for m in modules), ("the largest LyCORIS factor rank (exact for one input; --rank or "
                                          "--threshold give a smaller file)")


def parallel_map(fn: Callable[[T], R], items: Iterable[T], device: torch.device, window: int | None = None
                 ) -> Iterator[R]:
    """``map(fn, items)`` in order, on all CPU cores: one work unit per core, one thread per unit.

    Small per-module linear algebra scales far better across modules than inside one op, so the
    intra-op thread count is set to 1 for the duration (and restored). On CUDA: sequential.
    ``window``: take at most this many items ahead of the results (``items`` may be a generator
    reading files: it is not drained into memory); default: all at once.
    """
    # beyond a few workers the Python between torch calls (one GIL) is the bottleneck
    workers = min(torch.get_num_threads(), MAX_WORKERS) if device.type == "cpu" else 1
    if workers <= 1:
        yield from map(fn, items)
        return
    with torch_threads(1), ThreadPoolExecutor(workers, thread_name_prefix="lora-merge") as pool:
        try:
            if window is None:
                yield from pool.map(fn, items)
                return
            pending: collections.deque = collections.deque()
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _flat_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Linear (out, in) and 1×1 conv (out, in, 1, 1) are the same layer update."""
    return shape[:2] if shape[2:] == (1, 1) else shape


def _shape_known(module: NetworkModule) -> bool:
    return getattr(module, "layer_shape_known", True)


def _check_shapes(name: str, parts: list[_Part]) -> list[str]:
    first = parts[0]
    for p in parts[1:]:
        a, b = p.module.weight_shape, first.module.weight_shape
        if not (_shape_known(p.module) and _shape_known(first.module)):  # a flat LyCORIS shape: compare flat
            a, b = (a[0], math.prod(a[1:])), (b[0], math.prod(b[1:]))
        if _flat_shape(a) != _flat_shape(b):
            raise LoraMergeError(f"shape {list(first.module.weight_shape)} in {first.source} but "
                                 f"{list(p.module.weight_shape)} in {p.source}: not the same layer", module=name)
    if len({len(p.module.weight_shape) for p in parts}) > 1:
        return [f"{name}: linear and 1×1-conv factors reconciled (written as {first.module.kind})"]
    return []


def _output_module(name: str, ref: NetworkModule, up: torch.Tensor, down: torch.Tensor, alpha: float | None,
                   dtype: torch.dtype) -> LoraModule:
    """Factors (out × k, k × K) shaped like ``ref``'s layer: (out, k[, 1, 1]) and (k, in[, kh, kw])."""
    return shaped_module(name, ref.weight_shape, up, down, alpha, dtype)


def shaped_module(name: str, weight_shape: tuple[int, ...], up: torch.Tensor, down: torch.Tensor,
                  alpha: float | None, dtype: torch.dtype) -> LoraModule:
    """A LoRA/LoCon module from factors (out × k, k × in·kh·kw) for a layer of ``weight_shape``, as CPU
    tensors in ``dtype`` (a cast that overflows is refused, naming the module)."""
    k = up.shape[1]
    out, inp, *kernel = weight_shape
    conv = len(weight_shape) == 4
    up = up.reshape(out, k, 1, 1) if conv else up
    down = down.reshape(k, inp, *kernel) if conv else down.reshape(k, inp)
    return LoraModule(name=name, up=_cast(up, dtype, name), down=_cast(down, dtype, name), alpha=alpha)


def _cast(factor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """A factor in the output dtype, refusing values the cast turns into Inf (the writer checks the rest)."""
    out = factor.to("cpu", dtype).contiguous()
    if dtype != factor.dtype and not all_finite(out):
        if all_finite(factor):
            raise LoraMergeError(f"factors beyond the range of {short_dtype_name(dtype)} (lower the strengths, or "
                                 "save as fp32 or bf16); nothing was written", module=name)
        raise LoraMergeError("ΔW overflows float32 (strength × alpha / rank is too large)", module=name)
    return out


def _merge_module(name: str, parts: list[_Part], options: MergeOptions, rank_cap: int | None,
                  device: torch.device) -> _Outcome:
    live = [p for p in parts if p.strength != 0.0]
    if not live:
        return _Outcome(None, "strength or block weight 0 in every input")
    notes = _check_shapes(name, live)
    ref = next((p.module for p in live if _shape_known(p.module)), live[0].module)
    if options.mode == "svd":
        outcome = _svd(name, live, ref, options, rank_cap, device)
        outcome.notes = notes + outcome.notes
        return outcome
    factors = [p.module.factor_matrices(torch.float32, device) for p in live]
    lycoris = any(is_lycoris(p.module) for p in live)
    if len(live) == 1 and not lycoris:  # one source: that LoRA itself, strength folded in evenly, its own alpha
        (up, down), part = factors[0], live[0]
        root = math.sqrt(abs(part.strength))
        alpha = part.module.alpha if part.module.alpha is not None else float(part.module.rank)
        outcome = _Outcome(_output_module(name, ref, math.copysign(root, part.strength) * up, root * down, alpha,
                                          options.dtype))
    elif options.mode == "concat":
        ups, downs = [], []
        for (up, down), p in zip(factors, live, strict=True):
            root = math.sqrt(abs(p.scale))
            ups.append(math.copysign(root, p.scale) * up)
            downs.append(root * down)
        up, down = torch.cat(ups, 1), torch.cat(downs, 0)
        outcome = _Outcome(_output_module(name, ref, up, down, float(up.shape[1]), options.dtype))  # scale 1
        declared = max(network_dim(p.module) for p in live)
        if lycoris and up.shape[1] > WIDE_CONCAT * declared:
            outcome.wide = declared
    else:
        outcome = _Outcome(_add(name, live, factors, options.dtype))
    outcome.notes = notes + outcome.notes
    return outcome


def _add(name: str, parts: list[_Part], factors: list[tuple[torch.Tensor, torch.Tensor]],
         dtype: torch.dtype) -> LoraModule:
    """The seed's factor sum: U = Σ √(αᵢ/α₁)·sᵢ·Uᵢ, D = Σ √(αᵢ/α₁)·|sᵢ|·Dᵢ, alpha α₁ (approximate)."""
    ranks = [p.module.rank for p in parts]
    if len(set(ranks)) > 1:
        listing = " and ".join(f"rank {r} in {p.source}" for r, p in zip(ranks, parts, strict=True))
        raise LoraMergeError(f"add mode needs equal ranks, got {listing}; use --mode concat (exact) or svd",
                             module=name)
    alphas = [p.module.alpha if p.module.alpha is not None else float(p.module.rank) for p in parts]
    if alphas[0] <= 0 or any(a < 0 for a in alphas):
        raise LoraMergeError(f"add mode needs positive alphas, got {', '.join(f'{a:g}' for a in alphas)}",
                             module=name)
    up = sum(math.sqrt(a / alphas[0]) * p.strength * u for (u, _), p, a in zip(factors, parts, alphas, strict=True))
    down = sum(math.sqrt(a / alphas[0]) * abs(p.strength) * d for (_, d), p, a in zip(factors, parts, alphas, strict=True))
    return _output_module(name, parts[0].module, up, down, alphas[0], dtype)


def _overflow(name: str) -> LoraMergeError:
    return LoraMergeError("ΔW overflows float32 (strength × alpha / rank is too large)", module=name)


@dataclass
class _Stack:
    """One module's stacked factor pair ΔW = up @ down (strengths and scales folded in, balanced)."""

    up: torch.Tensor
    down: torch.Tensor
    magnitude: float  # Σ‖Uᵢ‖‖Dᵢ‖ ≥ ‖ΔW‖: singular values below its fp32 rounding are noise
    stacked: int  # inner size before any compaction
    cap: int  # the most vectors the output may keep

    @property
    def floor(self) -> float:
        return self.magnitude * _NOISE * self.stacked


def _stack(name: str, parts: list[_Part], rank_cap: int | None, device: torch.device, compact: bool = True) -> _Stack:
    ups, downs = [], []
    for p in parts:
        u, d = p.module.factor_matrices(torch.float32, device)
        root = math.sqrt(abs(p.scale))  # balanced, like concat: keeps both stacks well scaled
        ups.append(math.copysign(root, p.scale) * u)
        downs.append(root * d)
    up, down = torch.cat(ups, 1), torch.cat(downs, 0)
    stacked = up.shape[1]
    if compact:
        up, down = compact_factors(up, down)
    cap = min(rank_cap or stacked, up.shape[0], down.shape[1], stacked)
    # ‖ΔW‖ ≤ Σ‖Uᵢ‖‖Dᵢ‖: singular values below fp32 rounding of that are noise (e.g. a LoRA minus itself)
    magnitude = sum(float(torch.linalg.norm(u)) * float(torch.linalg.norm(d)) for u, d in zip(ups, downs, strict=True))
    if not math.isfinite(magnitude * magnitude):  # the Gram matrices hold squares
        raise _overflow(name)
    return _Stack(up, down, magnitude, stacked, cap)


def _stacked_svd(name: str, parts: list[_Part], rank_cap: int | None, device: torch.device
                 ) -> tuple[FactorSVD, float, int, int]:
    """(SVD of the module's ΔW, Σ‖Uᵢ‖‖Dᵢ‖ bound on ‖ΔW‖, stacked rank, rank cap) from the stacked factor pairs.

    One LoKr alone takes the Kronecker route: the SVDs of its two small sides, never a stack of
    rank r₁·r₂ (its singular values are the products of theirs).
    """
    if len(parts) == 1 and hasattr(parts[0].module, "kron_sides"):
        p = parts[0]
        (u1, d1), (u2, d2) = p.module.kron_sides(torch.float32, device)
        stacked = u1.shape[1] * u2.shape[1]
        cap = min(rank_cap or stacked, u1.shape[0] * u2.shape[0], d1.shape[1] * d2.shape[1], stacked)
        svd = kron_svd(factor_svd(u1, d1), factor_svd(u2, d2), cap)
        svd = FactorSVD(left=math.copysign(1.0, p.scale) * svd.left, values=abs(p.scale) * svd.values, right=svd.right)
        magnitude = abs(p.scale) * math.prod(float(torch.linalg.norm(t)) for t in (u1, d1, u2, d2))
        if not (math.isfinite(magnitude) and bool(torch.isfinite(svd.values).all())):
            raise _overflow(name)
        return svd, magnitude, stacked, cap
    st = _stack(name, parts, rank_cap, device)
    return factor_svd(st.up, st.down, st.cap), st.magnitude, st.stacked, st.cap


def _svd(name: str, parts: list[_Part], ref: NetworkModule, options: MergeOptions, rank_cap: int | None,
         device: torch.device) -> _Outcome:
    svd, magnitude, stacked, cap = _stacked_svd(name, parts, rank_cap, device)
    return _truncated(name, svd, magnitude * _NOISE * stacked, cap, ref, options)


def _truncated(name: str, svd: FactorSVD, floor: float, cap: int, ref: NetworkModule,
               options: MergeOptions) -> _Outcome:
    """The output module from a module's SVD: rank from the cap, the noise floor and the threshold."""
    k = _kept_rank(name, svd.values, int((svd.values > floor).sum()), cap, options)
    if k == 0:
        return _Outcome(None, "ΔW is zero")
    return _factor_outcome(name, ref, svd.left, svd.right, svd.values, k, options)


def _kept_rank(name: str, values: torch.Tensor, significant: int, cap: int, options: MergeOptions) -> int:
    """How many of a module's singular values the output keeps (0: ΔW is zero): at most ``cap`` and the
    ``significant`` ones above the noise floor, fewer by --threshold or a rank policy."""
    if significant == 0:
        return 0
    cap = min(cap, significant)
    if options.rank_policy is not None:
        return min(cap, max(1, options.rank_policy(name, values[:significant])))
    return cap if options.threshold is None else min(cap, max(1, rank_for_threshold(values, options.threshold)))


def _factor_outcome(name: str, ref: NetworkModule, left: torch.Tensor, right: torch.Tensor, values: torch.Tensor,
                    k: int, options: MergeOptions) -> _Outcome:
    """The rank-k output module from singular vectors (left: out × ≥k, right: ≥k × K) and values, √σ on each side."""
    root = values[:k].sqrt().to(left.device, left.dtype)
    if options.clamp is not None:
        new_up, new_down = clamp_factors(left[:, :k] * root, root[:, None] * right[:k], options.clamp)
    else:  # scaled straight into the output dtype: no float32 copy of the factors on the way
        new_up = _scaled_cast(left[:, :k], root, options.dtype, name)
        new_down = _scaled_cast(right[:k], root[:, None], options.dtype, name)
    energy = float((values**2).sum())
    kept = float((values[:k] ** 2).sum() / energy)
    return _Outcome(_output_module(name, ref, new_up, new_down, float(k), options.dtype), energy=kept,
                    target_energy=energy)


def _scaled_cast(factor: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``_cast(factor * scale, dtype, name)`` in one pass, on the CPU: the product is rounded to float32 and
    then to ``dtype``, as there, so the bytes are the same."""
    if factor.device.type != "cpu":
        return _cast(factor * scale, dtype, name)
    out = torch.empty(factor.shape, dtype=dtype)
    torch.mul(factor, scale, out=out)
    if dtype != factor.dtype and not all_finite(out):
        _cast(factor * scale, dtype, name)  # raises, telling range from overflow
    return out


# ---- batches: svd of many plain-LoRA modules of one shape through batched linear algebra -----------

BATCH_BYTES = 24 << 20  # float32 factors of one batch
BATCH_MAX = 64


def _batchable(parts: list[_Part], options: MergeOptions) -> bool:
    """svd of plain LoRA/LoCon parts (Tucker included) whose stack is narrower than the layer."""
    live = [p for p in parts if p.strength != 0.0]
    if options.mode != "svd" or not live or not all(type(p.module) is LoraModule for p in live):
        return False
    shape = live[0].module.weight_shape
    rank = sum(p.module.rank for p in live)
    return all(_flat_shape(p.module.weight_shape) == _flat_shape(shape) for p in live) and \
        rank <= min(shape[0], math.prod(shape[1:]))


def _work_units(names: list[str], parts_of: Callable[[str], list[_Part]], options: MergeOptions) -> list[list[str]]:
    """Batches of modules with the same (out, in·k·k) and the same ranks and dtypes of their inputs' factors,
    bounded in bytes; single modules otherwise."""
    groups: dict[tuple, list[str]] = {}
    units: list[list[str]] = []
    for name in names:
        parts = parts_of(name)
        if not _batchable(parts, options):
            units.append([name])
            continue
        live = [p.module for p in parts if p.strength != 0.0]
        out, flat = live[0].weight_shape[0], math.prod(live[0].weight_shape[1:])
        factors = tuple((m.rank, m.up.dtype, m.down.dtype, m.mid is None) for m in live)
        groups.setdefault((out, flat, factors), []).append(name)
    for (out, flat, factors), members in groups.items():
        rank = sum(f[0] for f in factors)
        size = max(1, min(BATCH_MAX, BATCH_BYTES // ((out + flat) * rank * 4)))
        units += [members[i:i + size] for i in range(0, len(members), size)]
    return units


def _read_factors(modules: list[LoraModule], ups: torch.Tensor, downs: torch.Tensor, scratch: Scratch) -> None:
    """One input position of a batch: module b's factor matrices copied (as float32) into ``ups[b]`` and
    ``downs[b]``, NaN/Inf unchecked (the batch's Grams tell them). Lazily read modules are read into the
    worker's staging memory (the file's dtype), then converted into the batch by one copy per side."""
    first = modules[0]
    out, rank = first.out_features, first.rank
    stage_up = scratch.take("file-up", (len(modules), out, rank), first.up.dtype, "cpu")
    stage_down = scratch.take("file-down", (len(modules), rank, downs.shape[2]), first.down.dtype, "cpu")
    direct = []
    reads: dict[int, tuple[object, list]] = {}  # one batch of reads per file: opened once, adjacent tensors at once
    for b, m in enumerate(modules):  # (a Tucker down is not (rank, in·k·k): never staged)
        found = None if m.mid is not None else m.file_reads(stage_up[b].view(m.up.shape),
                                                            stage_down[b].view(m.down.shape))
        if found is None:
            direct.append(b)
        else:
            reads.setdefault(id(found[0]), (found[0], []))[1].extend(found[1])
    for tf, requests in reads.values():
        tf.read_many_into(requests)
    if len(direct) < len(modules):
        ups.copy_(stage_up)
        downs.copy_(stage_down)
    for b in direct:  # in memory already, or Tucker
        module = modules[b].load(check_values=False)
        if module.mid is None:
            ups[b].copy_(module.up.reshape(out, rank))
            downs[b].copy_(module.down.reshape(rank, -1))
        else:
            u, d = module.factor_matrices(torch.float32, ups.device)
            ups[b].copy_(u)
            downs[b].copy_(d)


def _merge_batch(names: list[str], parts: list[list[_Part]], options: MergeOptions, rank_cap: int | None,
                 device: torch.device, scratch: Scratch | None = None) -> list[_Outcome]:
    """svd-merge modules of one shape together; a module the fast route cannot vouch for goes the float64 way.

    The factors are read into the batch tensors as they are, in ``scratch`` memory (a worker's, reused
    batch after batch); their strengths and scales are applied by :func:`batched_svd`, to the small Grams.
    """
    scratch = scratch or Scratch(device)
    lives = [[p for p in module_parts if p.strength != 0.0] for module_parts in parts]
    first = [p.module for p in lives[0]]  # every module of a batch has factors of these ranks (_work_units)
    out, flat = first[0].out_features, math.prod(first[0].weight_shape[1:])
    ranks_in = [m.rank for m in first]
    stacked = sum(ranks_in)
    ups = scratch.take("up", (len(names), out, stacked))
    downs = scratch.take("down", (len(names), stacked, flat))
    offsets = [sum(ranks_in[:j]) for j in range(len(ranks_in))]
    for j, (offset, rank) in enumerate(zip(offsets, ranks_in, strict=True)):
        _read_factors([live[j].module for live in lives], ups[:, :, offset:offset + rank],
                      downs[:, offset:offset + rank], scratch)
    up_scale, down_scale = [], []
    for live in lives:  # balanced as in _stack, applied by batched_svd
        signed = [(math.sqrt(abs(scale)), scale) for scale in (p.scale for p in live)]
        up_scale.append([x for (root, scale), r in zip(signed, ranks_in, strict=True)
                         for x in [math.copysign(root, scale)] * r])
        down_scale.append([x for (root, _), r in zip(signed, ranks_in, strict=True) for x in [root] * r])
    notes = [_check_shapes(name, live) for name, live in zip(names, lives, strict=True)]
    refs = [next((p.module for p in live if _shape_known(p.module)), live[0].module) for live in lives]
    caps = [min(rank_cap or stacked, out, flat, stacked)] * len(names)
    used = [p.module for live in lives for p in live]
    scales = torch.tensor(up_scale, dtype=torch.float64), torch.tensor(down_scale, dtype=torch.float64)
    batch = batched_svd(ups, downs, caps, _NOISE * stacked, scales)
    if not all(math.isfinite(f) for f in batch.floors):
        if not (all_finite(ups) and all_finite(downs)):
            for module in used:  # a factor of a file holds NaN/Inf: validate_values names file and module
                validate_values(module.load(check_values=False), module.source)
        raise _overflow(next(n for n, f in zip(names, batch.floors, strict=True) if not math.isfinite(f)))
    ranks = {}
    if batch.accepted:
        floors = torch.tensor([batch.floors[b] for b in batch.accepted], dtype=torch.float64)
        significant = (batch.values[batch.accepted] > floors[:, None]).sum(-1).tolist()
        for b, count in zip(batch.accepted, significant, strict=True):
            ranks[b] = _kept_rank(names[b], batch.values[b], count, caps[b], options)
    split = _split_batch(names, batch, ranks, options, scratch) if any(ranks.values()) else {}
    outcomes = []
    for b, (name, ref, note) in enumerate(zip(names, refs, notes, strict=True)):
        if b not in ranks:  # the float64 route, on the scaled factors
            up, down = ups[b] * scales[0][b].to(ups), scales[1][b].to(downs)[:, None] * downs[b]
            svd = factor_svd(*compact_factors(up, down), caps[b])
            outcome = _truncated(name, svd, batch.floors[b], caps[b], ref, options)
        elif ranks[b] == 0:
            outcome = _Outcome(None, "ΔW is zero")
        else:
            up, down, kept, energy = split[b]
            outcome = _Outcome(_output_module(name, ref, up, down, float(ranks[b]), options.dtype), energy=kept,
                               target_energy=energy)
        outcome.notes = note + outcome.notes
        outcomes.append(outcome)
    return outcomes


def _split_batch(names: list[str], batch: BatchedSVD, ranks: dict[int, int], options: MergeOptions,
                 scratch: Scratch | None) -> dict[int, tuple[torch.Tensor, torch.Tensor, float, float]]:
    """The accepted modules' rank-k factors, √σ on each side, in the output dtype, with the fraction of
    ‖ΔW‖² kept and ‖ΔW‖²: a few batched products and one scaled cast per side for the whole batch
    (:func:`_factor_outcome` for one module)."""
    k = max(ranks.values())
    left, right = batch.vectors(k, scratch)
    values = batch.values[batch.accepted]
    roots = values[:, :k].sqrt().to(left.device, left.dtype)
    energy = (values**2).sum(-1)
    kept_rank = torch.tensor([max(ranks[b], 1) for b in batch.accepted])
    kept = ((values**2).cumsum(-1).gather(1, (kept_rank - 1)[:, None])[:, 0] / energy).tolist()
    # singular vectors have entries of at most 1: √σ₁ within the dtype's range means no value can overflow
    direct = options.clamp is None and left.device.type == "cpu" and \
        float(values[:, 0].max()) ** 0.5 < torch.finfo(options.dtype).max / 2
    if direct:  # straight into the output dtype, no check needed
        ups = torch.mul(left, roots[:, None, :], out=torch.empty(left.shape, dtype=options.dtype))
        downs = torch.mul(right, roots[:, :, None], out=torch.empty(right.shape, dtype=options.dtype))
    else:  # clamped and cast module by module (_cast tells range from overflow)
        ups, downs = left * roots[:, None, :], roots[:, :, None] * right
    split = {}
    for i, (b, energy_b, kept_b) in enumerate(zip(batch.accepted, energy.tolist(), kept, strict=True)):
        r = ranks[b]
        if r == 0:
            continue
        up, down = ups[i, :, :r], downs[i, :r]
        if options.clamp is not None:
            up, down = clamp_factors(up, down, options.clamp)
        if not direct:
            up, down = _cast(up, options.dtype, names[b]), _cast(down, options.dtype, names[b])
        split[b] = up.contiguous(), down, kept_b, energy_b
    return split
