"""LyCORIS LoHa / LoKr / DoRA: read (eagerly and lazily), merged exactly through factor forms, against A1111's formulas.

The reference ΔW of every module is written out here, in float64, straight from the file's
tensors, the way A1111 1.10's ``network_hada.py`` / ``network_lokr.py`` / ``lyco_helpers.py``
compute it — independently of the library's factor forms.
"""

import json
from pathlib import Path

import pytest
import torch
from synth import kohya_state_dict, make_modules, write_tensors

from lib_loramerge.cli import main
from lib_loramerge.errors import LoraMergeError
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.jobs import merge_to_file
from lib_loramerge.lycoris import DoraModule, LokrModule
from lib_loramerge.model import LoraModule
from lib_loramerge.ops.dora import apply_dora
from lib_loramerge.ops.merge import MergeInput, MergeOptions, merge_loras

F32 = torch.float32

# SD1 layers (kohya name → weight shape) covering linear, 1×1 conv and 3×3 conv
FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"
TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"
CONV1 = "lora_unet_down_blocks_0_resnets_0_conv1"
CONV2 = "lora_unet_down_blocks_0_resnets_0_conv2"
DOWN = "lora_unet_down_blocks_0_downsamplers_0_conv"
SHORTCUT = "lora_unet_down_blocks_1_resnets_0_conv_shortcut"
SHAPES = {FC1: (3072, 768), TO_K: (320, 768), PROJ_IN: (320, 320, 1, 1), CONV1: (320, 320, 3, 3),
          CONV2: (320, 320, 3, 3), DOWN: (320, 320, 3, 3), SHORTCUT: (640, 320, 1, 1)}


# ---- A1111 1.10, written out ---------------------------------------------------------------------

def make_weight_cp(t, wa, wb):  # lyco_helpers.make_weight_cp
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def rebuild_conventional(up, down, shape):  # lyco_helpers.rebuild_conventional
    return (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(shape)


def a1111_delta(parts: dict, layer_shape) -> torch.Tensor:
    """ΔW at multiplier 1 (calc_updown, then finalize_updown's reshape and scale), float64."""
    w = {k: v.double() for k, v in parts.items()}
    alpha = float(w["alpha"]) if "alpha" in w else None
    if "hada_w1_a" in w:  # network_hada.py
        w1a, w1b, w2a, w2b = w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"]
        dim = w1b.shape[0]
        if "hada_t1" in w:
            shape = [w1a.size(1), w1b.size(1), *w["hada_t1"].shape[2:]]
            up1 = make_weight_cp(w["hada_t1"], w1a, w1b)
        else:
            shape = [w1a.size(0), w1b.size(1), *w1b.shape[2:]]
            up1 = rebuild_conventional(w1a, w1b, shape)
        up2 = make_weight_cp(w["hada_t2"], w2a, w2b) if "hada_t2" in w else rebuild_conventional(w2a, w2b, shape)
        updown = up1 * up2
    elif any(k.startswith("lokr_") for k in w):  # network_lokr.py
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        if "lokr_w2" in w:
            w2 = w["lokr_w2"]
        elif "lokr_t2" in w:
            w2 = make_weight_cp(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
        else:
            w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
        dim = None
        if "lokr_w1_b" in w:
            dim = w["lokr_w1_b"].shape[0]
        if "lokr_w2_b" in w:
            dim = w["lokr_w2_b"].shape[0]
        if w2.ndim == 4:  # make_kron
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2)
    else:  # network_lora.py
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        dim = down.shape[0]
        if "lora_mid.weight" in w:  # lyco_helpers.rebuild_cp_decomposition (Tucker LoCon)
            updown = torch.einsum("n m k l, i n, m j -> i j k l", w["lora_mid.weight"], up.reshape(up.size(0), -1),
                                  down.reshape(dim, -1))
        else:
            updown = up.reshape(up.shape[0], -1) @ down.reshape(dim, -1)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return updown.reshape(layer_shape) * scale


# ---- fixtures ------------------------------------------------------------------------------------

def _rand(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g) * 0.3


def lokr_parts(seed=0) -> dict:
    r = _rand(seed)
    a = lambda x: torch.tensor(float(x))  # noqa: E731
    return {
        FC1: {"lokr_w1_a": r(48, 2), "lokr_w1_b": r(2, 24), "lokr_w2": r(64, 32), "alpha": a(1)},  # dim 2 (w1_b)
        TO_K: {"lokr_w1": r(16, 24), "lokr_w2_a": r(20, 4), "lokr_w2_b": r(4, 32), "alpha": a(2)},  # dim 4 (w2_b)
        PROJ_IN: {"lokr_w1_a": r(16, 4), "lokr_w1_b": r(4, 16), "lokr_w2_a": r(20, 4), "lokr_w2_b": r(4, 20),
                  "alpha": a(4)},  # flat (320, 320): SD1's 1×1 conv, known from the architecture
        CONV1: {"lokr_w1_a": r(16, 4), "lokr_w1_b": r(4, 20), "lokr_w2_a": r(20, 4), "lokr_w2_b": r(4, 144),
                "alpha": a(3)},  # flat (320, 2880) on a 3×3 conv
        CONV2: {"lokr_w1": r(16, 16), "lokr_w2": r(20, 20, 3, 3), "alpha": a(8)},  # both full: alpha ignored
        DOWN: {"lokr_w1_a": r(8, 2), "lokr_w1_b": r(2, 8), "lokr_t2": r(3, 3, 3, 3), "lokr_w2_a": r(3, 40),
               "lokr_w2_b": r(3, 40), "alpha": a(1.5)},  # CP core on w2
        SHORTCUT: {"lokr_w1": r(32, 16), "lokr_w2_a": r(20, 2), "lokr_w2_b": r(2, 20)},  # no alpha: scale 1
    }


def loha_parts(seed=1) -> dict:
    r = _rand(seed)
    a = lambda x: torch.tensor(float(x))  # noqa: E731
    return {
        FC1: {"hada_w1_a": r(3072, 4), "hada_w1_b": r(4, 768), "hada_w2_a": r(3072, 3), "hada_w2_b": r(3, 768),
              "alpha": a(2)},
        TO_K: {"hada_w1_a": r(320, 2), "hada_w1_b": r(2, 768), "hada_w2_a": r(320, 2), "hada_w2_b": r(2, 768)},
        PROJ_IN: {"hada_w1_a": r(320, 3), "hada_w1_b": r(3, 320), "hada_w2_a": r(320, 3), "hada_w2_b": r(3, 320),
                  "alpha": a(3)},
        CONV1: {"hada_w1_a": r(320, 3), "hada_w1_b": r(3, 2880), "hada_w2_a": r(320, 3), "hada_w2_b": r(3, 2880),
                "alpha": a(1.5)},  # flat w*_b on a 3×3 conv
        CONV2: {"hada_w1_a": r(320, 2), "hada_w1_b": r(2, 320, 3, 3), "hada_w2_a": r(320, 2),
                "hada_w2_b": r(2, 320, 3, 3), "alpha": a(1)},  # 4-D w*_b
        DOWN: {"hada_t1": r(3, 3, 3, 3), "hada_w1_a": r(3, 320), "hada_w1_b": r(3, 320), "hada_t2": r(2, 2, 3, 3),
               "hada_w2_a": r(2, 320), "hada_w2_b": r(2, 320), "alpha": a(3)},  # CP (Tucker) LoHa
    }


def lora_parts(seed=3) -> dict:
    mods = make_modules("sd1", scope="locon", rank=4, alpha=2.0, seed=seed,
                        only="|".join(f"^{n}$" for n in (FC1, TO_K, PROJ_IN, CONV1, SHORTCUT)))
    sd = kohya_state_dict(mods)
    parts = {m.name: {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(m.name + ".")} for m in mods}
    r = _rand(seed)
    parts[CONV2] = {"lora_up.weight": r(320, 3, 1, 1), "lora_mid.weight": r(3, 3, 3, 3),  # Tucker LoCon
                    "lora_down.weight": r(3, 320, 1, 1), "alpha": torch.tensor(1.5)}
    return parts


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lycoris")
    parts = {"lokr": lokr_parts(), "loha": loha_parts(), "lora": lora_parts()}
    paths = {k: write_tensors(tmp / f"{k}.safetensors", v) for k, v in parts.items()}
    return paths, parts


def reference(inputs: list[MergeInput], parts: dict[str, dict], name: str) -> torch.Tensor:
    """Σ strengthᵢ · A1111 ΔWᵢ for one module, flattened to (out, in·kh·kw)."""
    total = 0
    for inp in inputs:
        if name in parts[inp.lora.name]:
            total = total + inp.strength(name) * a1111_delta(parts[inp.lora.name][name], SHAPES[name])
    return total.reshape(SHAPES[name][0], -1)


def dense(module: LoraModule) -> torch.Tensor:
    """A written LoRA's ΔW, float64, flattened (A1111's LoRA formula)."""
    up, down = module.up.double(), module.down.double()
    return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1) * (module.alpha / down.shape[0])


# ---- reading -------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["lokr", "loha"])
@pytest.mark.parametrize("lazy", [False, True])
def test_delta_matches_a1111_for_every_variant(files, algo, lazy):
    paths, parts = files
    lora = read_lora(paths[algo], lazy=lazy)
    assert lora.arch == "sd1" and lora.format == "kohya" and set(lora.modules) == set(parts[algo])
    for name, module in lora.modules.items():
        assert module.weight_shape == SHAPES[name], name  # flat factors get the layer's shape
        assert module.is_lazy == lazy
        want = a1111_delta(parts[algo][name], SHAPES[name])
        got = module.delta(torch.float64)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


def test_scale_rank_and_exact_factor_form(files):
    paths, parts = files
    lokr = read_lora(paths["lokr"], lazy=True).modules
    # A1111's dim: w2_b's rank, else w1_b's; none (alpha ignored) when both sides are full
    assert {n: m.scale for n, m in lokr.items()} == {FC1: 0.5, TO_K: 0.5, PROJ_IN: 1.0, CONV1: 0.75, CONV2: 1.0,
                                                      DOWN: 0.5, SHORTCUT: 1.0}
    # rank of kron(W1, W2) = ρ1·ρ2 (a full side counts min(m, n))
    assert {n: m.rank for n, m in lokr.items()} == {FC1: 64, TO_K: 64, PROJ_IN: 16, CONV1: 16, CONV2: 320,
                                                     DOWN: 6, SHORTCUT: 32}
    loha = read_lora(paths["loha"]).modules
    assert {n: m.rank for n, m in loha.items()} == {FC1: 12, TO_K: 4, PROJ_IN: 9, CONV1: 9, CONV2: 4, DOWN: 6}
    assert loha[FC1].scale == 0.5 and loha[TO_K].scale == 1.0 and loha[DOWN].scale == 1.0
    for module in (*lokr.values(), *loha.values()):
        up, down = module.factor_matrices(torch.float64)
        out, width = SHAPES[module.name][0], torch.Size(SHAPES[module.name][1:]).numel()
        assert up.shape == (out, module.rank) and down.shape == (module.rank, width)
        parts_of = parts["lokr" if module.algo == "lokr" else "loha"][module.name]
        want = a1111_delta(parts_of, SHAPES[module.name]).reshape(out, -1)
        torch.testing.assert_close(module.scale * up @ down, want, rtol=1e-10, atol=1e-12)


def test_lazy_modules_read_their_tensors_only_when_used(tmp_path):
    parts = lokr_parts()
    parts[CONV1]["lokr_w2_b"][1, 7] = float("nan")
    path = write_tensors(tmp_path / "nan.safetensors", parts)
    lora = read_lora(path, lazy=True)  # shapes, ranks, kinds and scales come from the header
    m = lora.modules[CONV1]
    assert m.is_lazy and m.w2_b.is_meta and m.rank == 16 and m.kind == "conv" and m.scale == 0.75
    with pytest.raises(LoraMergeError, match=f"{CONV1}: lokr_w2_b holds NaN or Inf"):
        m.load()
    with pytest.raises(LoraMergeError, match=f"{CONV1}: lokr_w2_b holds NaN or Inf"):
        read_lora(path)
    assert not lora.modules[FC1].load().is_lazy


def test_info_reports_algorithms_and_effective_ranks(files, capsys):
    paths, _ = files
    assert main(["info", str(paths["lokr"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["algorithm"] == "LoKr" and info["algorithms"] == {"LoKr": 7} and info["arch"] == "sd1"
    assert info["modules_by_kind"] == {"linear": 2, "conv1x1": 2, "conv": 3}
    assert info["ranks"] == [2, 3, 4, 320]  # what the file declares (A1111's dim; full/full: the factor rank)
    assert info["effective_ranks"] == {"min": 6, "max": 320,
                                       "counts": {"6": 1, "16": 2, "32": 1, "64": 2, "320": 1}}
    assert main(["info", str(paths["lora"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["algorithm"] == "LoCon (Tucker)"  # linear and 1×1 LoRA, a 3×3 LoCon and a Tucker LoCon module
    assert info["algorithms"] == {"LoRA": 4, "LoCon": 1, "LoCon (Tucker)": 1}
    assert main(["info", str(paths["loha"])]) == 0
    text = capsys.readouterr().out
    assert "format:      kohya (LoHa)" in text and "effective:   4 ×2, 6 ×1, 9 ×2, 12 ×1" in text


@pytest.mark.parametrize("parts,message", [
    ({CONV1: {"lokr_w1": torch.ones(16, 20), "alpha": torch.tensor(1.0)}},
     f"{CONV1}: has alpha, lokr_w1 but no lokr_w2 (or lokr_w2_a and lokr_w2_b)"),
    ({CONV1: {"hada_w1_a": torch.ones(320, 2), "hada_w1_b": torch.ones(2, 2880)}},
     f"{CONV1}: has hada_w1_a, hada_w1_b but no hada_w2_a, hada_w2_b"),
    ({CONV1: {"hada_w1_a": torch.ones(320, 2), "hada_w1_b": torch.ones(2, 2880), "lokr_w1": torch.ones(2, 2),
              "lokr_w2": torch.ones(2, 2)}}, f"{CONV1}: mixes factors of different algorithms"),
    ({CONV1: {"hada_w1_a": torch.ones(320, 2), "hada_w1_b": torch.ones(2, 2880), "hada_w2_a": torch.ones(320, 2),
              "hada_w2_b": torch.ones(2, 320)}}, f"{CONV1}: hada_w1 gives [320, 2880] but hada_w2 gives [320, 320]"),
    ({CONV1: {"lokr_w1_a": torch.ones(16, 2), "lokr_w1_b": torch.ones(3, 20), "lokr_w2": torch.ones(20, 144)}},
     f"{CONV1}: lokr_w1 factors [16, 2] and [3, 20] do not fit"),
    ({CONV1: {"lokr_w1": torch.ones(16, 20), "lokr_w1_a": torch.ones(16, 2), "lokr_w1_b": torch.ones(2, 20),
              "lokr_w2": torch.ones(20, 144)}}, f"{CONV1}: has both lokr_w1 and lokr_w1_a/lokr_w1_b"),
    ({CONV1: {"dora_scale": torch.ones(1, 320)}, FC1: lokr_parts()[FC1]},
     f"{CONV1}: has dora_scale but no LoRA, LoHa or LoKr factors"),
])
def test_malformed_lycoris_modules_name_file_and_module(tmp_path, parts, message):
    path = write_tensors(tmp_path / "bad.safetensors", parts)
    with pytest.raises(LoraMergeError) as e:
        read_lora(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


# ---- merging -------------------------------------------------------------------------------------

def mixed_inputs(paths, lazy=True):
    lokr, loha, lora = (read_lora(paths[k], lazy=lazy) for k in ("lokr", "loha", "lora"))
    lokr.path, loha.path, lora.path = Path("lokr"), Path("loha"), Path("lora")  # names match the parts' keys
    half_resnets = lambda name: 0.5 if "resnets" in name else 1.0  # noqa: E731  (a block ratio)
    return [MergeInput(lokr, unet=0.8, te=-0.6), MergeInput(loha, unet=-1.2, te=0.4, block_ratio=half_resnets),
            MergeInput(lora, unet=0.7)]


def test_concat_of_lokr_loha_and_lora_is_exact(files):
    paths, parts = files
    inputs = mixed_inputs(paths)
    result = merge_loras(inputs, MergeOptions(mode="concat", dtype=F32))
    out = {m.name: m for m in result.modules}
    assert set(out) == set(SHAPES)
    for name, module in out.items():
        assert isinstance(module, LoraModule) and module.weight_shape == SHAPES[name]  # plain LoRA/LoCon, layer shape
        want = reference(inputs, parts, name)
        err = float((dense(module) - want).norm() / want.norm())
        assert err < 2e-6, (name, err)
    ranks = {n: m.rank for n, m in out.items()}
    assert ranks[CONV1] == 16 + 9 + 4 and ranks[DOWN] == 6 + 6 and ranks[CONV2] == 320 + 4 + 3
    notes = " ".join(result.report.notes)
    assert "lokr: LoKr ×7; loha: LoHa ×6" in notes and "plain LoRA/LoCon" in notes
    # declared ranks ≤ 4 except DOWN (3: 12 is not above 4×3) and CONV2 (full LoKr sides: 320)
    assert "concat: 5 modules have a rank above 4× their inputs' ranks (up to 80, e.g. " + FC1 in notes
    assert "--mode svd" in notes


def test_svd_of_mixed_inputs_is_the_optimal_rank_k(files):
    paths, parts = files
    inputs = mixed_inputs(paths)
    k = 8
    result = merge_loras(inputs, MergeOptions(mode="svd", rank=k, dtype=F32))
    out = {m.name: m for m in result.modules}
    assert set(out) == set(SHAPES)
    for name, module in out.items():
        want = reference(inputs, parts, name)
        s = torch.linalg.svdvals(want)
        assert module.rank == k and module.weight_shape == SHAPES[name]
        err = float(torch.linalg.norm(want - dense(module)) ** 2)
        optimal = float((s[k:] ** 2).sum())  # Eckart–Young: no rank-k matrix does better
        assert err <= optimal * (1 + 1e-4) + 1e-9 * float(s.square().sum()), name
        assert result.report.energy[name] == pytest.approx(float((s[:k] ** 2).sum() / (s ** 2).sum()), rel=1e-5)


def test_one_lokr_resizes_through_the_kronecker_svd(files, monkeypatch):
    paths, parts = files
    lora = read_lora(paths["lokr"], lazy=True)
    lora.path = Path("lokr")

    def no_stack(*_a, **_k):
        raise AssertionError("a lone LoKr must not be stacked into its rank r1·r2 factor form")

    monkeypatch.setattr(LokrModule, "factor_matrices", no_stack)
    k = 5
    inputs = [MergeInput(lora, unet=-0.9, te=1.3)]
    result = merge_loras(inputs, MergeOptions(mode="svd", rank=k, dtype=F32))
    for module in result.modules:
        want = reference(inputs, {"lokr": parts["lokr"]}, module.name)
        s = torch.linalg.svdvals(want)
        got = dense(module)
        err = float(torch.linalg.norm(want - got) ** 2)
        assert module.rank == k
        assert err <= float((s[k:] ** 2).sum()) * (1 + 1e-4) + 1e-9 * float(s.square().sum()), module.name
        # the kept singular values are the dense ones
        torch.testing.assert_close(torch.linalg.svdvals(got)[:k], s[:k], rtol=1e-5, atol=1e-7)
    # full rank is exact: a LoKr converts to a LoRA without loss
    exact = merge_loras(inputs, MergeOptions(mode="svd", dtype=F32))
    assert "largest LyCORIS factor rank (exact for one input; --rank or --threshold give a smaller file), 320" \
        in " ".join(exact.report.notes)
    for module in exact.modules:
        want = reference(inputs, {"lokr": parts["lokr"]}, module.name)
        assert float((dense(module) - want).norm() / want.norm()) < 2e-6, module.name


def test_default_rank_with_lycoris_inputs_is_the_largest_lora_rank(files):
    paths, _ = files
    inputs = mixed_inputs(paths)
    result = merge_loras(inputs, MergeOptions(mode="svd", dtype=F32))
    assert any("the largest LoRA/LoCon input rank (LyCORIS factor ranks not counted), 4" in n
               for n in result.report.notes)
    assert {m.rank for m in result.modules} == {4}


def test_lazy_and_eager_inputs_merge_identically(files):
    paths, _ = files
    eager = merge_loras(mixed_inputs(paths, lazy=False), MergeOptions(mode="svd", rank=6, dtype=F32)).modules
    lazy = merge_loras(mixed_inputs(paths, lazy=True), MergeOptions(mode="svd", rank=6, dtype=F32)).modules
    for a, b in zip(eager, lazy, strict=True):
        torch.testing.assert_close(dense(a), dense(b), rtol=1e-5, atol=1e-7)


def test_add_mode_refuses_lycoris_naming_file_and_module(files):
    paths, _ = files
    lokr = read_lora(paths["lokr"], lazy=True)
    with pytest.raises(LoraMergeError) as e:
        merge_loras([MergeInput(lokr), MergeInput(lokr, unet=0.5)], MergeOptions(mode="add"))
    msg = str(e.value)
    assert msg.startswith(f"{paths['lokr']}: lora_") and "not LoKr" in msg and "concat" in msg and "svd" in msg


def test_written_merge_reads_back_as_plain_lora(files, tmp_path):
    paths, parts = files
    inputs = mixed_inputs(paths)
    job = merge_to_file(inputs, MergeOptions(mode="concat", dtype=F32), tmp_path / "m.safetensors")
    back = read_lora(job.path)
    assert back.arch == "sd1" and {type(m) for m in back.modules.values()} == {LoraModule}
    for name, module in back.modules.items():
        want = reference(inputs, parts, name)
        assert float((dense(module) - want).norm() / want.norm()) < 2e-6, name
    with pytest.raises(LoraMergeError, match="LoKr module is written as LoRA/LoCon only after a merge"):
        from lib_loramerge.formats.writer import save_lora
        save_lora(read_lora(paths["lokr"]).modules.values(), tmp_path / "copy.safetensors")


# ---- DoRA ----------------------------------------------------------------------------------------

def dora_file(tmp_path):
    lora = lora_parts()
    lokr = lokr_parts(seed=5)
    g = _rand(11)
    modules = {
        TO_K: {**lora[TO_K], "dora_scale": g(1, 768).abs() + 0.5},  # A1111/kohya: one magnitude per input column
        CONV1: {**lokr[CONV1], "dora_scale": g(1, 320, 1, 1).abs() + 0.5},
        FC1: lora[FC1],
    }
    return write_tensors(tmp_path / "dora.safetensors", modules), modules


def test_dora_is_read_and_refused_by_merges_naming_file_and_module(tmp_path, capsys):
    path, _ = dora_file(tmp_path)
    lora = read_lora(path, lazy=True)
    assert isinstance(lora.modules[TO_K], DoraModule) and lora.modules[CONV1].weight_shape == SHAPES[CONV1]
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["algorithms"] == {"DoRA": 1, "LoKr + DoRA": 1, "LoRA": 1} and info["arch"] == "sd1"
    assert any("DoRA (dora_scale) on 2 modules" in n for n in info["notes"])
    for mode in ("svd", "concat"):
        with pytest.raises(LoraMergeError) as e:
            merge_loras([MergeInput(lora)], MergeOptions(mode=mode))
        assert str(e.value).startswith(f"{path}: {TO_K}: DoRA module") and "base model" in str(e.value)
    # with the DoRA modules weighted 0 there is nothing to refuse
    only_fc1 = MergeInput(lora, block_ratio=lambda name: 1.0 if name == FC1 else 0.0)
    result = merge_loras([only_fc1], MergeOptions(mode="concat", dtype=F32))
    assert [m.name for m in result.modules] == [FC1]


@pytest.mark.parametrize("name", [TO_K, CONV1])
@pytest.mark.parametrize("multiplier", [1.0, 0.6, -0.5, 0.0])
def test_apply_dora_matches_a1111(tmp_path, name, multiplier):
    path, modules = dora_file(tmp_path)
    module = read_lora(path, lazy=True).modules[name]
    base = _rand(21)(*SHAPES[name]).double() * 2
    got = apply_dora(base.to(torch.float16), module, multiplier)
    # A1111 1.10 finalize_updown: updown·scale → apply_weight_decompose → ×multiplier, one input column at a time
    base = base.to(torch.float16).double()
    merged = base + a1111_delta({k: v for k, v in modules[name].items() if k != "dora_scale"}, SHAPES[name])
    magnitude = modules[name]["dora_scale"].double().reshape(-1)
    want = base.clone()
    for j in range(base.shape[1]):
        column = merged[:, j]
        want[:, j] = base[:, j] + multiplier * (column * magnitude[j] / column.norm() - base[:, j])
    assert got.dtype == F32 and got.shape == base.shape
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    if multiplier == 1.0:  # fully applied, every input column has exactly the stored magnitude
        norms = got.double().transpose(0, 1).reshape(base.shape[1], -1).norm(dim=1)
        torch.testing.assert_close(norms, magnitude, rtol=1e-5, atol=0)
