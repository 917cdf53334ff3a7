"""What each WebUI applies is what we bake (DoRA rules, --semantics), a rewritten LoRA is never served stale,
outputs are filed by both WebUIs, and a queued job says it waits."""

from __future__ import annotations

import functools
import json
import os
import threading
import types

import pytest
import torch
from fakewebui import FakeWebUI
from safetensors.torch import load_file, save_file
from synth import make_modules, write_tensors
from test_lycoris import CONV1, SHAPES, TO_K, lora_parts
from uikit import write_small_lora

from lib_loramerge import sdlayouts, webui
from lib_loramerge.bake.keymap import CheckpointLayout
from lib_loramerge.cli import main
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.formats.safetensors_io import read_header
from lib_loramerge.jobs import RECIPE_KEY
from lib_loramerge.ops.dora import apply_dora
from lib_loramerge.ui import handlers
from lib_loramerge.ui.handlers import LoraRow, MergeRequest

# ---- the two DoRA rules, written out from the hosts' code (as reference) ----------------------------------


def a1111_dora(w, delta, dora_scale, multiplier, ratio):
    """A1111 1.10 network.py + LBW: ratio inside (it scales up), norm per input column, no eps."""
    merged = w + ratio * delta
    n = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    n = n.reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
    return w + multiplier * (merged * (dora_scale / n) - w)


def forge_dora(w, delta, dora_scale, strength):
    """Forge backend/patcher/lora.py weight_decompose: output-row norm of the pre-update W when dora_scale has
    one value per output row, else input-column norm of W + ΔW; + eps; strength linear (LBW multiplies it)."""
    calc = w + delta
    if dora_scale.shape[0] == calc.shape[0]:
        n = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).reshape(w.shape[0], *[1] * (w.dim() - 1))
    else:
        n = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
        n = n.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    n = n + torch.finfo(torch.float32).eps
    calc = calc * (dora_scale / n)
    return calc if strength == 1.0 else w + strength * (calc - w)


def _dora(tmp_path, name: str, axis: str):
    out = SHAPES[name][0]
    g = torch.Generator().manual_seed(21)
    base = lora_parts()[name]
    if axis == "row":  # LyCORIS' form: one magnitude per output row
        scale = torch.rand((out, *[1] * (len(SHAPES[name]) - 1)), generator=g) + 0.5
    else:  # kohya's / A1111's: one per input column
        scale = torch.rand((1, SHAPES[name][1], *[1] * (len(SHAPES[name]) - 2)), generator=g) + 0.5
    path = write_tensors(tmp_path / f"dora_{axis}.safetensors", {name: {**base, "dora_scale": scale}})
    module = read_lora(path).modules[name]
    return module, scale


@pytest.mark.parametrize("name", [TO_K, CONV1])
@pytest.mark.parametrize("axis", ["row", "column"])
@pytest.mark.parametrize("multiplier, ratio", [(1.0, 1.0), (0.6, 1.0), (0.8, 0.5)])
def test_dora_follows_each_hosts_rule(tmp_path, name, axis, multiplier, ratio):
    module, scale = _dora(tmp_path, name, axis)
    w = torch.randn(SHAPES[name], generator=torch.Generator().manual_seed(3)) * 0.05
    delta = module.inner.delta(torch.float32).reshape(w.shape)
    forge = apply_dora(w, module, multiplier, inner_scale=ratio, semantics="forge")
    assert torch.allclose(forge, forge_dora(w, delta, scale, multiplier * ratio), rtol=1e-5, atol=1e-7)
    a1111 = apply_dora(w, module, multiplier, inner_scale=ratio, semantics="a1111")
    if axis == "column":
        assert torch.allclose(a1111, a1111_dora(w, delta, scale, multiplier, ratio), rtol=1e-5, atol=1e-7)
        if ratio != 1.0:  # block weights: inside the decomposition for A1111, linear for Forge
            assert not torch.allclose(a1111, forge, rtol=1e-4, atol=1e-6)
    else:  # a per-row dora_scale: A1111 still divides by column norms and broadcasts; Forge normalises rows
        assert not torch.allclose(a1111, forge, rtol=1e-3, atol=1e-5)


def test_bake_semantics_switch_is_recorded(tmp_path, capsys):
    layout = CheckpointLayout(dict(sdlayouts.checkpoint_tensors("sd1")))
    key = layout.target(TO_K).key
    shapes = dict(sdlayouts.checkpoint_tensors("sd1"))
    tensors = {key: torch.randn(shapes[key]) * 0.05,
               "cond_stage_model.transformer.text_model.final_layer_norm.bias": torch.zeros(768),
               "model.diffusion_model.out.2.bias": torch.zeros(4)}
    ckpt = tmp_path / "c.safetensors"
    save_file(tensors, str(ckpt))
    module, scale = _dora(tmp_path, TO_K, "row")
    outs = {}
    for semantics in ("a1111", "forge"):
        out = tmp_path / f"{semantics}.safetensors"
        argv = ["bake", "--checkpoint", str(ckpt), "--models", str(tmp_path / "dora_row.safetensors"), "--ratios", "0.7",
                "--dtype", "fp32", "--out", str(out), *(["--semantics", semantics] if semantics == "forge" else [])]
        assert main(argv) == 0, capsys.readouterr().err
        outs[semantics] = load_file(str(out))[key]
        assert json.loads(read_header(out).metadata[RECIPE_KEY])["semantics"] == semantics
    w = tensors[key]
    delta = module.inner.delta(torch.float32).reshape(w.shape)
    assert torch.allclose(outs["forge"], forge_dora(w, delta, scale, 0.7), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(outs["forge"], outs["a1111"], atol=1e-5)
    capsys.readouterr()


# ---- a rewritten LoRA is applied fresh ----------------------------------------------------------------------------

@pytest.fixture
def fake(tmp_path):
    w = FakeWebUI(tmp_path / "webui")
    write_small_lora(w.lora_dir / "style_a.safetensors", 0)
    w.install()
    webui._LIVE["bake"] = None
    yield w
    w.uninstall()


def test_forge_forgets_a_rewritten_lora(fake, monkeypatch):
    monkeypatch.setattr(webui, "is_forge", lambda: True)
    read = []

    @functools.lru_cache(maxsize=5)
    def load_lora_state_dict(filename):  # Forge: cached by file name only
        read.append(filename)
        return load_file(filename)

    fake.modules["networks"].load_lora_state_dict = load_lora_state_dict
    loaders = [types.SimpleNamespace(loaded_hash="[('style_a', 1.0, 1.0, False)]") for _ in range(2)]
    engine = types.SimpleNamespace(
        sd_checkpoint_info=types.SimpleNamespace(filename="x"), current_lora_hash="[['style_a', 1.0, 1.0, False]]",
        forge_objects=types.SimpleNamespace(unet=types.SimpleNamespace(model=types.SimpleNamespace(lora_loader=loaders[0])),
                                            clip=types.SimpleNamespace(patcher=types.SimpleNamespace(
                                                model=types.SimpleNamespace(lora_loader=loaders[1])))))
    fake.modules["modules.sd_models"].model_data.sd_model = engine
    path = str(fake.lora_dir / "style_a.safetensors")
    load_lora_state_dict(path)
    host = webui.WebUIHost()
    outcome = handlers.merge(host, MergeRequest([LoraRow("style_a.safetensors", 0.5, 0.5)], "style_a", overwrite=True))
    assert outcome.ok, outcome.message
    assert load_lora_state_dict.cache_info().currsize == 0  # the next generation reads the new bytes
    assert engine.current_lora_hash is None and all(loader.loaded_hash is None for loader in loaders)
    load_lora_state_dict(path)
    assert read == [path, path]
    assert ("list_available_networks",) in fake.calls  # new hash and metadata


def test_a1111_reapplies_a_rewritten_lora(fake):
    fake.modules["modules.processing"].StableDiffusionProcessing.cached_c = ["cond of the old file", None]
    layers = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    layers[0].network_current_names, layers[0].network_weights_backup = (("style_a", 1.0, 1.0, None),), "kept"
    layers[1].network_current_names = ()
    model = torch.nn.Sequential(*layers)
    model.sd_checkpoint_info = types.SimpleNamespace(filename="x")
    fake.modules["modules.sd_models"].model_data.sd_model = model
    old = fake.lora_dir / "style_a.safetensors"
    os.utime(old, ns=(0, 10**19))  # an mtime in the future: the rewrite must still look newer to A1111
    outcome = handlers.merge(webui.WebUIHost(), MergeRequest([LoraRow("style_a.safetensors")], "style_a",
                                                              overwrite=True))
    assert outcome.ok, outcome.message
    assert old.stat().st_mtime_ns > 10**19  # networks.load_networks reloads files whose mtime grew
    assert layers[0].network_current_names == () and layers[0].network_weights_backup == "kept"  # re-applied
    processing = fake.modules["modules.processing"].StableDiffusionProcessing
    assert processing.cached_c == [None, None]  # the same prompt's conditioning is computed with the new file


def test_overwriting_the_loaded_checkpoint_is_reported(fake, tmp_path, monkeypatch):
    from uikit import checkpoint_folder

    checkpoint_folder(tmp_path / "made")
    source = tmp_path / "made" / "Stable-diffusion" / "base_sd1.safetensors"
    ckpt = fake.model_path / "base.safetensors"
    source.rename(ckpt)
    for lora in (tmp_path / "made" / "Lora").iterdir():
        lora.rename(fake.lora_dir / lora.name)
    target = fake.model_path / "loaded.safetensors"
    target.write_bytes(ckpt.read_bytes())
    sd = fake.modules["modules.sd_models"]
    sd.list_models()
    sd.model_data.sd_model = types.SimpleNamespace(sd_checkpoint_info=types.SimpleNamespace(filename=str(target)))
    sd.model_data.forge_hash = "loaded"
    host = webui.WebUIHost()
    label = next(t for t in sd.checkpoint_tiles() if t.startswith("base.safetensors"))
    rows = [LoraRow("narrow_a.safetensors", 0.5, 0.5)]
    outcome = handlers.bake(host, handlers.BakeRequest(label, rows, "loaded", overwrite=True))
    assert outcome.ok and "A1111 keeps the old weights until it is reloaded" in outcome.message
    monkeypatch.setattr(webui, "is_forge", lambda: True)
    outcome = handlers.bake(host, handlers.BakeRequest(label, rows, "loaded", overwrite=True))
    assert outcome.ok and "Forge loads the new file at the next generation" in outcome.message
    assert sd.model_data.forge_hash is None


# ---- filed as the right version by both WebUIs --------------------------------------------------------------


def a1111_version(meta: dict) -> str:  # extensions-builtin/Lora/network.py NetworkOnDisk.detect_version
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


def forge_version(meta: dict) -> str:  # sd_forge_lora/network.py NetworkOnDisk.detect_version
    if meta.get("modelspec.architecture") == "stable-diffusion-xl-v1-base/lora":
        return "SDXL"
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    if meta.get("modelspec.architecture") == "stable-diffusion-v1/lora":
        return "SD1"
    return "Unknown"


@pytest.mark.parametrize("arch, version", [("sd1", "SD1"), ("sd2", "SD2"), ("sdxl", "SDXL")])
def test_merged_loras_are_filed_under_their_version_by_both_webuis(tmp_path, capsys, arch, version):
    from synth import write_kohya

    a = write_kohya(tmp_path / "a.safetensors", make_modules(arch, rank=2, seed=1, only="attn2_to_k|mlp_fc1"))
    assert main(["merge", "--models", str(a), "--out", str(tmp_path / "m.safetensors")]) == 0
    meta = read_header(tmp_path / "m.safetensors").metadata
    assert a1111_version(meta) == forge_version(meta) == version
    capsys.readouterr()


# ---- a queued job says it waits ---------------------------------------------------------------------------------


def test_a_merge_queued_behind_a_generation_says_it_waits(fake):
    host = webui.WebUIHost()
    seen = []
    fake.queue_lock.acquire()
    done = {}
    worker = threading.Thread(target=lambda: done.update(outcome=handlers.merge(
        host, MergeRequest([LoraRow("style_a.safetensors")], "queued"), lambda d, t, what: seen.append(what))))
    worker.start()
    worker.join(0.5)
    assert worker.is_alive() and seen == ["waiting for the current generation to finish…"]
    fake.queue_lock.release()
    worker.join(30)
    assert done["outcome"].ok and len(seen) > 1  # then the merge's own progress

