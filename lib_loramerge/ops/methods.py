"""Merge methods beyond the weighted sum, per module, from the factors (see README, "Merge methods").

Every input's contribution to a module is its tagged update Aᵢ = sᵢ·ΔWᵢ (sᵢ: strength × block
weight, ΔWᵢ = αᵢ/rᵢ · Uᵢ Dᵢ). A method replaces the sum Σ Aᵢ by:

* ``slerp`` (two inputs): sin((1−t)θ)/sin θ · A + sin(tθ)/sin θ · B, θ = ∠(A, B) on the flattened
  updates; lerp (1−t)·A + t·B when A ∥ B or one is zero (a module absent from an input is zero there).
* ``perpendicular``: A₁ + Σⱼ₍≥₂₎ (Aⱼ − proj_{A₁} Aⱼ), proj_{A₁} Aⱼ = ⟨Aⱼ, A₁⟩/‖A₁‖² · A₁.
* ``karcher``: ν̄·x, x the Karcher (Riemannian) mean of the directions Aᵢ/‖Aᵢ‖ on the unit sphere,
  ν̄ the mean of the norms ‖Aᵢ‖ (N inputs; for two, the bisector of their directions).
* ``norm``: Σ sᵢ · τ/‖ΔWᵢ‖ · ΔWᵢ, every input's update rescaled to the target norm τ (Frobenius or
  spectral; τ = the mean, max or min of the inputs' norms for that module, or a number).

These four are linear combinations Σ cᵢ·ΔWᵢ with coefficients from the inner products
(:mod:`.inner`), so they go through concat/svd/add exactly like the sum, and verification compares
the file with Σ cᵢ·ΔWᵢ.

* ``ties`` / ``dare`` in an aligned core space: with U = [U₁ … Uₙ] = Q_u R_u and Dᵀ = [D₁; …; Dₙ]ᵀ =
  Q_d R_d (QR of each side, R = Σrᵢ), every update is Aᵢ = Q_u Cᵢ Q_dᵀ with the small core
  Cᵢ = R_u[:, Iᵢ] R_d[:, Iᵢ]ᵀ. The cores are expressed in the joint singular basis of the
  updates (KnOTS): P = left singular vectors of [C₁ … Cₙ] (those of [A₁ … Aₙ]), W = right singular
  vectors of [C₁; …; Cₙ] (only the directions the updates span), Ĉᵢ = Pᵀ Cᵢ W — a basis that does not
  depend on QR's arbitrary choices nor on how the factors are stacked. TIES
  (trim to the top ``density`` of |entries| per input, elect the sign of the trimmed sum, mean of the
  entries that agree) or DARE (keep each entry with probability ``density``, divide by it, sum) is
  applied to the Ĉᵢ entries, and the merged core M gives ΔW = (Q_u P) M (Q_d W)ᵀ, whose SVD comes
  from M's — never an out × in matrix.
* ``ties-dense`` / ``dare-dense``: the same element-wise rules on the dense per-module Aᵢ (one module
  at a time), as PEFT and mergekit define them; the merged ΔW is truncated by a dense SVD.

Both TIES/DARE variants output the best rank-k approximation of the method's result (svd mode only).
DARE's random keep mask for module m is ``torch.rand`` from a CPU generator seeded with
``module_seed(seed, m)``, so a merge is reproducible from its recipe whatever the module order.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..errors import LoraMergeError
from ..model import LoraModule
from . import inner
from .lowrank import FactorSVD, _cholesky
from .merge import _NOISE, MergeInput, MergeOptions, _check_shapes, _merge_module, _Outcome, _Part, _shape_known, _truncated
from .method_names import CORE_METHODS, DENSE_METHODS, LINEAR_METHODS, METHODS, NORM_KINDS, family

NORM_TARGETS = ("mean", "max", "min")
DEFAULT_DENSITY = {"ties": 0.2, "dare": 0.5}  # TIES paper's k = 20 %; DARE: drop half
# |cos θ| above this: A and B are (anti)parallel, sin θ is rounding noise, so slerp is lerp
COLLINEAR = 0.9995
CORE_NOISE = 1e-12  # core space: singular values below this multiple of Σ‖Uᵢ‖‖Dᵢ‖ are float64 rounding
SPAN_RTOL = 1e-10  # core space: joint singular values below this fraction of the largest are null directions
KARCHER_STEPS = 100  # the Karcher iteration converges in a handful of steps for updates less than π/2 apart
KARCHER_TOLERANCE = 1e-12  # stop when the Riemannian gradient's norm is below this (unit sphere)


@dataclass
class MethodSpec:
    """A merge method and its parameters, as a user chose them (recorded in the output's recipe)."""

    name: str = "sum"
    t: float = 0.5  # slerp: 0 → first input, 1 → second
    norm_kind: str = "frobenius"  # norm
    norm_target: str | float = "mean"  # norm: mean, max, min (of the inputs' norms per module) or a number
    density: float | None = None  # ties/dare: fraction of entries kept (default: DEFAULT_DENSITY)
    seed: int | None = None  # dare: None → a fresh seed, drawn now so the recipe records it
    keep_targets: bool = field(default=False, compare=False)  # ties/dare: keep the exact results for --verify

    def __post_init__(self) -> None:
        if self.name in METHODS and family(self.name) in CORE_METHODS and self.density is None:
            self.density = DEFAULT_DENSITY[family(self.name)]
        if family(self.name) == "dare" and self.seed is None:
            self.seed = random.SystemRandom().randrange(2**31)

    @property
    def is_sum(self) -> bool:
        return self.name == "sum"

    def validate(self, mode: str | None = None, n_inputs: int | None = None) -> None:
        """One clear error for a method that cannot run with these parameters, mode or input count."""
        if self.name not in METHODS:
            raise LoraMergeError(f"unknown method '{self.name}' (choose {', '.join(METHODS)})")
        if self.name == "slerp":
            _finite(self.t, "slerp's t")
            if not 0.0 <= self.t <= 1.0:
                raise LoraMergeError(f"slerp's t must be in [0, 1], got {self.t:g}")
        if self.name == "norm":
            if self.norm_kind not in NORM_KINDS:
                raise LoraMergeError(f"unknown norm '{self.norm_kind}' (choose {', '.join(NORM_KINDS)})")
            if isinstance(self.norm_target, str) and self.norm_target not in NORM_TARGETS:
                try:
                    self.norm_target = float(self.norm_target)
                except ValueError:
                    raise LoraMergeError(f"norm target must be {', '.join(NORM_TARGETS)} or a positive number, "
                                         f"got '{self.norm_target}'") from None
            if not isinstance(self.norm_target, str):
                _finite(self.norm_target, "norm target")
                if self.norm_target <= 0:
                    raise LoraMergeError(f"norm target must be positive, got {self.norm_target:g}")
        if family(self.name) in CORE_METHODS:
            _finite(self.density, "density")
            if not 0.0 < self.density <= 1.0:
                raise LoraMergeError(f"density must be in (0, 1], got {self.density:g}")
            if mode is not None and mode != "svd":
                raise LoraMergeError(f"method {self.name} rebuilds new factors and truncates them by SVD: "
                                     f"use svd mode (--mode svd), not {mode}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise LoraMergeError(f"seed must be an integer, got {self.seed!r}")
        if n_inputs is not None:
            if self.name == "slerp" and n_inputs != 2:
                raise LoraMergeError(f"slerp interpolates between exactly two LoRAs, got {n_inputs}")
            if self.name == "perpendicular" and n_inputs < 2:
                raise LoraMergeError(f"perpendicular needs at least two LoRAs (a base and what to add), got {n_inputs}")
            if self.name == "karcher" and n_inputs < 2:
                raise LoraMergeError(f"karcher averages two or more LoRAs, got {n_inputs}")

    def recipe(self) -> dict:
        """What the recipe records: the method and only the parameters it uses."""
        if self.is_sum:
            return {}
        used = {"slerp": ("t",), "norm": ("norm_kind", "norm_target"), "ties": ("density",),
                "dare": ("density", "seed")}.get(family(self.name), ())
        values = asdict(self)
        return {"method": self.name, "method_options": {k: values[k] for k in used}}

    @classmethod
    def from_recipe(cls, recipe: dict) -> MethodSpec | None:
        """The method a recipe recorded (None: the weighted sum)."""
        name = recipe.get("method", "sum")
        if name == "sum":
            return None
        options = recipe.get("method_options") or {}
        if not isinstance(options, dict):
            raise LoraMergeError("the recipe's method_options is not an object")
        known = {"t", "norm_kind", "norm_target", "density", "seed"}
        return cls(name=str(name), **{k: v for k, v in options.items() if k in known})

    def describe(self) -> str:
        """The method in words, for the report."""
        if self.name == "slerp":
            return f"slerp (t = {self.t:g}) per module on the flattened ΔW"
        if self.name == "karcher":
            return "karcher: the spherical (Karcher) mean of the inputs' directions at their mean norm, per module"
        if self.name == "perpendicular":
            return "perpendicular: the first LoRA plus the parts of the others orthogonal to it, per module"
        if self.name == "norm":
            target = self.norm_target if isinstance(self.norm_target, str) else f"{self.norm_target:g}"
            return f"norm: every input's module rescaled to the {target} {self.norm_kind} norm before summing"
        seeded = f", seed {self.seed}" if family(self.name) == "dare" else ""
        where = "on the dense ΔW per module" if self.name in DENSE_METHODS else "in the aligned core space (exact)"
        return f"{family(self.name).upper()} (density {self.density:g}{seeded}) {where}, then the best rank-k SVD"

    def bind(self, inputs: Sequence[MergeInput]) -> MethodMerge:
        self.validate(n_inputs=len(inputs))
        return MethodMerge(self, list(inputs))


def _finite(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LoraMergeError(f"{what} must be a finite number, got {value!r}")


def module_seed(seed: int, module: str) -> int:
    """The seed of DARE's mask for one module: independent of module order and thread."""
    return zlib.crc32(f"{seed}:{module}".encode()) & 0x7FFFFFFF


# ---- element-wise rules (shared by the core and the dense variants) ----------------------------------

def ties_merge(stack: torch.Tensor, density: float) -> torch.Tensor:
    """TIES on n same-shaped updates stacked on dim 0: trim each to its top ``density`` of |entries|,
    elect each entry's sign as that of the trimmed sum, and average the trimmed entries that agree."""
    n = stack.shape[0]
    flat = stack.reshape(n, -1)
    keep = max(1, math.ceil(density * flat.shape[1]))
    trimmed = torch.zeros_like(flat)
    top = flat.abs().topk(keep, dim=1).indices
    trimmed.scatter_(1, top, flat.gather(1, top))
    elected = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    count = agree.sum(0).clamp_min(1)
    return ((trimmed * agree).sum(0) / count).reshape(stack.shape[1:])


def dare_merge(stack: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE on n updates stacked on dim 0: keep each entry with probability ``density`` (mask drawn as
    ``torch.rand(stack.shape) < density`` from ``generator``, on the CPU), rescale by 1/density, sum."""
    keep = torch.rand(stack.shape, generator=generator, dtype=stack.dtype) < density
    return (stack * keep.to(stack.device)).sum(0) / density


# ---- per module -----------------------------------------------------------------------------------

class MethodMerge:
    """A method bound to the merge's inputs: merges one module at a time (thread-safe per module).

    ``coefficients[m][i]``: linear methods' cᵢ with ΔW_m = Σ cᵢ·ΔWᵢ (strength included; 0 where input i
    lacks m); ``targets[m]``: ties/dare's exact (untruncated) result as factors, when ``keep_targets``.
    """

    def __init__(self, spec: MethodSpec, inputs: list[MergeInput]):
        self.spec, self.inputs = spec, inputs
        self.coefficients: dict[str, list[float]] = {}
        self.targets: dict[str, LoraModule] = {}

    def note(self) -> str:
        return f"method: {self.spec.describe()}"

    def merge_module(self, name: str, options: MergeOptions, rank_cap: int | None,
                     device: torch.device) -> _Outcome:
        present = [(i, inp) for i, inp in enumerate(self.inputs) if name in inp.lora.modules]
        live = [(i, inp.lora.modules[name].load(), inp.strength(name)) for i, inp in present
                if inp.strength(name) != 0.0]
        if not live:
            return _Outcome(None, "strength or block weight 0 in every input")
        # different layers under one name: refused with the shapes before any product is formed
        _check_shapes(name, [_Part(self.inputs[i].lora.name, module, s) for i, module, s in live])
        if self.spec.name in LINEAR_METHODS:
            return self._linear(name, live, options, rank_cap, device)
        return self._rebuilt(name, live, options, rank_cap, device)

    def _linear(self, name, live, options, rank_cap, device) -> _Outcome:
        pairs = [inner.scaled_pair(module, 1.0, device) for _, module, _ in live]
        strengths = torch.tensor([s for _, _, s in live], dtype=torch.float64)
        multipliers = self._multipliers(name, [i for i, _, _ in live], pairs, strengths)
        if not all(math.isfinite(m) for m in multipliers):
            raise LoraMergeError("the method's coefficients are not finite (ΔW overflows float64)", module=name)
        coefficients = [0.0] * len(self.inputs)
        parts = []
        for (i, module, strength), m in zip(live, multipliers, strict=True):
            coefficients[i] = strength * m
            if coefficients[i] != 0.0:
                parts.append(_Part(self.inputs[i].lora.name, module, coefficients[i]))
        self.coefficients[name] = coefficients
        if not parts:
            return _Outcome(None, f"the {self.spec.name} coefficients are 0 for every input")
        return _merge_module(name, parts, options, rank_cap, device)

    def _multipliers(self, name: str, indices: list[int], pairs: list[inner.Pair],
                     strengths: torch.Tensor) -> list[float]:
        """mᵢ with the result Σ mᵢ·sᵢ·ΔWᵢ over the live inputs of this module."""
        spec = self.spec
        if spec.name == "norm":
            norms = [inner.spectral_norm(p) if spec.norm_kind == "spectral" else inner.frobenius_norm(p)
                     for p in pairs]
            nonzero = [v for v in norms if v > 0.0]
            if not nonzero:
                return [0.0] * len(pairs)
            target = spec.norm_target
            if isinstance(target, str):
                target = {"mean": sum(nonzero) / len(nonzero), "max": max(nonzero), "min": min(nonzero)}[target]
            return [target / v if v > 0.0 else 0.0 for v in norms]
        g = inner.gram(pairs) * torch.outer(strengths, strengths)  # Gram of the tagged updates Aᵢ
        if spec.name == "slerp":
            t = spec.t
            if len(pairs) == 1:  # the other input lacks this module (or has strength 0 there): lerp with zero
                return [(1.0 - t) if indices[0] == 0 else t]
            cos = inner.cosine(g, 0, 1)
            if cos is None or abs(cos) > COLLINEAR:
                return [1.0 - t, t]
            theta = math.acos(cos)
            return [math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)]
        if spec.name == "karcher":
            return karcher_coefficients(g)
        # perpendicular: the base keeps its update, minus the projections of the others onto it
        if indices[0] != 0:  # no base here: nothing to be perpendicular to
            return [1.0] * len(pairs)
        base = 1.0 - sum(inner.projection_coefficient(g, onto=0, of=j) for j in range(1, len(pairs)))
        return [base] + [1.0] * (len(pairs) - 1)

    def _rebuilt(self, name, live, options, rank_cap, device) -> _Outcome:
        parts = [_Part(self.inputs[i].lora.name, module, strength) for i, module, strength in live]
        notes = _check_shapes(name, parts)
        ref = next((p.module for p in parts if _shape_known(p.module)), parts[0].module)
        pairs = [inner.scaled_pair(p.module, p.strength, device) for p in parts]
        magnitude = sum(float(u.norm()) * float(d.norm()) for u, d in pairs)
        if not math.isfinite(magnitude * magnitude):
            raise LoraMergeError("ΔW overflows float64 (strength × alpha / rank is too large)", module=name)
        stacked = sum(u.shape[1] for u, _ in pairs)
        out, width = pairs[0][0].shape[0], pairs[0][1].shape[1]
        generator = None
        if family(self.spec.name) == "dare":
            generator = torch.Generator().manual_seed(module_seed(self.spec.seed, name))
        if self.spec.name in CORE_METHODS:
            svd = core_space_merge(pairs, self.spec.name, self.spec.density, generator)
        else:
            svd = dense_merge(pairs, self.spec.name, self.spec.density, generator)
        cap = min(rank_cap or stacked, out, width, stacked)
        # singular values below this are rounding: the core route runs in float64 on the exact factors (its
        # null directions are already gone), the dense one in float32 like the sum's svd
        floor = magnitude * (CORE_NOISE if self.spec.name in CORE_METHODS else _NOISE * stacked)
        if self.spec.keep_targets:
            significant = svd.values > floor
            k = int(significant.sum())
            root = svd.values[:k].sqrt().to(svd.left.dtype)
            self.targets[name] = LoraModule(name, (svd.left[:, :k] * root).float().cpu(),
                                            (root[:, None] * svd.right[:k]).float().cpu(), None)
        outcome = _truncated(name, svd, floor, cap, ref, options)
        outcome.notes = notes + outcome.notes
        return outcome


def karcher_coefficients(g: torch.Tensor) -> list[float]:
    """mᵢ with Σ mᵢ·Aᵢ = ν̄ · x: x the Karcher mean (equal weights) of the unit directions Aᵢ/‖Aᵢ‖ on the
    sphere, ν̄ the mean of the norms ‖Aᵢ‖; zero updates take no part. ``g``: the Gram of the Aᵢ.

    Computed in the span of the inputs: x = Σ cⱼ·âⱼ, so every inner product is cᵀK… with K the
    Gram of the unit directions, and each step x ← exp_x(mean of log_x(âᵢ)) is exact in coefficients.
    Directions that are exactly opposite have no Karcher mean: then the arithmetic mean is used.
    """
    n = g.shape[0]
    norms = g.diagonal().clamp_min(0).sqrt()
    live = [i for i in range(n) if float(norms[i]) > 0]
    multipliers = [0.0] * n
    if not live:
        return multipliers
    k = g[live][:, live] / torch.outer(norms[live], norms[live])
    mean_norm = float(norms[live].mean())
    m = len(live)
    c = torch.full((m,), 1.0 / m, dtype=torch.float64)
    length = float(c @ k @ c)
    if length <= 1e-24:  # the directions cancel: no mean direction
        return [1.0 / n if i in live else 0.0 for i in range(n)]
    c /= math.sqrt(length)
    for _ in range(KARCHER_STEPS):
        cos = (k @ c).clamp(-1.0, 1.0)
        theta = torch.arccos(cos)
        sin = torch.sin(theta)
        if bool(((sin < 1e-12) & (cos < 0)).any()):  # an input opposite the mean: log map undefined
            return [1.0 / n if i in live else 0.0 for i in range(n)]
        factor = torch.where(sin > 1e-12, theta / sin.clamp_min(1e-300), torch.ones_like(theta))
        # log_x(âᵢ) = θᵢ/sin θᵢ · (âᵢ − cos θᵢ · x), averaged, in coefficients
        step = (torch.diag(factor) - factor[:, None] * cos[:, None] * c[None, :]).sum(0) / m
        size = math.sqrt(max(float(step @ k @ step), 0.0))
        if size < KARCHER_TOLERANCE:
            break
        c = math.cos(size) * c + math.sin(size) * step / size
        c /= math.sqrt(float(c @ k @ c))
    for j, i in enumerate(live):
        multipliers[i] = mean_norm * float(c[j]) / float(norms[i])
    return multipliers


def _span(values: torch.Tensor) -> int:
    """How many singular values are not rounding noise of the largest (float64 products of fp32 factors)."""
    return int((values > values[0] * SPAN_RTOL).sum()) if values.numel() and float(values[0]) > 0 else 0


def core_space_merge(pairs: Sequence[inner.Pair], method: str, density: float,
                     generator: torch.Generator | None = None) -> FactorSVD:
    """TIES/DARE of the updates Uᵢ Dᵢ in their aligned core space (see the module docstring); the SVD
    of the merged update, every singular triplet, from an R × R core (R = Σ rᵢ).

    U = Q_u T_u and Dᵀ = Q_d T_d with T from Cholesky of the Grams (QR when a stack is dependent):
    the cores need only the T; Q_u X = U (T_u⁻¹ X) is applied at the end, never formed."""
    up = torch.cat([u for u, _ in pairs], 1)
    down = torch.cat([d for _, d in pairs], 0)
    low_up = low_down = None
    if up.shape[1] <= min(up.shape[0], down.shape[1]):  # Cholesky needs independent columns
        low_up, low_down = _cholesky((up.T @ up).cpu()), _cholesky((down @ down.T).cpu())
    if low_up is not None and low_down is not None:
        t_up, t_down = low_up.T, low_down.T
    else:
        q_up, t_up = torch.linalg.qr(up)
        q_down, t_down = torch.linalg.qr(down.T)
        t_up, t_down = t_up.cpu(), t_down.cpu()
    cores, offset = [], 0
    for u, _ in pairs:
        block = slice(offset, offset + u.shape[1])
        cores.append(t_up[:, block] @ t_down[:, block].T)  # Q_uᵀ Aᵢ Q_d
        offset += u.shape[1]
    cores_cpu = torch.stack(cores)
    # the joint basis: left singular vectors of [C₁ … Cₙ], right ones of [C₁; …; Cₙ] (not the sum's, in
    # which the off-diagonal entries of two inputs cancel exactly and TIES would elect signs by rounding)
    left = torch.linalg.svd(torch.cat(list(cores_cpu), 1), full_matrices=False)
    right = torch.linalg.svd(torch.cat(list(cores_cpu), 0), full_matrices=False)
    # only the directions the updates span: a stack wider than its rank (LoHa/LoKr factor forms, a LoRA
    # twice) adds null directions whose entries are all 0, which would change what "density" counts
    p = left.U[:, :_span(left.S)]
    wh = right.Vh[:_span(right.S)]
    if p.shape[1] == 0 or wh.shape[0] == 0:  # every update is zero
        empty = torch.zeros(0, dtype=torch.float64)
        return FactorSVD(up.new_zeros(up.shape[0], 0), empty, down.new_zeros(0, down.shape[1]))
    aligned = p.T @ cores_cpu @ wh.T
    merged = ties_merge(aligned, density) if method == "ties" else dare_merge(aligned, density, generator)
    p2, values, wh2 = torch.linalg.svd(merged)
    to_left, to_right = p @ p2, (wh2 @ wh).T  # in the bases Q_u and Q_d
    if low_up is not None and low_down is not None:  # Q_u X = U T_u⁻¹ X, Q_d Y = Dᵀ T_d⁻¹ Y
        to_left = torch.linalg.solve_triangular(t_up, to_left, upper=True)
        to_right = torch.linalg.solve_triangular(t_down, to_right, upper=True)
        return FactorSVD(left=up @ to_left.to(up.device, up.dtype), values=values,
                         right=to_right.to(down.device, down.dtype).T @ down)
    return FactorSVD(left=q_up @ to_left.to(q_up.device, q_up.dtype), values=values,
                     right=to_right.to(q_down.device, q_down.dtype).T @ q_down.T)


def dense_merge(pairs: Sequence[inner.Pair], method: str, density: float,
                generator: torch.Generator | None = None) -> FactorSVD:
    """ties-dense/dare-dense: the element-wise rule on the dense updates Uᵢ Dᵢ (float32, one module),
    then the merged ΔW's full SVD."""
    stack = torch.stack([(u @ d).float() for u, d in pairs])
    merged = ties_merge(stack, density) if method == "ties-dense" else dare_merge(stack, density, generator)
    del stack
    left, values, right = torch.linalg.svd(merged, full_matrices=False)
    return FactorSVD(left=left, values=values.double().cpu(), right=right)


# ---- command line -----------------------------------------------------------------------------------

def method_from_args(args) -> MethodSpec | None:
    """The MethodSpec of parsed merge arguments (None for the weighted sum); parameters a method does
    not use are refused, so a typo'd command does not silently merge another way."""
    name = getattr(args, "method", "sum")
    given = {"--t": args.t, "--norm": args.norm_kind, "--norm-target": args.norm_target, "--density": args.density,
             "--seed": args.seed}
    uses = {"sum": (), "slerp": ("--t",), "karcher": (), "perpendicular": (), "norm": ("--norm", "--norm-target"),
            "ties": ("--density",), "dare": ("--density", "--seed")}[family(name)]
    stray = [flag for flag, value in given.items() if value is not None and flag not in uses]
    if stray:
        raise LoraMergeError(f"{', '.join(stray)} {'does' if len(stray) == 1 else 'do'} not apply to method {name}")
    if name == "sum":
        return None
    spec = MethodSpec(name=name, t=0.5 if args.t is None else args.t, norm_kind=args.norm_kind or "frobenius",
                      norm_target="mean" if args.norm_target is None else args.norm_target, density=args.density,
                      seed=args.seed)
    spec.validate()
    return spec


def method_spec(name: str, t: float = 0.5, density: float | None = None) -> MethodSpec | None:
    """The tab's method settings as a MethodSpec (None for the sum); norm with its defaults, a fresh DARE seed."""
    if name == "sum":
        return None
    if name not in METHODS:
        raise LoraMergeError(f"unknown method '{name}' (choose {', '.join(METHODS)})")
    spec = MethodSpec(name=name, t=0.5 if t is None else t, density=density if family(name) in CORE_METHODS else None)
    spec.validate()
    return spec
