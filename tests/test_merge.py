"""Merge semantics: concat exact, svd optimal, add = the seed's formula; strengths as in A1111."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from synth import assert_same_delta, make_modules, write_kohya

from lib_loramerge.errors import LoraMergeError
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.jobs import RECIPE_KEY, merge_to_file
from lib_loramerge.model import LoraModel, LoraModule
from lib_loramerge.ops.merge import MergeInput, MergeOptions, merge_loras

F32 = torch.float32


def lora(modules, arch="sd1", name="x"):
    from pathlib import Path
    return LoraModel(modules={m.name: m for m in modules}, arch=arch, path=Path(f"{name}.safetensors"))


def dense(module: LoraModule) -> torch.Tensor:
    """A1111's ΔW at strength 1, in float64, written out independently of the library."""
    up = module.up.double().reshape(module.up.shape[0], -1)
    down = module.down.double()
    if module.mid is not None:
        mid = module.mid.double()
        w = torch.einsum("nmkl,in,mj->ijkl", mid, up, down.reshape(down.shape[0], -1))
        return w.reshape(w.shape[0], -1) * (module.alpha / down.shape[0] if module.alpha is not None else 1.0)
    scale = module.alpha / down.shape[0] if module.alpha is not None else 1.0
    return scale * up @ down.reshape(down.shape[0], -1)


def target(inputs, name):
    total = None
    for inp in inputs:
        if name in inp.lora.modules:
            part = inp.strength(name) * dense(inp.lora.modules[name])
            total = part if total is None else total + part
    return total


def mixed_loras():
    """Two SD1 LoCons with different ranks/alphas, every module kind, some modules on one side only."""
    a = make_modules("sd1", scope="locon", rank=4, alpha=2.0, seed=1, only="down_blocks_0|mid_block_attentions_0_proj|layers_0_")
    b = make_modules("sd1", scope="locon", rank=3, alpha=3.0, seed=2, only="down_blocks_0|up_blocks_3_attentions_0|layers_0_")
    g = torch.Generator().manual_seed(9)  # a Tucker LoCon module in a, where b has a plain one
    name = "lora_unet_down_blocks_0_resnets_1_conv2"
    a = [m for m in a if m.name != name]
    a.append(LoraModule(name, torch.randn(320, 2, 1, 1, generator=g) * .1, torch.randn(2, 320, 1, 1, generator=g) * .1,
                        alpha=1.0, mid=torch.randn(2, 2, 3, 3, generator=g)))
    return lora(a, name="a"), lora(b, name="b")


def check_against_target(inputs, modules, atol=1e-5):
    out = {m.name: m for m in modules}
    names = {n for i in inputs for n in i.lora.modules}
    assert set(out) <= names
    for name in names:
        want = target(inputs, name)
        if name not in out:
            assert float(want.abs().max()) == 0.0, name
            continue
        assert_same_delta(dense(out[name]), want, rel=atol, label=name)


@pytest.mark.parametrize("unet,te", [(1.0, None), (0.7, -0.4), (-1.3, 0.5)])
def test_concat_is_exact_for_every_kind(unet, te):
    a, b = mixed_loras()
    inputs = [MergeInput(a, unet=unet, te=te), MergeInput(b, unet=0.5, te=1.5)]
    result = merge_loras(inputs, MergeOptions(mode="concat", dtype=F32))
    kinds = {m.kind for m in result.modules}
    assert kinds == {"linear", "conv1x1", "conv"}
    check_against_target(inputs, result.modules)
    both = result.modules[[m.name for m in result.modules].index("lora_unet_down_blocks_0_resnets_0_conv1")]
    assert both.rank == 7 and both.alpha == 7.0 and both.down.shape == (7, 320, 3, 3) and both.up.shape == (320, 7, 1, 1)


def test_one_sided_modules_keep_their_own_alpha():
    a, b = mixed_loras()
    inputs = [MergeInput(a, unet=-0.81), MergeInput(b)]
    result = merge_loras(inputs, MergeOptions(mode="concat", dtype=F32))
    out = {m.name: m for m in result.modules}
    only_a = "lora_unet_mid_block_attentions_0_proj_in"
    assert only_a not in b.modules
    m = out[only_a]
    assert m.alpha == 2.0 and m.rank == 4
    src = a.modules[only_a]
    torch.testing.assert_close(m.up, -0.9 * src.up)  # sign on up, √|s| on both factors
    torch.testing.assert_close(m.down, 0.9 * src.down)


def test_svd_equals_dense_truncated_svd():
    a, b = mixed_loras()
    inputs = [MergeInput(a, unet=0.8, te=-0.6), MergeInput(b, unet=1.1)]
    k = 5
    result = merge_loras(inputs, MergeOptions(mode="svd", rank=k, dtype=F32))
    out = {m.name: m for m in result.modules}
    for name, module in out.items():
        want = target(inputs, name)
        u, s, vh = torch.linalg.svd(want, full_matrices=False)  # the dense route (in float64)
        kk = min(k, int((s > s[0] * 1e-9).sum()))
        best = (u[:, :kk] * s[:kk]) @ vh[:kk]
        got = dense(module)
        assert module.rank == kk and module.alpha == kk
        assert torch.allclose(got, best, atol=1e-5, rtol=1e-4), name
        err = float(torch.linalg.norm(want - got) ** 2)
        optimal = float((s[kk:] ** 2).sum())  # Eckart–Young: no rank-k matrix does better
        assert err <= optimal * (1 + 1e-4) + 1e-9 * float(want.norm() ** 2)
        assert result.report.energy[name] == pytest.approx(float((s[:kk] ** 2).sum() / (s ** 2).sum()), rel=1e-5)


def test_svd_of_one_lora_is_a_resize_and_full_rank_is_exact():
    a, _ = mixed_loras()
    inputs = [MergeInput(a, unet=1.0)]
    check_against_target(inputs, merge_loras(inputs, MergeOptions(mode="svd", rank=64, dtype=F32)).modules)
    small = merge_loras(inputs, MergeOptions(mode="svd", rank=2, dtype=F32))
    assert {m.rank for m in small.modules} == {2}


def test_threshold_picks_the_smallest_rank_keeping_that_energy():
    # a 6×6 layer with known singular values 4, 2, 1, 0.5 (energies 16, 4, 1, .25 of 21.25)
    q1, _ = torch.linalg.qr(torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    s = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    m = LoraModule("lora_unet_x", (q1 * s).float(), q2.T.float(), alpha=4.0)
    cases = {0.75: 1, 0.76: 2, 20 / 21.25: 2, 0.95: 3, 0.99: 4, 1.0: 4}
    for t, k in cases.items():
        result = merge_loras([MergeInput(lora([m]))], MergeOptions(mode="svd", threshold=t, dtype=F32))
        assert result.modules[0].rank == k, t
    capped = merge_loras([MergeInput(lora([m]))], MergeOptions(mode="svd", threshold=0.99, rank=2, dtype=F32))
    assert capped.modules[0].rank == 2


def test_rank_is_capped_by_narrow_layers():
    g = torch.Generator().manual_seed(4)
    narrow = [LoraModule("lora_unet_narrow", torch.randn(3, 4, generator=g), torch.randn(4, 16, generator=g), 4.0)]
    other = [LoraModule("lora_unet_narrow", torch.randn(3, 4, generator=g), torch.randn(4, 16, generator=g), 4.0)]
    inputs = [MergeInput(lora(narrow)), MergeInput(lora(other, name="y"))]
    result = merge_loras(inputs, MergeOptions(mode="svd", rank=32, dtype=F32))
    assert result.modules[0].rank == 3 and result.modules[0].up.shape == (3, 3)
    check_against_target(inputs, result.modules)


def test_add_matches_the_seed_formula():
    g = torch.Generator().manual_seed(5)
    r, a1, a2, s1, s2 = 4, 2.0, 8.0, 0.7, -0.4
    u1, d1, u2, d2 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((10, r), (r, 12), (10, r), (r, 12)))
    m1 = LoraModule("lora_unet_m", u1.float(), d1.float(), a1)
    m2 = LoraModule("lora_unet_m", u2.float(), d2.float(), a2)
    inputs = [MergeInput(lora([m1]), unet=s1), MergeInput(lora([m2], name="y"), unet=s2)]
    out = merge_loras(inputs, MergeOptions(mode="add", dtype=F32)).modules[0]
    # seed-reference.md §3.4: (1/r)[α1 s1|s1| U1D1 + √(α1α2)(s1|s2| U1D2 + s2|s1| U2D1) + α2 s2|s2| U2D2]
    seed = (a1 * s1 * abs(s1) * u1 @ d1 + math.sqrt(a1 * a2) * (s1 * abs(s2) * u1 @ d2 + s2 * abs(s1) * u2 @ d1)
            + a2 * s2 * abs(s2) * u2 @ d2) / r
    torch.testing.assert_close(dense(out), seed, atol=1e-5, rtol=1e-5)
    assert out.alpha == a1


def test_add_of_a_lora_with_itself_is_exact_when_strengths_sum_to_one():
    a, _ = mixed_loras()
    inputs = [MergeInput(a, unet=0.3), MergeInput(a, unet=0.7)]
    result = merge_loras(inputs, MergeOptions(mode="add", dtype=F32))
    check_against_target([MergeInput(a, unet=1.0)], result.modules)


def test_add_refuses_unequal_ranks_naming_module_and_ranks():
    a, b = mixed_loras()
    with pytest.raises(LoraMergeError) as e:
        merge_loras([MergeInput(a), MergeInput(b)], MergeOptions(mode="add"))
    msg = str(e.value)
    assert "rank 4 in a" in msg and "rank 3 in b" in msg and "concat" in msg and "svd" in msg
    assert msg.startswith("lora_")


def test_zero_strengths_drop_modules():
    a, b = mixed_loras()
    inputs = [MergeInput(a, unet=0.0, te=1.0), MergeInput(b, unet=0.0, te=0.0)]
    result = merge_loras(inputs, MergeOptions(mode="concat", dtype=F32))
    assert all(m.name.startswith("lora_te") for m in result.modules)
    assert {m.name for m in result.modules} == {n for n in a.modules if n.startswith("lora_te")}
    assert len(result.report.dropped) == len({*a.modules, *b.modules}) - len(result.modules)
    check_against_target(inputs, result.modules)


def test_negative_strength_subtracts():
    a, _ = mixed_loras()
    inputs = [MergeInput(a, unet=1.0), MergeInput(a, unet=-1.0)]
    for mode in ("concat", "svd"):
        result = merge_loras(inputs, MergeOptions(mode=mode, dtype=F32))
        for m in result.modules:
            assert float(dense(m).abs().max()) < 1e-5
    svd = merge_loras(inputs, MergeOptions(mode="svd", dtype=F32))
    assert svd.modules == []  # exactly cancelling modules are dropped as zero
    assert {why for _, why in svd.report.dropped} == {"ΔW is zero"} and len(svd.report.dropped) == len(a.modules)


@pytest.mark.parametrize("first_conv", [True, False])
def test_linear_and_1x1_conv_are_reconciled_either_way(first_conv):
    g = torch.Generator().manual_seed(6)
    lin = LoraModule("lora_unet_down_blocks_0_attentions_0_proj_in", torch.randn(320, 2, generator=g),
                     torch.randn(2, 320, generator=g), 2.0)
    conv = LoraModule(lin.name, torch.randn(320, 3, 1, 1, generator=g), torch.randn(3, 320, 1, 1, generator=g), 1.0)
    pair = [conv, lin] if first_conv else [lin, conv]
    inputs = [MergeInput(lora([pair[0]])), MergeInput(lora([pair[1]], name="y"), unet=0.5)]
    for mode in ("concat", "svd"):
        result = merge_loras(inputs, MergeOptions(mode=mode, rank=8 if mode == "svd" else None, dtype=F32))
        assert result.modules[0].up.ndim == (4 if first_conv else 2)
        check_against_target(inputs, result.modules)
    assert any("reconciled" in n for n in result.report.notes)


def test_incompatible_shapes_name_the_module():
    a = LoraModule("lora_unet_m", torch.ones(4, 1), torch.ones(1, 8), 1.0)
    b = LoraModule("lora_unet_m", torch.ones(4, 1), torch.ones(1, 6), 1.0)
    with pytest.raises(LoraMergeError, match=r"lora_unet_m: shape \[4, 8\] in x but \[4, 6\] in y"):
        merge_loras([MergeInput(lora([a])), MergeInput(lora([b], name="y"))], MergeOptions(mode="concat"))


def test_different_architectures_fail_before_any_work():
    sd1 = lora(make_modules("sd1", scope="attention", only="attn1_to_q"), "sd1", "one")
    xl = lora(make_modules("sdxl", scope="attention", only="attn1_to_q"), "sdxl", "two")
    calls = []
    with pytest.raises(LoraMergeError, match="different models.*one is sd1, two is sdxl"):
        merge_loras([MergeInput(sd1), MergeInput(xl)], MergeOptions(), progress=lambda *a: calls.append(a))
    assert calls == []


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_output(tmp_path, dtype, tol):
    a, b = mixed_loras()
    inputs = [MergeInput(a, unet=0.9), MergeInput(b, unet=1.2)]
    job = merge_to_file(inputs, MergeOptions(mode="svd", rank=7, dtype=dtype), tmp_path / "h.safetensors")
    back = read_lora(job.path)
    exact = {m.name: m for m in merge_loras(inputs, MergeOptions(mode="svd", rank=7, dtype=F32)).modules}
    for name, m in back.modules.items():
        assert m.up.dtype == dtype
        want = dense(exact[name])
        assert float((dense(m) - want).norm() / want.norm()) < tol, name


def test_output_reads_back_with_the_same_delta_and_a_recipe(tmp_path):
    a, b = mixed_loras()
    pa = write_kohya(tmp_path / "a.safetensors", list(a.modules.values()))
    pb = write_kohya(tmp_path / "b.safetensors", list(b.modules.values()))
    la, lb = read_lora(pa), read_lora(pb)
    inputs = [MergeInput(la, unet=0.6, te=0.2), MergeInput(lb, unet=-0.3)]
    job = merge_to_file(inputs, MergeOptions(mode="concat", dtype=F32), tmp_path / "m.safetensors")
    back = read_lora(job.path)
    assert back.arch == "sd1"
    check_against_target(inputs, list(back.modules.values()))
    with safe_open(job.path, "pt") as f:
        recipe = json.loads(f.metadata()[RECIPE_KEY])
    assert recipe["mode"] == "concat" and [i["file"] for i in recipe["inputs"]] == ["a.safetensors", "b.safetensors"]
    assert recipe["inputs"][0]["unet"] == 0.6 and recipe["inputs"][0]["te"] == 0.2 and recipe["inputs"][1]["te"] == -0.3
    assert all(len(i["hash"]) == 64 for i in recipe["inputs"])


def test_svd_never_forms_the_dense_matrix():
    # a 200 000 × 200 000 layer: its dense ΔW would need 160 GB; the factors need 13 MB
    g = torch.Generator().manual_seed(7)
    n = 200_000
    parts = [LoraModule("lora_unet_huge", torch.randn(n, 4, generator=g), torch.randn(4, n, generator=g), 4.0)
             for _ in range(2)]
    inputs = [MergeInput(lora([parts[0]])), MergeInput(lora([parts[1]], name="y"), unet=-0.5)]
    result = merge_loras(inputs, MergeOptions(mode="svd", rank=8, dtype=F32))
    m = result.modules[0]
    assert m.up.shape == (n, 8) and m.down.shape == (8, n)
    # check on a random slice of the layer: rows 0..63 × columns 0..63 of ΔW, computed from the inputs
    want = parts[0].up[:64] @ parts[0].down[:, :64] - 0.5 * parts[1].up[:64] @ parts[1].down[:, :64]
    torch.testing.assert_close(m.up[:64] @ m.down[:, :64], want, atol=1e-3, rtol=1e-4)


def test_svd_of_dependent_inputs_uses_the_exact_rank():
    # the same LoRA twice: the stacked factors have rank 4, not 8 (the eigen route drops the rest)
    a, _ = mixed_loras()
    inputs = [MergeInput(a, unet=0.3, te=0.5), MergeInput(a, unet=0.7, te=0.5)]
    result = merge_loras(inputs, MergeOptions(mode="svd", rank=16, dtype=F32))
    check_against_target([MergeInput(a, unet=1.0)], result.modules)
    for m in result.modules:
        assert m.rank <= a.modules[m.name].rank
