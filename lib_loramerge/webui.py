"""The tab inside AUTOMATIC1111 / Forge: the only code that imports WebUI modules.

Every WebUI import happens inside a function, when the WebUI is running: this module itself
imports cleanly anywhere (tests install a stand-in ``modules`` package). The names used exist with
the same meaning in A1111 1.10 and Forge (see the notes on each method where they differ).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .blocks.presets import PresetBook, load_presets
from .ui.host import Host, JobInterrupted

T = TypeVar("T")

TAB_TITLE = "LoRA Merge"
TAB_ID = "lora_merger"


def is_forge() -> bool:
    return importlib.util.find_spec("modules_forge") is not None


class WebUIHost(Host):
    name = "webui"

    def __init__(self) -> None:
        self._running = False  # Stop interrupts only our own job, never someone's image generation

    def lora_dirs(self) -> list[Path]:
        from modules import shared

        dirs = [shared.cmd_opts.lora_dir]
        # A1111 also lists LoRAs from the old LyCORIS folder; Forge declares the flag but never scans it
        if not is_forge():
            dirs.append(getattr(shared.cmd_opts, "lyco_dir_backcompat", None))
        return list(dict.fromkeys(Path(d) for d in dirs if d))

    def checkpoint_dir(self) -> Path | None:
        from modules import sd_models, shared

        # where the WebUI's own checkpoint merger saves: --ckpt-dir if given, else models/Stable-diffusion
        return Path(shared.cmd_opts.ckpt_dir or sd_models.model_path)

    def checkpoints(self) -> dict[str, Path]:
        from modules import sd_models

        # the WebUI's own labels (A1111: "name [hash]", Forge: "name"), as in its checkpoint dropdown
        found = {}
        for tile in sd_models.checkpoint_tiles():
            info = sd_models.get_closet_checkpoint_match(tile)
            if info is not None:
                found[tile] = Path(info.filename)
        return found

    def current_checkpoint(self) -> str | None:
        from modules import sd_models, shared

        # model_data.sd_model, not shared.sd_model: reading the latter loads a model when none is loaded
        loaded = getattr(getattr(sd_models.model_data, "sd_model", None), "sd_checkpoint_info", None)
        wanted = [getattr(loaded, "filename", None)]
        selected = sd_models.get_closet_checkpoint_match(getattr(shared.opts, "sd_model_checkpoint", None) or "")
        wanted.append(getattr(selected, "filename", None))
        by_file = {str(path): label for label, path in self.checkpoints().items()}
        for filename in wanted:
            if filename and str(Path(filename)) in by_file:
                return by_file[str(Path(filename))]
        return None

    def presets(self) -> PresetBook:
        from modules import paths_internal

        # extensions live in <data dir>/extensions, which is the WebUI folder unless --data-dir moves it
        return load_presets(webui_root=paths_internal.data_path)

    def device(self) -> str:
        from modules import devices

        return str(devices.device)

    def refresh_loras(self) -> None:
        try:
            import networks  # the built-in Lora extension's module (on sys.path only while it loads)
        except ImportError:  # that extension is disabled: nothing to refresh
            return
        networks.list_available_networks()

    def refresh_checkpoints(self) -> None:
        from modules import sd_models

        sd_models.list_models()

    def refresh_button(self, dropdowns: list, refresh: Callable[[], None], choices: Callable[[], dict], elem_id: str):
        from modules import ui_common

        return ui_common.create_refresh_button(dropdowns if len(dropdowns) > 1 else dropdowns[0], refresh, choices,
                                               elem_id)

    def run_job(self, title: str, job: Callable[[], T]) -> T:
        """Run under the WebUI's GPU queue lock (never during an image generation), with ``shared.state``.

        ``wrap_gradio_gpu_call`` takes the lock, begins and ends ``shared.state`` (and resets its
        interrupt flag), frees GPU memory after; it turns exceptions into HTML for its own outputs,
        so the job's result or exception is carried out of it here.
        """
        from modules import call_queue, shared

        outcome: dict = {}

        def body() -> list:
            shared.state.job = title
            shared.state.textinfo = title
            self._running = True
            try:
                outcome["result"] = job()
            except BaseException as e:  # noqa: BLE001 (re-raised below, outside the WebUI's wrapper)
                outcome["error"] = e
            finally:
                self._running = False
            return [""]  # the wrapper appends its timing HTML to the last output

        call_queue.wrap_gradio_gpu_call(body, extra_outputs=[])()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def job_progress(self, done: int, total: int, what: str) -> None:
        from modules import shared

        shared.state.job_count = total
        shared.state.job_no = done
        shared.state.textinfo = what
        if shared.state.interrupted:
            raise JobInterrupted()

    def interrupt(self) -> None:
        from modules import shared

        if self._running:
            shared.state.interrupt()


def on_ui_tabs() -> list[tuple]:
    """The ``script_callbacks.on_ui_tabs`` callback: one tab, titled "LoRA Merge"."""
    from .ui import build_tab

    return [(build_tab(WebUIHost()), TAB_TITLE, TAB_ID)]
