"""A stand-in for the parts of AUTOMATIC1111 v1.10.1 the extension uses, installed into sys.modules.

Signatures and behaviour follow the real modules (modules/script_callbacks.py, shared_state.py,
sd_models.py, ui_common.py, call_queue.py, paths_internal.py, devices.py and the built-in Lora
extension's networks.py); ``test_webui_fake_mirrors_a1111`` compares the signatures with the real
source when it is on this machine. Everything is recorded in ``FakeWebUI.calls`` for the tests.
"""

from __future__ import annotations

import os
import sys
import threading
import types
from argparse import Namespace
from functools import wraps
from pathlib import Path

import torch

MODULES = ("modules", "modules.script_callbacks", "modules.shared", "modules.devices", "modules.sd_models",
           "modules.ui_common", "modules.call_queue", "modules.paths_internal", "modules.scripts",
           "modules.processing", "networks")


class State:
    """modules/shared_state.py State, the fields a job uses."""

    def __init__(self, calls: list):
        self._calls = calls
        self.interrupted = False
        self.skipped = False
        self.stopping_generation = False
        self.job = ""
        self.job_no = 0
        self.job_count = 0
        self.textinfo = None

    def interrupt(self):
        self.interrupted = True

    def begin(self, job: str = "(unknown)"):
        self._calls.append(("state.begin", job))
        self.job_count = -1
        self.job_no = 0
        self.interrupted = False
        self.skipped = False
        self.textinfo = None
        self.job = job

    def end(self):
        self._calls.append(("state.end", self.job))
        self.job = ""
        self.job_count = 0


class FakeWebUI:
    """Builds the stand-in ``modules`` package for a WebUI whose data folder is ``root``."""

    def __init__(self, root: Path, *, ckpt_dir: Path | None = None):
        self.root = root
        self.calls: list = []
        self.lora_dir = root / "models" / "Lora"
        self.lyco_dir = root / "models" / "LyCORIS"
        self.model_path = root / "models" / "Stable-diffusion"
        for d in (self.lora_dir, self.lyco_dir, self.model_path):
            d.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = ckpt_dir
        self.state = State(self.calls)
        self.queue_lock = threading.Lock()
        self.modules = self._build()

    # -- the package -------------------------------------------------------------------------------
    def _build(self) -> dict[str, types.ModuleType]:
        calls = self.calls
        mods = {name: types.ModuleType(name) for name in MODULES}
        mods["modules"].__path__ = []  # a package

        sc = mods["modules.script_callbacks"]
        sc.callback_map = {"callbacks_ui_tabs": [], "callbacks_model_loaded": []}

        def on_ui_tabs(callback, *, name=None):
            sc.callback_map["callbacks_ui_tabs"].append(callback)

        def on_model_loaded(callback, *, name=None):
            sc.callback_map["callbacks_model_loaded"].append(callback)

        def model_loaded_callback(sd_model):
            for c in sc.callback_map["callbacks_model_loaded"]:
                c(sd_model)

        sc.on_model_loaded, sc.model_loaded_callback = on_model_loaded, model_loaded_callback

        scripts = mods["modules.scripts"]  # modules/scripts.py: the Script base class and AlwaysVisible
        scripts.AlwaysVisible = object()
        scripts.Script = type("Script", (), {"title": lambda self: "", "show": lambda self, is_img2img: True,
                                             "ui": lambda self, is_img2img: None, "process": lambda self, p, *a: None})

        processing = mods["modules.processing"]  # the conditioning cache both WebUIs keep on this class
        processing.StableDiffusionProcessing = type("StableDiffusionProcessing", (), {
            "cached_c": [None, None], "cached_uc": [None, None]})

        def ui_tabs_callback():
            res = []
            for c in sc.callback_map["callbacks_ui_tabs"]:
                res += c() or []
            return res

        sc.on_ui_tabs, sc.ui_tabs_callback = on_ui_tabs, ui_tabs_callback

        shared = mods["modules.shared"]
        shared.cmd_opts = Namespace(lora_dir=str(self.lora_dir), lyco_dir_backcompat=str(self.lyco_dir),
                                    ckpt_dir=str(self.ckpt_dir) if self.ckpt_dir else None, ckpt=None)
        shared.opts = Namespace(sd_model_checkpoint=None, memmon_poll_rate=0)
        shared.state = self.state

        devices = mods["modules.devices"]
        devices.cpu = torch.device("cpu")
        devices.device = torch.device("cpu")
        devices.torch_gc = lambda: calls.append(("torch_gc",))

        paths = mods["modules.paths_internal"]
        paths.data_path = str(self.root)
        paths.script_path = str(self.root)
        paths.models_path = str(self.root / "models")
        paths.extensions_dir = str(self.root / "extensions")

        sd = mods["modules.sd_models"]
        sd.model_path = str(self.model_path)
        sd.checkpoints_list = {}
        sd.checkpoint_aliases = {}

        class CheckpointInfo:
            def __init__(self, filename):
                self.filename = filename
                base = os.path.abspath(shared.cmd_opts.ckpt_dir) if shared.cmd_opts.ckpt_dir else sd.model_path
                self.name = os.path.relpath(os.path.abspath(filename), base)
                self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
                self.shorthash = f"{abs(hash(self.name)) % 10**10:010d}"
                self.title = f"{self.name} [{self.shorthash}]"
                self.short_title = f"{self.name_for_extra} [{self.shorthash}]"
                self.ids = [self.title, self.name, self.name_for_extra]

            def register(self):
                sd.checkpoints_list[self.title] = self
                for i in self.ids:
                    sd.checkpoint_aliases[i] = self

        def checkpoint_tiles(use_short=False):
            return [x.short_title if use_short else x.title for x in sd.checkpoints_list.values()]

        def list_models():
            calls.append(("list_models",))
            sd.checkpoints_list.clear()
            sd.checkpoint_aliases.clear()
            folders = [sd.model_path, *([shared.cmd_opts.ckpt_dir] if shared.cmd_opts.ckpt_dir else [])]
            for folder in folders:
                for path in sorted(Path(folder).rglob("*")):
                    if path.suffix in (".ckpt", ".safetensors") and ".vae." not in path.name:
                        CheckpointInfo(str(path)).register()

        def get_closet_checkpoint_match(search_string):
            if not search_string:
                return None
            info = sd.checkpoint_aliases.get(search_string)
            if info is not None:
                return info
            found = sorted((i for i in sd.checkpoints_list.values() if search_string in i.title), key=lambda i: len(i.title))
            return found[0] if found else None

        sd.CheckpointInfo, sd.checkpoint_tiles, sd.list_models = CheckpointInfo, checkpoint_tiles, list_models
        sd.get_closet_checkpoint_match = get_closet_checkpoint_match
        sd.model_data = types.SimpleNamespace(sd_model=None)  # SdModelData: no model loaded yet

        ui_common = mods["modules.ui_common"]

        def create_refresh_button(refresh_component, refresh_method, refreshed_args, elem_id):
            import gradio as gr

            calls.append(("create_refresh_button", elem_id))
            refresh_components = refresh_component if isinstance(refresh_component, list) else [refresh_component]

            def refresh():
                refresh_method()
                args = refreshed_args() if callable(refreshed_args) else refreshed_args
                for k, v in args.items():
                    for comp in refresh_components:
                        setattr(comp, k, v)
                updates = [gr.update(**(args or {})) for _ in refresh_components]
                return updates if len(refresh_components) > 1 else updates[0]

            button = gr.Button(value="🔄", elem_id=elem_id)
            button.click(fn=refresh, inputs=[], outputs=refresh_components)
            return button

        ui_common.create_refresh_button = create_refresh_button

        cq = mods["modules.call_queue"]
        cq.queue_lock = self.queue_lock

        def wrap_queued_call(func):
            def f(*args, **kwargs):
                with cq.queue_lock:
                    return func(*args, **kwargs)
            return f

        def wrap_gradio_gpu_call(func, extra_outputs=None):
            @wraps(func)
            def f(*args, **kwargs):
                with cq.queue_lock:
                    shared.state.begin(job=None)
                    res = func(*args, **kwargs)
                    shared.state.end()
                return res

            return wrap_gradio_call(f, extra_outputs=extra_outputs, add_stats=True)

        def wrap_gradio_call(func, extra_outputs=None, add_stats=False):
            @wraps(func)
            def f(*args, extra_outputs_array=extra_outputs, **kwargs):
                try:
                    res = list(func(*args, **kwargs))
                except Exception as e:  # the real one logs and shows the error as HTML in the last output
                    res = list(extra_outputs_array or [None, ""]) + [f"<div class='error'>{type(e).__name__}: {e}</div>"]
                finally:
                    shared.state.skipped = False
                    shared.state.interrupted = False
                    shared.state.job_count = 0
                    shared.state.job = ""
                devices.torch_gc()
                if add_stats:
                    res[-1] += "<div class='performance'><p class='time'>Time taken: 0.1 sec.</p></div>"
                return tuple(res)

            return f

        cq.wrap_queued_call, cq.wrap_gradio_gpu_call, cq.wrap_gradio_call = (wrap_queued_call, wrap_gradio_gpu_call,
                                                                            wrap_gradio_call)

        networks = mods["networks"]

        def list_available_networks():
            calls.append(("list_available_networks",))

        networks.list_available_networks = list_available_networks

        for name in MODULES[1:]:
            if name.startswith("modules."):
                setattr(mods["modules"], name.split(".", 1)[1], mods[name])
        return mods

    def install(self) -> None:
        for name, module in self.modules.items():
            sys.modules[name] = module

    def uninstall(self) -> None:
        for name in self.modules:
            sys.modules.pop(name, None)

    def names(self, what: str) -> list:
        return [c for c in self.calls if c[0] == what]
