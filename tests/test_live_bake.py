"""Baking into the loaded model (A1111 and Forge stand-ins): exact apply, bit-exact revert and interrupt,
Save equal to the file bake, prompt LoRAs stacking on the bake, model switches, infotext, the tab's handlers."""

from __future__ import annotations

import json
import types

import pytest
import torch
from fakewebui import FakeWebUI
from livemodel import (
    A1111Networks,
    a1111_sd_model,
    forge_generate,
    forge_sd_model,
    forge_weights,
    ldm_key,
    weights_by_key,
)
from safetensors import safe_open
from safetensors.torch import save_file
from synth import make_modules, write_kohya

from lib_loramerge import webui
from lib_loramerge.bake import live
from lib_loramerge.blocks.presets import load_presets
from lib_loramerge.blocks.weights import parse_block_weights
from lib_loramerge.cli import main
from lib_loramerge.errors import LoraMergeError
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.formats.safetensors_io import read_header
from lib_loramerge.jobs import RECIPE_KEY
from lib_loramerge.ops.merge import MergeInput
from lib_loramerge.ui import handlers
from lib_loramerge.ui.handlers import LiveRequest, LoraRow

D = 8  # SD1 at 1/8 of its widths: every real key, small tensors
ONLY = "attn1|attn2|proj_in|ff_net_2|self_attn|mlp_fc1"


@pytest.fixture
def webui_fake(tmp_path):
    w = FakeWebUI(tmp_path / "webui")
    w.install()
    webui._LIVE["bake"] = None
    yield w
    w.uninstall()
    webui._LIVE["bake"] = None


def _checkpoint_of(model, path, keys_of=weights_by_key):
    """The file the loaded model came from: its weights under LDM keys, in their dtype."""
    tensors = {}
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            tensors[ldm_key(name)] = p.detach().clone().contiguous()
    save_file(tensors, str(path))
    return path


SD1_META = {"ss_base_model_version": "sd_v1"}  # narrow shapes do not tell the architecture; the metadata does


def _loras(folder, arch="sd1"):
    a = write_kohya(folder / "style.safetensors", make_modules(arch, rank=4, alpha=2, seed=1, width_divisor=D, only=ONLY),
                    dtype=torch.float16, metadata=SD1_META)
    b = write_kohya(folder / "detail.safetensors",
                    make_modules(arch, rank=2, seed=2, width_divisor=D, only="attn2|mlp|self_attn_k"), metadata=SD1_META)
    return a, b


def _a1111(webui_fake, tmp_path, arch="sd1", dtype=torch.float16):
    model = a1111_sd_model(arch, D if arch != "sdxl" else 16, str(tmp_path / "base.safetensors"), dtype)
    networks = A1111Networks(model, arch)
    webui_fake.modules["networks"] = networks.as_module()
    import sys

    sys.modules["networks"] = webui_fake.modules["networks"]
    webui_fake.modules["modules.sd_models"].model_data.sd_model = model
    _checkpoint_of(model, tmp_path / "base.safetensors")
    return model, networks


def _inputs(paths, unet=(0.8, -0.4), te=(1.0, 0.5), lbw=(None, None), arch="sd1"):
    """As prepare_inputs makes them; the narrow test LoRAs' shapes tell no architecture, so it is set."""
    inputs = []
    for path, u, t, w in zip(paths, unet, te, lbw, strict=True):
        lora = read_lora(path, lazy=True)
        lora.arch = arch
        weights = parse_block_weights(w, arch, load_presets()) if w else None
        inputs.append(MergeInput(lora, unet=u, te=t, block_ratio=weights.ratio if weights else None,
                                 recipe=weights.recipe() if weights else {}))
    return inputs


def _file_bake(tmp_path, ckpt, paths, name, extra=()):
    out = tmp_path / name
    argv = ["bake", "--checkpoint", str(ckpt), "--models", *map(str, paths), "--ratios", "0.8", "-0.4",
            "--te-ratios", "1", "0.5", "--dtype", "keep", "--device", "cpu", "--out", str(out), *extra]
    assert main(argv) == 0
    with safe_open(str(out), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, out  # noqa: SIM118 (a safe_open handle, not a dict)


# ---- A1111 -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sd1", "sd2"])  # SD2: OpenCLIP's fused q/k/v in A1111's MultiheadAttention
def test_apply_equals_the_file_bake_and_revert_is_bit_exact(webui_fake, tmp_path, capsys, arch):
    model, _ = _a1111(webui_fake, tmp_path, arch=arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    paths = _loras(tmp_path, arch)
    host = webui.WebUIHost()
    bake = live.apply(host.live_model(), _inputs(paths, arch=arch))
    baked, _ = _file_bake(tmp_path, tmp_path / "base.safetensors", paths, "file.safetensors")
    changed = 0
    for name, p in model.named_parameters():
        key = ldm_key(name)
        if key in baked:
            assert torch.equal(p.detach(), baked[key].to(p.dtype)), key  # the same bits as the file bake
            changed += not torch.equal(p.detach(), before[name])
    assert changed == bake.report.keys_patched > 0
    assert bake.snapshot_bytes == sum(before[n].numel() * 2 for n in before if n in
                                      {n for n, _ in model.named_parameters()} and ldm_key(n) in bake.snapshots)
    live.revert(host.live_model(), bake)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
    capsys.readouterr()


def test_an_interrupted_apply_leaves_the_model_exactly_as_it_was(webui_fake, tmp_path):
    model, _ = _a1111(webui_fake, tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    paths = _loras(tmp_path)

    class Stop(Exception):
        pass

    def progress(done, total, what):
        if done == 7:
            raise Stop()

    with pytest.raises(Stop):
        live.apply(webui.WebUIHost().live_model(), _inputs(paths), progress=progress)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def test_prompt_loras_stack_on_the_bake_and_removing_them_keeps_it(webui_fake, tmp_path, capsys):
    model, networks = _a1111(webui_fake, tmp_path)
    original = weights_by_key(model)
    paths = _loras(tmp_path)
    prompt = write_kohya(tmp_path / "prompt.safetensors", make_modules("sd1", rank=3, seed=9, width_divisor=D,
                                                                      only="attn1_to_q|attn2_to_k|self_attn_v"))
    networks.load_networks([prompt], [1.0], [0.7])  # a generation with <lora:prompt:1:0.7> before the bake
    networks.forward()
    host = webui.WebUIHost()
    bake = live.apply(host.live_model(), _inputs(paths))
    baked, _ = _file_bake(tmp_path, tmp_path / "base.safetensors", paths, "file.safetensors")
    base_after = {k: baked.get(k, original[k].to(torch.float16)).float() for k in original}
    # the bake replaced the prompt LoRA's deltas: the live weights are the bake (A1111 re-applies at the forward)
    networks.forward()  # the same prompt again: stacked on the baked weights
    stacked = weights_by_key(model)
    prompt_lora = read_lora(prompt).modules
    layout = networks.layout
    expected = {k: v.clone() for k, v in base_after.items()}
    for name, module in prompt_lora.items():
        target = layout.target(name)
        s = 1.0 if name.startswith("lora_te") else 0.7
        region = expected[target.key] if target.rows is None else expected[target.key][target.rows[0]:target.rows[1]]
        region += s * module.delta(torch.float32).reshape(region.shape)
    for key in expected:
        assert torch.allclose(stacked[key], expected[key].half().float(), atol=2e-3, rtol=0), key
    networks.load_networks([], [], [])  # the prompt LoRA removed
    networks.forward()
    after = weights_by_key(model)
    for key in base_after:
        assert torch.equal(after[key], base_after[key]), key  # the bake stays
    live.revert(host.live_model(), bake)
    networks.forward()
    assert all(torch.equal(v, original[k]) for k, v in weights_by_key(model).items())
    networks.load_networks([prompt], [1.0], [0.7])
    networks.forward()  # after the revert, the prompt LoRA stacks on the original weights again
    assert not torch.equal(weights_by_key(model)[layout.target(next(iter(prompt_lora))).key],
                           original[layout.target(next(iter(prompt_lora))).key])
    capsys.readouterr()


def test_sdxl_fused_openclip_rows_and_te_cache(webui_fake, tmp_path, capsys):
    model, _ = _a1111(webui_fake, tmp_path, arch="sdxl")
    processing = webui_fake.modules["modules.processing"].StableDiffusionProcessing
    processing.cached_c = ["stale", "cond"]
    lora = write_kohya(tmp_path / "xl.safetensors", make_modules("sdxl", rank=2, seed=3, width_divisor=16,
                                                                 only="te2_text_model_encoder_layers_1_|attn2_to_v"))
    bake = live.apply(webui.WebUIHost().live_model(), _inputs([lora], unet=(0.8,), te=(1.0,), lbw=(None,), arch="sdxl"))
    assert any(k.endswith("attn.in_proj_weight") for k in bake.snapshots)
    out = tmp_path / "xl_file.safetensors"
    assert main(["bake", "--checkpoint", str(tmp_path / "base.safetensors"), "--models", str(lora), "--ratios", "0.8",
                 "--te-ratios", "1", "--dtype", "keep", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        for name, p in model.named_parameters():
            if ldm_key(name) in bake.snapshots:
                assert torch.equal(p.detach(), f.get_tensor(ldm_key(name))), name
    assert processing.cached_c == [None, None]  # the text encoder changed: conditioning is computed again
    capsys.readouterr()


def test_a_model_switch_drops_the_bake(webui_fake, tmp_path):
    model, _ = _a1111(webui_fake, tmp_path)
    host = webui.WebUIHost()
    host.set_live_bake(live.apply(host.live_model(), _inputs(_loras(tmp_path))))
    assert host.live_bake() is not None
    webui_fake.modules["modules.script_callbacks"].model_loaded_callback(model)  # A1111 reloaded weights in place
    webui.on_model_loaded(model)
    assert host.live_bake() is None
    host.set_live_bake(live.apply(host.live_model(), _inputs(_loras(tmp_path))))
    model.sd_checkpoint_info = types.SimpleNamespace(filename=str(tmp_path / "other.safetensors"))  # switched, no hook
    assert host.live_bake() is None
    outcome = handlers.live_revert(host)
    assert outcome.ok and "nothing to revert" in outcome.message


def test_images_made_during_a_live_bake_say_so(webui_fake, tmp_path):
    _a1111(webui_fake, tmp_path)
    host = webui.WebUIHost()
    p = types.SimpleNamespace(extra_generation_params={})
    webui.generation_params(p)
    assert p.extra_generation_params == {}
    bake = live.apply(host.live_model(), _inputs(_loras(tmp_path), lbw=("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1", None)))
    host.set_live_bake(bake)
    webui.generation_params(p)
    label = p.extra_generation_params["LoRA bake"]
    assert label.startswith("style:1:0.8:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1, detail:0.5:-0.4")
    assert p.extra_generation_params["LoRA bake hash"] == bake.recipe_hash and len(bake.recipe_hash) == 12


def test_the_tab_applies_reverts_and_saves_like_the_file_bake(webui_fake, tmp_path, capsys):
    model, _ = _a1111(webui_fake, tmp_path)
    ckpt = webui_fake.model_path / "base.safetensors"
    _checkpoint_of(model, ckpt)
    model.sd_checkpoint_info = types.SimpleNamespace(filename=str(ckpt))
    paths = [p.rename(webui_fake.lora_dir / p.name) for p in _loras(tmp_path)]
    host = webui.WebUIHost()
    rows = [LoraRow("style.safetensors", 0.8, 1.0), LoraRow("detail.safetensors", -0.4, 0.5)]
    waits = []
    webui_fake.queue_lock.acquire()  # a generation is running: the panel says it waits
    import threading

    done = {}
    worker = threading.Thread(target=lambda: done.update(
        outcome=handlers.live_apply(host, LiveRequest(rows), lambda d, t, what: waits.append(what))))
    worker.start()
    worker.join(0.5)
    assert worker.is_alive() and waits and waits[0].startswith("waiting for the current generation")
    webui_fake.queue_lock.release()
    worker.join(60)
    assert done["outcome"].ok, done["outcome"].message
    assert "Live bake active: style:1:0.8, detail:0.5:-0.4" in handlers.live_status(host)
    saved = handlers.live_save(host, LiveRequest(rows, output="saved", dtype="keep"))
    assert saved.ok, saved.message
    file_bake, _ = _file_bake(tmp_path, ckpt, paths, "cli.safetensors")
    with safe_open(str(saved.path), "pt") as f:
        assert sorted(f.keys()) == sorted(file_bake)
        assert all(torch.equal(f.get_tensor(k), v) for k, v in file_bake.items())
    a, b = read_header(saved.path), read_header(tmp_path / "cli.safetensors")
    data = lambda path, h: path.read_bytes()[h.data_start:]  # noqa: E731
    assert data(saved.path, a) == data(tmp_path / "cli.safetensors", b)  # the same bytes
    recipe = json.loads(a.metadata[RECIPE_KEY])
    assert recipe["source"] == "live bake" and recipe["semantics"] == "a1111"
    assert json.loads(b.metadata[RECIPE_KEY]).get("source") is None
    reverted = handlers.live_revert(host)
    assert reverted.ok and "reverted" in reverted.message
    assert handlers.live_status(host).startswith("No live bake")
    capsys.readouterr()


def test_applying_again_reverts_first(webui_fake, tmp_path):
    model, _ = _a1111(webui_fake, tmp_path)
    original = weights_by_key(model)
    paths = [p.rename(webui_fake.lora_dir / p.name) for p in _loras(tmp_path)]
    host = webui.WebUIHost()
    assert handlers.live_apply(host, LiveRequest([LoraRow("style.safetensors", 1.0, 1.0)])).ok
    second = handlers.live_apply(host, LiveRequest([LoraRow("detail.safetensors", 1.0, 1.0)]))
    assert second.ok and "reverted the previous live bake first (style:1:1)" in second.message
    only_detail = live.apply(host.live_model(), _inputs([paths[1]], (1.0,), (1.0,), (None,)))
    live.revert(host.live_model(), only_detail)  # back to "detail alone"
    after = weights_by_key(model)
    handlers.live_revert(host)
    assert all(torch.equal(v, original[k]) for k, v in weights_by_key(model).items())
    assert any(not torch.equal(after[k], original[k]) for k in after)


# ---- Forge ---------------------------------------------------------------------------------------------------

def _forge(webui_fake, tmp_path, monkeypatch):
    engine = forge_sd_model(D, str(tmp_path / "base.safetensors"))
    webui_fake.modules["modules.sd_models"].model_data.sd_model = engine
    monkeypatch.setattr(webui, "is_forge", lambda: True)
    return engine


def test_forge_bake_becomes_the_base_prompt_loras_merge_on(webui_fake, tmp_path, monkeypatch, capsys):
    engine = _forge(webui_fake, tmp_path, monkeypatch)
    original = forge_weights(engine)
    prompt = write_kohya(tmp_path / "prompt.safetensors", make_modules("sd1", rank=3, seed=9, width_divisor=D,
                                                                      only="attn1_to_q|self_attn_v"))
    forge_generate(engine, [prompt], [1.0], [0.6])  # a prompt LoRA merged before the bake
    with_prompt = forge_weights(engine)
    host = webui.WebUIHost()
    paths = _loras(tmp_path)
    bake = live.apply(host.live_model(), _inputs(paths))  # writes inference tensors: inside inference mode
    forge_generate(engine, [prompt], [1.0], [0.6])  # same prompt: Forge re-merges on the baked base
    stacked = forge_weights(engine)
    forge_generate(engine, [], [], [])  # prompt LoRA removed
    baked = forge_weights(engine)
    changed = {k for k in original if not torch.equal(baked[k], original[k])}
    assert changed == set(bake.snapshots)
    for key in original:  # the prompt LoRA's delta sits on top of the bake, as it sat on the original
        assert torch.allclose(stacked[key] - baked[key], with_prompt[key] - original[key], atol=1e-3), key
    live.revert(host.live_model(), bake)
    forge_generate(engine, [], [], [])
    assert all(torch.equal(v, original[k]) for k, v in forge_weights(engine).items())
    assert bake.snapshots and host.live_model().semantics == "forge"
    capsys.readouterr()


def test_forge_quantised_storage_is_refused(webui_fake, tmp_path, monkeypatch):
    engine = _forge(webui_fake, tmp_path, monkeypatch)
    param = next(p for n, p in engine.forge_objects.unet.model.named_parameters() if p.ndim >= 2)
    param.bnb_quantized = True
    with pytest.raises(LoraMergeError, match="quantised"):
        webui.WebUIHost().live_model()


def test_no_model_loaded_is_a_message(webui_fake):
    outcome = handlers.live_apply(webui.WebUIHost(), LiveRequest([LoraRow("x.safetensors")]))
    assert not outcome.ok and outcome.message.startswith("error: ")
