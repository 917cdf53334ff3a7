"""Merge methods beyond the sum against dense references written here (dense only in the tests)."""

import json
import math
import zlib
from pathlib import Path

import pytest
import torch
from synth import make_modules, write_kohya

from lib_loramerge.errors import LoraMergeError
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.jobs import RECIPE_KEY, merge_to_file
from lib_loramerge.model import LoraModel, LoraModule
from lib_loramerge.ops import inner
from lib_loramerge.ops.merge import MergeInput, MergeOptions, merge_loras
from lib_loramerge.ops.methods import MethodSpec

F32 = torch.float32


def lora(modules, name, arch="sd1"):
    return LoraModel(modules={m.name: m for m in modules}, arch=arch, path=Path(f"{name}.safetensors"))


def dense(module) -> torch.Tensor:
    """ΔW at strength 1 as an (out, in·kh·kw) float64 matrix, written out independently of the library."""
    up = module.up.double().reshape(module.up.shape[0], -1)
    down = module.down.double()
    scale = module.alpha / down.shape[0] if module.alpha is not None else 1.0
    if module.mid is not None:
        w = torch.einsum("nmkl,in,mj->ijkl", module.mid.double(), up, down.reshape(down.shape[0], -1))
        return scale * w.reshape(w.shape[0], -1)
    return scale * up @ down.reshape(down.shape[0], -1)


ONLY_A = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_[qk]|down_blocks_0_resnets_0_conv1|layers_0_self_attn_q"
ONLY_B = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_[qv]|down_blocks_0_resnets_0_conv1|layers_0_self_attn_q"


def pair_of_loras(correlated: float = 0.0):
    """Two SD1 LoCons (rank 4 / alpha 2 and rank 3 / alpha 3): linear, 3×3 conv and TE modules, a
    Tucker module in a, some modules in one input only; ``correlated`` mixes a's factors into b's."""
    a = make_modules("sd1", scope="locon", rank=4, alpha=2.0, seed=1, only=ONLY_A)
    b = make_modules("sd1", scope="locon", rank=3, alpha=3.0, seed=2, only=ONLY_B)
    if correlated:
        by_name = {m.name: m for m in a}
        b = [LoraModule(m.name, m.up + correlated * by_name[m.name].up[:, :3], m.down + correlated
                        * by_name[m.name].down[:3], m.alpha) if m.name in by_name else m for m in b]
    g = torch.Generator().manual_seed(9)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    a = [m for m in a if m.name != name]
    a.append(LoraModule(name, torch.randn(320, 2, 1, 1, generator=g) * .1, torch.randn(2, 320, 1, 1, generator=g) * .1,
                        alpha=1.0, mid=torch.randn(2, 2, 3, 3, generator=g)))
    return lora(a, "a"), lora(b, "b")


def outputs(inputs, method, mode="concat", rank=None, dtype=F32):
    options = MergeOptions(mode=mode, rank=rank, dtype=dtype, method=method)
    result = merge_loras(inputs, options)
    return {m.name: dense(m) for m in result.modules}, result


def tagged(inp, name):
    """A = strength · ΔW (zero when the module is absent)."""
    return inp.strength(name) * dense(inp.lora.modules[name]) if name in inp.lora.modules else None


def names_of(inputs):
    return sorted({n for i in inputs for n in i.lora.modules})


def assert_close(got, want, rel=2e-5):
    err = float((got - want).norm())
    assert err <= rel * max(float(want.norm()), 1e-30), (err, float(want.norm()))


# ---- inner products ------------------------------------------------------------------------------

def test_inner_products_norms_cosines_match_dense():
    a, b = pair_of_loras(correlated=0.7)
    for name in set(a.modules) & set(b.modules):
        ma, mb = a.modules[name], b.modules[name]
        pa, pb = inner.scaled_pair(ma, 0.8), inner.scaled_pair(mb, -1.3)
        da, db = 0.8 * dense(ma).flatten(), -1.3 * dense(mb).flatten()
        g = inner.gram([pa, pb])
        assert math.isclose(inner.inner(pa, pb), float(da @ db), rel_tol=1e-10)
        assert math.isclose(inner.frobenius_norm(pa), float(da.norm()), rel_tol=1e-10)
        assert math.isclose(inner.cosine(g, 0, 1), float(da @ db / (da.norm() * db.norm())), rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(inner.projection_coefficient(g, onto=0, of=1), float(da @ db / (da @ da)), rel_tol=1e-9)
        want = float(torch.linalg.matrix_norm(0.8 * dense(ma), ord=2))
        assert math.isclose(inner.spectral_norm(pa), want, rel_tol=1e-9)


def test_absent_and_zero_updates():
    a, _ = pair_of_loras()
    pa = inner.scaled_pair(next(iter(a.modules.values())))
    zero = (torch.zeros(pa[0].shape, dtype=torch.float64), pa[1])
    g = inner.gram([pa, None, zero])
    assert g[1].abs().sum() == 0 and g[2, 2] == 0
    assert inner.cosine(g, 0, 1) is None and inner.cosine(g, 0, 2) is None
    assert inner.projection_coefficient(g, onto=1, of=0) == 0.0


# ---- linear methods --------------------------------------------------------------------------------

def dense_slerp(x, y, t):
    """Slerp on flattened matrices, as written in the literature (Shoemake 1985), lerp when collinear."""
    if x is None or y is None:
        x = torch.zeros_like(y) if x is None else x
        y = torch.zeros_like(x) if y is None else y
        return (1 - t) * x + t * y
    fx, fy = x.flatten(), y.flatten()
    cos = float(fx @ fy / (fx.norm() * fy.norm()))
    if abs(cos) > 0.9995:
        return (1 - t) * x + t * y
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta) * x + math.sin(t * theta) / math.sin(theta) * y


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("mode", ["concat", "svd"])
def test_slerp_matches_dense(t, mode):
    a, b = pair_of_loras(correlated=0.5)
    inputs = [MergeInput(a, unet=0.9, te=0.4), MergeInput(b, unet=-1.2)]
    got, result = outputs(inputs, MethodSpec("slerp", t=t), mode=mode, rank=8)
    for name in names_of(inputs):
        want = dense_slerp(tagged(inputs[0], name), tagged(inputs[1], name), t)
        if float(want.norm()) == 0:
            assert name not in got
            continue
        assert_close(got[name], want)
    assert any("slerp (t = " in n for n in result.report.notes)


def test_slerp_of_a_lora_with_itself_is_lerp():
    a, _ = pair_of_loras()
    inputs = [MergeInput(a, unet=1.0), MergeInput(a, unet=3.0)]
    got, _ = outputs(inputs, MethodSpec("slerp", t=0.25))
    for name in a.modules:
        assert_close(got[name], (0.75 * 1.0 + 0.25 * 3.0) * dense(a.modules[name]))


@pytest.mark.parametrize("mode", ["concat", "svd"])
def test_perpendicular_matches_dense(mode):
    a, b = pair_of_loras(correlated=0.8)
    inputs = [MergeInput(a, unet=0.7), MergeInput(b, unet=1.1, te=0.5)]
    got, _ = outputs(inputs, MethodSpec("perpendicular"), mode=mode, rank=8)
    for name in names_of(inputs):
        x, y = tagged(inputs[0], name), tagged(inputs[1], name)
        if x is None:
            want = y
        elif y is None:
            want = x
        else:
            fx, fy = x.flatten(), y.flatten()
            want = x + (y - float(fy @ fx / (fx @ fx)) * x)
            residual = got[name] - x  # what was added is orthogonal to the base
            assert abs(float(residual.flatten() @ fx)) <= 1e-5 * float(residual.norm() * fx.norm())
        assert_close(got[name], want)


@pytest.mark.parametrize("kind", ["frobenius", "spectral"])
@pytest.mark.parametrize("target", ["mean", "max", "min", 0.05])
def test_norm_matches_dense(kind, target):
    a, b = pair_of_loras()
    inputs = [MergeInput(a, unet=0.6), MergeInput(b, unet=1.5)]
    got, _ = outputs(inputs, MethodSpec("norm", norm_kind=kind, norm_target=target))

    def norm(m):
        return float(torch.linalg.matrix_norm(m, ord="fro" if kind == "frobenius" else 2))

    for name in names_of(inputs):
        present = [(i, dense(i.lora.modules[name])) for i in inputs if name in i.lora.modules]
        norms = [norm(w) for _, w in present]
        tau = target if not isinstance(target, str) else {"mean": sum(norms) / len(norms), "max": max(norms),
                                                          "min": min(norms)}[target]
        want = sum(i.strength(name) * tau / n * w for (i, w), n in zip(present, norms, strict=True))
        assert_close(got[name], want)


def test_linear_methods_verify_and_record_their_coefficients(tmp_path):
    a, b = pair_of_loras(correlated=0.5)
    paths = [write_kohya(tmp_path / f"{x.name}.safetensors", list(x.modules.values())) for x in (a, b)]
    for spec in (MethodSpec("slerp", t=0.3), MethodSpec("perpendicular"), MethodSpec("norm", norm_kind="spectral")):
        inputs = [MergeInput(read_lora(p, lazy=True), unet=0.8) for p in paths]
        out = tmp_path / f"{spec.name}.safetensors"
        job = merge_to_file(inputs, MergeOptions(mode="svd", rank=4, method=spec), out, verify=True)
        assert job.report.verification.ok, job.report.verification.summary()
        recipe = json.loads(job.metadata[RECIPE_KEY])
        assert recipe["method"] == spec.name
        assert MethodSpec.from_recipe(recipe) == spec


# ---- TIES / DARE in the aligned core space -------------------------------------------------------------

def dense_ties(stack, density):
    """TIES-merging (Yadav et al. 2023) on stacked tensors, written out here: trim, elect, disjoint mean."""
    n = stack.shape[0]
    flat = stack.reshape(n, -1)
    k = math.ceil(density * flat.shape[1])
    trimmed = torch.zeros_like(flat)
    for i in range(n):
        order = flat[i].abs().argsort(descending=True)[:k]
        trimmed[i, order] = flat[i, order]
    sign = trimmed.sum(0).sign()
    total = torch.zeros(flat.shape[1], dtype=flat.dtype)
    count = torch.zeros(flat.shape[1], dtype=flat.dtype)
    for i in range(n):
        agree = (trimmed[i].sign() == sign) & (trimmed[i] != 0)
        total += torch.where(agree, trimmed[i], torch.zeros_like(total))
        count += agree.to(flat.dtype)
    return (total / count.clamp(min=1)).reshape(stack.shape[1:])


def dense_dare(stack, density, seed, name):
    """DARE (Yu et al. 2024): keep with probability density, rescale, sum; the mask as the README defines it."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF)
    mask = torch.rand(stack.shape, generator=g, dtype=stack.dtype) < density
    return (stack * mask).sum(0) / density


def best_rank(w, k):
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :k] * s[:k] @ vh[:k]


def aligned_reference(updates, rule, rank=7, right_rank=None):
    """The aligned definition densely: the joint basis (left singular vectors of [A₁ … Aₙ], right ones
    of [A₁; …; Aₙ], the top R = Σrᵢ (7 for core_inputs) of each), each update's coordinates there, the
    rule, back."""
    u = torch.linalg.svd(torch.cat(updates, 1), full_matrices=False).U[:, :rank]
    v = torch.linalg.svd(torch.cat(updates, 0), full_matrices=False).Vh[:right_rank or rank].T
    coords = torch.stack([u.T @ w @ v for w in updates])
    return u @ rule(coords) @ v.T


def core_inputs():
    """Two SD1 LoRAs sharing linear and conv modules, ranks 4 and 3, correlated (so signs conflict)."""
    only = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q|down_blocks_0_resnets_0_conv1|layers_0_self_attn_q"
    a = make_modules("sd1", scope="locon", rank=4, alpha=2.0, seed=1, only=only, width_divisor=4)
    b = make_modules("sd1", scope="locon", rank=3, alpha=3.0, seed=2, only=only, width_divisor=4)
    b = [LoraModule(m.name, m.up - 0.6 * x.up[:, :3], m.down + 0.6 * x.down[:3], m.alpha) for m, x in zip(b, a, strict=True)]
    return [MergeInput(lora(a, "a"), unet=0.9), MergeInput(lora(b, "b"), unet=1.2, te=0.7)]


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("rank", [7, 3])
def test_core_ties_matches_the_dense_aligned_definition(density, rank):
    inputs = core_inputs()
    got, result = outputs(inputs, MethodSpec("ties", density=density), mode="svd", rank=rank)
    for name in names_of(inputs):
        updates = [tagged(i, name) for i in inputs]
        want = best_rank(aligned_reference(updates, lambda c: dense_ties(c, density)), rank)
        assert_close(got[name], want, rel=1e-5)
    assert any("TIES (density" in n for n in result.report.notes)


def test_core_ties_at_full_density_with_equal_signs_is_not_the_sum_but_the_mean():
    # TIES' disjoint mean averages the entries that agree: one LoRA twice gives that LoRA, not twice it
    inputs = core_inputs()[:1] * 2
    got, _ = outputs(inputs, MethodSpec("ties", density=1.0), mode="svd", rank=8)
    for name in names_of(inputs):
        assert_close(got[name], tagged(inputs[0], name), rel=1e-5)


@pytest.mark.parametrize("density", [0.3, 0.9])
def test_core_dare_matches_the_dense_aligned_definition_and_its_seed(density):
    inputs = core_inputs()
    spec = MethodSpec("dare", density=density, seed=1234)
    got, _ = outputs(inputs, spec, mode="svd", rank=7)
    for name in names_of(inputs):
        updates = [tagged(i, name) for i in inputs]
        want = aligned_reference(updates, lambda c, name=name: dense_dare(c, density, 1234, name))
        assert_close(got[name], want, rel=1e-5)
    again, _ = outputs(inputs, MethodSpec("dare", density=density, seed=1234), mode="svd", rank=7)
    other, _ = outputs(inputs, MethodSpec("dare", density=density, seed=99), mode="svd", rank=7)
    assert all(torch.equal(got[n], again[n]) for n in got)
    assert any(not torch.allclose(got[n], other[n]) for n in got)


def test_dare_draws_and_records_a_seed_when_none_is_given():
    spec = MethodSpec("dare")
    assert isinstance(spec.seed, int) and spec.density == 0.5
    assert spec.recipe() == {"method": "dare", "method_options": {"density": 0.5, "seed": spec.seed}}
    assert MethodSpec("ties").recipe() == {"method": "ties", "method_options": {"density": 0.2}}


# ---- dense TIES / DARE ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ties-dense", "dare-dense"])
def test_dense_methods_match_elementwise_definitions(method):
    inputs = core_inputs()
    spec = MethodSpec(method, density=0.4, seed=7)
    got, _ = outputs(inputs, spec, mode="svd", rank=5)
    for name in names_of(inputs):
        stack = torch.stack([tagged(i, name) for i in inputs]).float()
        merged = dense_ties(stack, 0.4) if method == "ties-dense" else dense_dare(stack, 0.4, 7, name)
        assert_close(got[name], best_rank(merged.double(), 5), rel=2e-4)


def test_ties_and_dare_verify_against_their_own_exact_result(tmp_path):
    paths = [write_kohya(tmp_path / f"{i.lora.name}.safetensors", list(i.lora.modules.values())) for i in core_inputs()]
    for spec in (MethodSpec("ties"), MethodSpec("dare", seed=3), MethodSpec("ties-dense")):
        inputs = [MergeInput(read_lora(p, lazy=True)) for p in paths]
        job = merge_to_file(inputs, MergeOptions(rank=3, method=spec), tmp_path / f"{spec.name}.safetensors",
                            verify=True)
        assert job.report.verification.ok, job.report.verification.summary()


# ---- the sum is unchanged; bad input ---------------------------------------------------------------------

def test_sum_method_is_the_plain_merge():
    a, b = pair_of_loras()
    inputs = [MergeInput(a, unet=0.7), MergeInput(b, unet=-0.4)]
    for mode in ("concat", "svd"):
        plain = merge_loras(inputs, MergeOptions(mode=mode, rank=4)).modules
        summed = merge_loras(inputs, MergeOptions(mode=mode, rank=4, method=MethodSpec("sum"))).modules
        assert [m.name for m in plain] == [m.name for m in summed]
        for x, y in zip(plain, summed, strict=True):
            assert torch.equal(x.up, y.up) and torch.equal(x.down, y.down) and x.alpha == y.alpha
    assert MethodSpec("sum").recipe() == {}


@pytest.mark.parametrize("spec, mode, n, message", [
    (MethodSpec("slerp"), "svd", 3, "exactly two"),
    (MethodSpec("slerp", t=1.5), "svd", 2, "t must be in [0, 1]"),
    (MethodSpec("slerp", t=float("nan")), "svd", 2, "finite"),
    (MethodSpec("perpendicular"), "svd", 1, "at least two"),
    (MethodSpec("karcher"), "svd", 1, "two or more"),
    (MethodSpec("norm", norm_target="loud"), "svd", 2, "norm target"),
    (MethodSpec("norm", norm_target=-1.0), "svd", 2, "positive"),
    (MethodSpec("ties", density=0.0), "svd", 2, "density"),
    (MethodSpec("ties"), "concat", 2, "--mode svd"),
    (MethodSpec("bogus"), "svd", 2, "unknown method"),
])
def test_bad_method_parameters_are_one_clear_error(spec, mode, n, message):
    with pytest.raises(LoraMergeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        spec.validate(mode, n)


def test_gram_of_several_inputs_with_an_absent_one_matches_dense():
    a, b = pair_of_loras(correlated=0.4)
    name = next(n for n in a.modules if n in b.modules and a.modules[n].mid is None)
    modules = [a.modules[name], None, b.modules[name], a.modules[name]]
    weights = [0.5, 1.0, -2.0, 1.5]
    pairs = [None if m is None else inner.scaled_pair(m, w) for m, w in zip(modules, weights, strict=True)]
    flat = [None if m is None else w * dense(m).flatten() for m, w in zip(modules, weights, strict=True)]
    g = inner.gram(pairs)
    for i in range(4):
        for j in range(4):
            want = 0.0 if flat[i] is None or flat[j] is None else float(flat[i] @ flat[j])
            assert math.isclose(float(g[i, j]), want, rel_tol=1e-10, abs_tol=1e-14)


def dense_karcher(vectors, steps=200):
    """The Karcher mean on the unit sphere of flattened vectors (Buss & Fillmore 2001's fixed point),
    at the mean norm; written out here on the dense vectors themselves."""
    norms = [float(v.norm()) for v in vectors]
    units = [v / n for v, n in zip(vectors, norms, strict=True)]
    x = sum(units) / len(units)
    x = x / x.norm()
    for _ in range(steps):
        logs = []
        for u in units:
            cos = max(-1.0, min(1.0, float(x @ u)))
            theta = math.acos(cos)
            logs.append((u - cos * x) * (theta / math.sin(theta) if theta > 1e-12 else 1.0))
        step = sum(logs) / len(logs)
        size = float(step.norm())
        if size < 1e-14:
            break
        x = math.cos(size) * x + math.sin(size) * step / size
        x = x / x.norm()
    return sum(norms) / len(norms) * x


@pytest.mark.parametrize("n", [2, 3])
def test_karcher_matches_a_dense_karcher_mean(n):
    a, b = pair_of_loras(correlated=0.6)
    c = lora(make_modules("sd1", scope="locon", rank=2, alpha=1.0, seed=5, only=ONLY_A), "c")
    inputs = [MergeInput(a, unet=0.9), MergeInput(b, unet=1.3), MergeInput(c, unet=-0.7)][:n]
    got, _ = outputs(inputs, MethodSpec("karcher"))
    for name in names_of(inputs):
        present = [tagged(i, name) for i in inputs if name in i.lora.modules]
        shape = present[0].shape
        want = dense_karcher([w.flatten() for w in present]).reshape(shape)
        assert_close(got[name], want, rel=1e-6)
    if n == 2:  # two inputs: the bisector of their directions, at the mean norm
        for name in set(a.modules) & set(b.modules):
            x, y = (tagged(i, name).flatten() for i in inputs)
            bisector = x / x.norm() + y / y.norm()
            want = (x.norm() + y.norm()) / 2 * bisector / bisector.norm()
            assert_close(got[name].flatten(), want, rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", [MethodSpec("slerp", t=0.3), MethodSpec("karcher"), MethodSpec("norm", norm_kind="spectral"),
                                  MethodSpec("ties"), MethodSpec("dare", seed=4), MethodSpec("ties-dense"),
                                  MethodSpec("dare-dense", seed=4)])
def test_methods_on_cuda_agree_with_the_cpu(spec):
    inputs = core_inputs()
    on_cpu, _ = outputs(inputs, spec, mode="svd", rank=5)
    on_cuda = {m.name: dense(m) for m in merge_loras(inputs, MergeOptions(rank=5, dtype=F32, device="cuda",
                                                                           method=spec)).modules}
    assert on_cpu.keys() == on_cuda.keys()
    for name in on_cpu:
        assert_close(on_cuda[name], on_cpu[name], rel=1e-4)


# ---- LyCORIS inputs (LoKr, LoHa, Tucker LoCon) through their exact factor forms ------------------------------

def lycoris_updates(inputs, parts, name):
    """Each input's tagged ΔW of one module from A1111's own formulas (test_lycoris), None where absent."""
    from test_lycoris import SHAPES, a1111_delta

    return [inp.strength(name) * a1111_delta(parts[inp.lora.name][name], SHAPES[name]).reshape(SHAPES[name][0], -1)
            if name in parts[inp.lora.name] else None for inp in inputs]


def test_lycoris_inputs_slerp_and_core_ties(tmp_path):
    from synth import write_tensors
    from test_lycoris import SHAPES, loha_parts, lokr_parts, lora_parts

    parts = {"lokr": lokr_parts(), "loha": loha_parts(), "lora": lora_parts()}
    inputs = []
    for key, strength in (("lokr", 0.8), ("loha", -1.1), ("lora", 0.6)):
        model = read_lora(write_tensors(tmp_path / f"{key}.safetensors", parts[key]), lazy=True)
        model.path = Path(key)  # input names match the parts' keys
        inputs.append(MergeInput(model, unet=strength))
    got, _ = outputs(inputs[:2], MethodSpec("slerp", t=0.4))
    for name in SHAPES:
        a, b = lycoris_updates(inputs[:2], parts, name)
        assert_close(got[name], dense_slerp(a, b, 0.4), rel=1e-5)
    got, _ = outputs(inputs, MethodSpec("ties", density=0.3), mode="svd", rank=512)
    for name in SHAPES:
        updates = [w for w in lycoris_updates(inputs, parts, name) if w is not None]
        spans = [int(torch.linalg.matrix_rank(torch.cat(updates, axis))) for axis in (1, 0)]
        want = aligned_reference(updates, lambda c: dense_ties(c, 0.3), *spans)
        assert_close(got[name], want, rel=1e-5)


@pytest.mark.parametrize("spec", [MethodSpec("slerp"), MethodSpec("ties")])
def test_a_module_of_another_shape_is_refused_naming_it(spec):
    a, _ = pair_of_loras()
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    other = LoraModule(name, torch.randn(320, 2), torch.randn(2, 640), 1.0)
    inputs = [MergeInput(a), MergeInput(lora([other], "o"))]
    with pytest.raises(LoraMergeError, match="not the same layer") as e:
        merge_loras(inputs, MergeOptions(method=spec))
    assert e.value.module == name
