"""The real LyCORIS LoKr files of the shared tier: merged through factor forms, checked against A1111's dense ΔW.

Skipped when the shared folder is absent. The reference ΔW of a module is computed here in
float64 straight from the file's tensors with A1111's ``network_lokr.py`` formula
(kron(w1_a @ w1_b, w2_a @ w2_b) · alpha / dim, reshaped to the layer).
"""

import math

import torch
from conftest import REAL_LORAS, requires_real_loras
from safetensors import safe_open

from lib_loramerge.cli import main
from lib_loramerge.formats.reader import read_lora

pytestmark = requires_real_loras

FILES = {name: REAL_LORAS / "lycoris-lokr" / f"{name}.safetensors"
         for name in ("smart_falcon_4_lokr", "smart_falcon_8_lokr")}


def a1111_lokr(f, name: str, rows: list[int] | None = None) -> torch.Tensor:
    """network_lokr.py: kron(w1, w2) · alpha / dim (dim = lokr_w2_b.shape[0]), float64, flattened (out, in·kh·kw).

    ``rows``: only those rows, each taken from torch.kron of the row of w1 whose block holds it.
    """
    g = lambda key: f.get_tensor(f"{name}.{key}").double()  # noqa: E731
    w1 = g("lokr_w1_a") @ g("lokr_w1_b")
    w2 = g("lokr_w2_a") @ g("lokr_w2_b")
    scale = float(g("alpha")) / g("lokr_w2_b").shape[0]
    if rows is None:
        return torch.kron(w1, w2) * scale
    c = w2.shape[0]
    return torch.stack([torch.kron(w1[r // c: r // c + 1], w2)[r % c] for r in rows]) * scale


def target(strengths: dict[str, tuple[float, float]], name: str, rows: list[int] | None = None) -> torch.Tensor:
    """Σ strength · ΔW over the files (strength: (unet, te))."""
    total = 0
    for file, (unet, te) in strengths.items():
        with safe_open(FILES[file], "pt") as f:
            total = total + (te if name.startswith("lora_te") else unet) * a1111_lokr(f, name, rows)
    return total


def lora_rows(module, rows: list[int]) -> torch.Tensor:
    """Rows of a written LoRA module's ΔW (float64)."""
    up, down = module.up.double(), module.down.double()
    return up.reshape(up.shape[0], -1)[rows] @ down.reshape(down.shape[0], -1) * (module.alpha / down.shape[0])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    gap = float((got - want).norm())
    return gap / float(want.norm()) if float(want.norm()) > 0 else gap  # an untrained (zero) module stays zero


def check_dropped_are_zero(merged, strengths) -> set[str]:
    """Modules left out of a merge must be the ones whose reference ΔW is exactly zero (untrained in the files)."""
    source = read_lora(FILES["smart_falcon_4_lokr"], lazy=True)
    dropped = set(source.modules) - set(merged.modules)
    for name in dropped:
        assert float(target(strengths, name).abs().max()) == 0.0, name
    return dropped


def small(name: str, lora, limit: int = 2_500_000) -> bool:
    m = lora.modules[name]
    return m.out_features * math.prod(m.weight_shape[1:]) <= limit


def one_per_shape(lora, limit: int = 2_500_000) -> list[str]:
    """One module per distinct layer shape (linear, 1×1 and 3×3 conv; UNet and text encoder), small enough
    for a dense float64 SVD here."""
    seen: dict[tuple, str] = {}
    for name, m in lora.modules.items():
        if small(name, lora, limit):
            seen.setdefault((m.weight_shape, m.is_text_encoder), name)
    return sorted(seen.values())


def merge_cli(tmp_path, mode: str, *extra: str) -> tuple:
    out = tmp_path / f"{mode}.safetensors"
    code = main(["merge", "--models", str(FILES["smart_falcon_4_lokr"]), str(FILES["smart_falcon_8_lokr"]),
                 "--ratios", "0.8", "-0.5", "--te-ratios", "0.6", "-0.5", "--mode", mode, *extra,
                 "--dtype", "fp32", "--device", "cpu", "--out", str(out)])
    assert code == 0
    return read_lora(out)


STRENGTHS = {"smart_falcon_4_lokr": (0.8, 0.6), "smart_falcon_8_lokr": (-0.5, -0.5)}


def test_lazy_reading_of_real_lokr():
    lazy, eager = read_lora(FILES["smart_falcon_8_lokr"], lazy=True), read_lora(FILES["smart_falcon_8_lokr"])
    name = "lora_unet_up_blocks_1_resnets_0_conv1"
    m = lazy.modules[name]
    assert m.is_lazy and m.w1_a.is_meta and m.weight_shape == (1280, 2560, 3, 3) and m.rank == 64 and m.scale == 1
    torch.testing.assert_close(m.load().delta(), eager.modules[name].delta(), rtol=0, atol=0)


def test_concat_of_both_files_is_exact(tmp_path, capsys):
    merged = merge_cli(tmp_path, "concat")
    report = capsys.readouterr().out
    assert "plain LoRA/LoCon" in report and "concat: 350 modules have a rank above 4×" in report
    source = read_lora(FILES["smart_falcon_4_lokr"], lazy=True)
    assert merged.arch == "sd1" and set(merged.modules) == set(source.modules)  # concat keeps zero modules
    pick = torch.Generator().manual_seed(0)
    for name, module in merged.modules.items():  # every module: its first, last and 6 random rows, exactly
        assert module.weight_shape == source.modules[name].weight_shape and module.rank == 16 + 64
        out = module.out_features
        rows = [0, out - 1, *torch.randint(0, out, (6,), generator=pick).tolist()]
        err = relative_error(lora_rows(module, rows), target(STRENGTHS, name, rows))
        assert err < 2e-6, (name, err)
    for name in one_per_shape(merged):  # one module of every layer shape: the whole ΔW
        module = merged.modules[name]
        err = relative_error(lora_rows(module, list(range(module.out_features))), target(STRENGTHS, name))
        assert err < 2e-6, (name, err)


def test_svd_rank_16_of_both_files_is_the_optimal_rank_16(tmp_path, capsys):
    k = 16
    merged = merge_cli(tmp_path, "svd", "--rank", str(k))
    capsys.readouterr()
    assert {m.rank for m in merged.modules.values()} == {k} and len(merged.modules) == 347
    check_dropped_are_zero(merged, STRENGTHS)
    for name in one_per_shape(merged, 1_000_000):
        module = merged.modules[name]
        want = target(STRENGTHS, name)
        s = torch.linalg.svdvals(want)
        up, down = module.up.double().reshape(module.up.shape[0], -1), module.down.double().reshape(k, -1)
        err = float(torch.linalg.norm(want - up @ down * (module.alpha / k)) ** 2)
        optimal = float((s[k:] ** 2).sum())  # Eckart–Young
        assert err <= optimal * (1 + 1e-4) + 1e-9 * float(s.square().sum()), name


def test_one_file_resizes_through_the_kronecker_svd(tmp_path):
    # dim 4: factor rank 16, so rank 16 is exact for every module; dim 8 (rank 64) to 16 is optimal
    for file, k in (("smart_falcon_4_lokr", 16), ("smart_falcon_8_lokr", 16)):
        out = tmp_path / f"{file}.safetensors"
        assert main(["merge", "--models", str(FILES[file]), "--ratios", "0.7", "--mode", "svd", "--rank", str(k),
                     "--dtype", "fp32", "--out", str(out)]) == 0
        merged = read_lora(out)
        check_dropped_are_zero(merged, {file: (0.7, 0.7)})
        for name in one_per_shape(merged, 2_500_000 if file == "smart_falcon_4_lokr" else 400_000):
            module = merged.modules[name]
            want = target({file: (0.7, 0.7)}, name)
            if file == "smart_falcon_4_lokr":
                assert relative_error(lora_rows(module, list(range(module.out_features))), want) < 2e-6, name
                continue
            s = torch.linalg.svdvals(want)
            got = module.up.double().reshape(module.up.shape[0], -1) @ module.down.double().reshape(k, -1)
            err = float(torch.linalg.norm(want - got * (module.alpha / k)) ** 2)
            assert err <= float((s[k:] ** 2).sum()) * (1 + 1e-4) + 1e-9 * float(s.square().sum()), name


def test_real_lokr_bakes_into_real_layers(tmp_path):
    """Bake both real files into a checkpoint holding real SD1 layers of every shape they touch."""
    from safetensors.torch import load_file, save_file

    from lib_loramerge import sdlayouts
    from lib_loramerge.bake.keymap import CheckpointLayout
    from lib_loramerge.jobs import bake_to_file
    from lib_loramerge.ops.merge import MergeInput

    shapes = dict(sdlayouts.checkpoint_tensors("sd1"))
    layout = CheckpointLayout(shapes)
    loras = {n: read_lora(p, lazy=True) for n, p in FILES.items()}
    by_shape: dict[tuple, str] = {}
    for name, module in loras["smart_falcon_4_lokr"].modules.items():
        by_shape.setdefault(module.weight_shape, name)  # one module of every layer shape
    targets = {name: layout.target(name) for name in by_shape.values()}
    g = torch.Generator().manual_seed(1)
    ckpt = {t.key: torch.randn(shapes[t.key], generator=g) * 0.02 for t in targets.values()}
    ckpt["cond_stage_model.transformer.text_model.final_layer_norm.bias"] = torch.zeros(768)
    path = tmp_path / "part.safetensors"
    save_file(ckpt, str(path))
    strengths = {"smart_falcon_4_lokr": (0.7, 0.4), "smart_falcon_8_lokr": (-0.3, 0.9)}
    inputs = [MergeInput(loras[n], unet=u, te=t) for n, (u, t) in strengths.items()]
    job = bake_to_file(path, inputs, tmp_path / "out.safetensors", dtype=torch.float32, allow_unmatched=True)
    assert job.report.modules_baked == 2 * len(targets)
    assert len(job.report.unmatched) == 2 * (350 - len(targets))
    before, after = load_file(path), load_file(job.path)
    for name, t in targets.items():
        want = target(strengths, name)
        got = (after[t.key].double() - before[t.key].double()).reshape(want.shape)
        assert float((got - want).norm()) <= 1e-5 * float(want.norm()) + 1e-7, name
