"""The tab inside A1111 (a stand-in of its modules): registration through scripts/, paths, lock, state, refresh."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import threading
from pathlib import Path

import pytest
from fakewebui import FakeWebUI
from uikit import checkpoint_folder, write_small_lora

from lib_loramerge import webui
from lib_loramerge.ui import handlers
from lib_loramerge.ui.app import MAX_ROWS
from lib_loramerge.ui.handlers import BakeRequest, LoraRow, MergeRequest

gr = pytest.importorskip("gradio")
ROOT = Path(__file__).resolve().parents[1]
A1111 = Path(os.environ["LORAMERGE_A1111_SRC"]) if os.environ.get("LORAMERGE_A1111_SRC") else None
LBW_PRESET = "MYLBW:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"


@pytest.fixture
def fake(tmp_path):
    w = FakeWebUI(tmp_path / "webui")
    write_small_lora(w.lora_dir / "style_a.safetensors", 0)
    write_small_lora(w.lora_dir / "character_b.safetensors", 1)
    write_small_lora(w.lyco_dir / "old_lyco.safetensors", 2)
    presets = w.root / "extensions" / "sd-webui-lora-block-weight" / "scripts" / "lbwpresets.txt"
    presets.parent.mkdir(parents=True)
    presets.write_text(LBW_PRESET + "\n", encoding="utf-8")
    (w.model_path / "base.safetensors").write_bytes(b"x")
    (w.model_path / "sub").mkdir()
    (w.model_path / "sub" / "other.ckpt").write_bytes(b"x")
    w.install()
    w.modules["modules.sd_models"].list_models()
    yield w
    w.uninstall()


def components(blocks) -> dict:
    return {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


def test_scripts_register_the_tab_and_it_renders_as_a1111_renders_it(fake):
    spec = importlib.util.spec_from_file_location("lora_merger_script", ROOT / "scripts" / "lora_merger.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    tabs = fake.modules["modules.script_callbacks"].ui_tabs_callback()
    assert [(title, elem) for _, title, elem in tabs] == [("LoRA Merge", "lora_merger")]
    with gr.Blocks(analytics_enabled=False) as demo, gr.Tabs():  # modules/ui.py: a TabItem per extension tab
        for interface, label, ifid in tabs:
            with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                interface.render()
    demo.get_config_file()  # every component serialises
    found = components(demo)
    assert all(f"lora_merger_merge_lora_{i}" in found for i in range(MAX_ROWS))
    lora_choices = [c[0] if isinstance(c, tuple) else c for c in found["lora_merger_merge_lora_0"].choices]
    assert lora_choices == ["character_b.safetensors", "old_lyco.safetensors", "style_a.safetensors"]
    presets = [c[0] if isinstance(c, tuple) else c for c in found["lora_merger_merge_weights_0"].choices]
    assert "MYLBW" in presets and "OUTALL" in presets  # the installed LBW's preset beside ours
    # refresh buttons with a word on them (a 🔄 is an empty box without an emoji font), one per row and Inspect's
    for elem in [f"lora_merger_merge_refresh_{i}" for i in range(MAX_ROWS)] + ["lora_merger_inspect_refresh"]:
        assert found[elem].value == "Refresh"
    assert found["lora_merger_merge_add"].value == "+ Add LoRA" and found["lora_merger_merge_remove"].value == "- Remove last"
    labels = [b.value for b in found.values() if isinstance(b, gr.Button)]
    assert not [v for v in labels if any(ord(c) > 0x2FFF for c in v)], labels  # no emoji-only labels
    # the always-on script that writes live bakes into infotext, and the model-loaded hook
    assert fake.modules["modules.script_callbacks"].callback_map["callbacks_model_loaded"]


def test_merge_runs_under_the_gpu_lock_with_state_and_refreshes_the_lora_list(fake):
    host = webui.WebUIHost()
    seen = []

    def ui_progress(done, total, what):
        state = fake.state
        seen.append((fake.queue_lock.locked(), state.job, state.job_no, state.job_count, state.textinfo == what))

    rows = [LoraRow("style_a.safetensors", 1.0, 0.5, "MYLBW"), LoraRow("old_lyco.safetensors", 0.7, 0.7)]
    outcome = handlers.merge(host, MergeRequest(rows, "baked_in_ui", mode="svd", rank=3), ui_progress)
    out = fake.lora_dir / "baked_in_ui.safetensors"
    assert outcome.ok and outcome.path == out and out.is_file(), outcome.message
    assert seen and all(locked for locked, *_ in seen)
    assert {job for _, job, *_ in seen} == {"LoRA merge → baked_in_ui.safetensors"}
    assert seen[-1][2] == seen[-1][3] == len(seen) and all(ok for *_, ok in seen)
    kinds = [c[0] for c in fake.calls]
    assert kinds.index("state.begin") < kinds.index("state.end") < kinds.index("list_available_networks")
    assert not fake.queue_lock.locked()


def test_the_webuis_interrupt_stops_the_merge(fake):
    host = webui.WebUIHost()

    def ui_progress(done, total, what):
        if done == 3:
            fake.state.interrupt()  # the WebUI's Interrupt button, or our Stop

    rows = [LoraRow("style_a.safetensors"), LoraRow("character_b.safetensors")]
    outcome = handlers.merge(host, MergeRequest(rows, "never"), ui_progress)
    assert not outcome.ok and outcome.message == "error: interrupted; nothing was written"
    assert not (fake.lora_dir / "never.safetensors").exists()
    assert fake.state.interrupted is False  # the WebUI's wrapper resets it for the next job
    assert ("list_available_networks",) not in fake.calls


def test_stop_does_not_interrupt_someone_elses_generation(fake):
    webui.WebUIHost().interrupt()  # no job of ours is running
    assert fake.state.interrupted is False


def test_host_reads_the_webuis_folders_device_and_checkpoints(fake, monkeypatch):
    host = webui.WebUIHost()
    assert host.lora_dirs() == [fake.lora_dir, fake.lyco_dir]
    assert host.lora_output_dir() == fake.lora_dir
    assert host.checkpoint_dir() == fake.model_path
    assert host.device() == "cpu"
    labels = list(host.checkpoints())
    assert [label.split(" [")[0] for label in labels] == ["base.safetensors", "sub/other.ckpt"]
    assert host.current_checkpoint() is None
    sd = fake.modules["modules.sd_models"]
    fake.modules["modules.shared"].opts.sd_model_checkpoint = labels[1]  # selected in the WebUI, not loaded yet
    assert host.current_checkpoint() == labels[1]
    loaded = sd.get_closet_checkpoint_match(labels[0])
    sd.model_data.sd_model = type("Model", (), {"sd_checkpoint_info": loaded})()  # what is loaded wins
    assert host.current_checkpoint() == labels[0]
    host.refresh_checkpoints()
    assert fake.names("list_models")
    monkeypatch.setattr(webui, "is_forge", lambda: True)  # Forge scans --lora-dir only
    assert host.lora_dirs() == [fake.lora_dir]
    fake.modules["modules.shared"].cmd_opts.ckpt_dir = str(fake.root / "ckpts")
    assert host.checkpoint_dir() == fake.root / "ckpts"


# -- the stand-in's signatures against the real A1111 v1.10.1 source ------------------------------------------

MIRRORED = {  # file in the A1111 tree → functions (Class.method for methods) the stand-in provides
    "modules/script_callbacks.py": ["on_ui_tabs", "ui_tabs_callback", "on_model_loaded", "model_loaded_callback"],
    "modules/shared_state.py": ["State.begin", "State.end", "State.interrupt"],
    "modules/sd_models.py": ["checkpoint_tiles", "list_models", "get_closet_checkpoint_match",
                             "CheckpointInfo.__init__", "CheckpointInfo.register"],
    "modules/ui_common.py": ["create_refresh_button"],
    "modules/call_queue.py": ["wrap_queued_call", "wrap_gradio_gpu_call", "wrap_gradio_call"],
    "extensions-builtin/Lora/networks.py": ["list_available_networks"],
}


def signature(fn: ast.FunctionDef) -> tuple:
    a = fn.args
    defaults = [None] * (len(a.args) - len(a.defaults)) + [ast.unparse(d) for d in a.defaults]
    kw = [(k.arg, ast.unparse(d) if d is not None else None) for k, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)]
    return ([(p.arg, d) for p, d in zip(a.args, defaults, strict=True) if p.arg != "self"], kw,
            a.vararg is not None, a.kwarg is not None)


def functions(tree: ast.AST) -> dict[str, ast.FunctionDef]:
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            found.update({f"{node.name}.{f.name}": f for f in node.body if isinstance(f, ast.FunctionDef)})
    return found


def fake_functions(fake_modules) -> dict[str, object]:
    sd, cq = fake_modules["modules.sd_models"], fake_modules["modules.call_queue"]
    from fakewebui import State
    sc = fake_modules["modules.script_callbacks"]
    return {"on_ui_tabs": sc.on_ui_tabs, "ui_tabs_callback": sc.ui_tabs_callback, "on_model_loaded": sc.on_model_loaded,
            "model_loaded_callback": sc.model_loaded_callback,
            "State.begin": State.begin, "State.end": State.end, "State.interrupt": State.interrupt,
            "checkpoint_tiles": sd.checkpoint_tiles, "list_models": sd.list_models,
            "get_closet_checkpoint_match": sd.get_closet_checkpoint_match,
            "CheckpointInfo.__init__": sd.CheckpointInfo.__init__, "CheckpointInfo.register": sd.CheckpointInfo.register,
            "create_refresh_button": fake_modules["modules.ui_common"].create_refresh_button,
            "wrap_queued_call": cq.wrap_queued_call, "wrap_gradio_gpu_call": cq.wrap_gradio_gpu_call,
            "wrap_gradio_call": cq.wrap_gradio_call,
            "list_available_networks": fake_modules["networks"].list_available_networks}


def test_webui_fake_mirrors_a1111(tmp_path):
    if A1111 is None or not (A1111 / "modules" / "script_callbacks.py").is_file():
        pytest.skip(f"A1111 source not found (LORAMERGE_A1111_SRC={A1111}: set it to a v1.10.1 checkout)")
    import inspect
    import textwrap

    fakes = fake_functions(FakeWebUI(tmp_path).modules)
    for rel, names in MIRRORED.items():
        real = functions(ast.parse((A1111 / rel).read_text(encoding="utf-8")))
        for name in names:
            mine = ast.parse(textwrap.dedent(inspect.getsource(fakes[name]))).body[0]
            assert signature(mine) == signature(real[name]), f"{rel}: {name}"
    # the module attributes the host reads exist in the real tree
    sources = {rel: (A1111 / rel).read_text(encoding="utf-8") for rel in
               ("modules/sd_models.py", "modules/devices.py", "modules/paths_internal.py", "modules/shared.py",
                "modules/cmd_args.py", "extensions-builtin/Lora/preload.py")}
    for rel, names in {"modules/sd_models.py": ["model_path", "model_data"], "modules/devices.py": ["device", "cpu"],
                       "modules/paths_internal.py": ["data_path"], "modules/shared.py": ["state", "cmd_opts", "opts"]}.items():
        for name in names:
            assert re.search(rf"^{name}\b[^=\n]*=", sources[rel], re.M), f"{rel}: {name}"
    assert '"--ckpt-dir"' in sources["modules/cmd_args.py"]
    assert '"--lora-dir"' in sources["extensions-builtin/Lora/preload.py"]
    assert '"--lyco-dir-backcompat"' in sources["extensions-builtin/Lora/preload.py"]


def test_the_job_lock_is_the_webuis_queue_lock(fake):
    # while a generation holds the WebUI's queue lock, a merge waits for it
    host = webui.WebUIHost()
    fake.queue_lock.acquire()
    started = threading.Event()
    result = {}

    def merge():
        started.set()
        result["outcome"] = handlers.merge(host, MergeRequest([LoraRow("style_a.safetensors")], "waited"))

    worker = threading.Thread(target=merge)
    worker.start()
    started.wait(5)
    worker.join(0.5)
    assert worker.is_alive() and not (fake.lora_dir / "waited.safetensors").exists()
    fake.queue_lock.release()
    worker.join(30)
    assert result["outcome"].ok and (fake.lora_dir / "waited.safetensors").is_file()


def test_bake_in_the_webui_reads_its_checkpoint_list_and_refreshes_it(tmp_path):
    w = FakeWebUI(tmp_path / "webui")
    checkpoint_folder(tmp_path / "made")
    (tmp_path / "made" / "Stable-diffusion" / "base_sd1.safetensors").rename(w.model_path / "base_sd1.safetensors")
    for lora in (tmp_path / "made" / "Lora").iterdir():
        lora.rename(w.lora_dir / lora.name)
    w.install()
    try:
        sd = w.modules["modules.sd_models"]
        sd.list_models()
        host = webui.WebUIHost()
        label = sd.checkpoint_tiles()[0]
        w.modules["modules.shared"].opts.sd_model_checkpoint = label
        assert host.current_checkpoint() == label and label.startswith("base_sd1.safetensors [")
        before = len(w.names("list_models"))
        outcome = handlers.bake(host, BakeRequest(label, [LoraRow("narrow_a.safetensors", 0.5, 0.5)], "with_a"))
        assert outcome.ok, outcome.message
        assert outcome.path == w.model_path / "with_a.safetensors" and outcome.path.is_file()
        assert len(w.names("list_models")) == before + 1  # the WebUI's checkpoint list now has it
        assert any(t.startswith("with_a.safetensors [") for t in sd.checkpoint_tiles())
        assert [c[0] for c in w.calls].count("state.begin") == 1 and not w.queue_lock.locked()
    finally:
        w.uninstall()
