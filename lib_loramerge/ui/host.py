"""What the tab needs from the program it runs in: folders, file lists, device, job control.

The tab talks only to a :class:`Host`. :class:`StandaloneHost` serves ``python -m lib_loramerge ui``
from command-line folders; ``lib_loramerge.webui.WebUIHost`` serves A1111 / Forge and is the only
code that imports WebUI modules.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..blocks.presets import PresetBook, load_presets
from ..blocks.prompt import LORA_SUFFIXES
from ..errors import LoraMergeError

if TYPE_CHECKING:
    from ..bake.live import LiveBake, LiveModel

T = TypeVar("T")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


class JobInterrupted(LoraMergeError):
    """The user pressed Stop (or the WebUI's Interrupt): the job ends and writes nothing."""

    def __init__(self) -> None:
        super().__init__("interrupted; nothing was written")


def scan_files(folders: Sequence[Path], suffixes: Iterable[str]) -> dict[str, Path]:
    """Files under ``folders`` by label: the path relative to its folder, '/'-separated.

    A label found in two folders keeps the first; the second is shown with its folder's name in
    front, so every file stays selectable and no label is ambiguous.
    """
    suffixes = tuple(s.lower() for s in suffixes)
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() not in suffixes or not path.is_file() or ".vae." in path.name.lower():
                continue
            label = path.relative_to(folder).as_posix()
            if label in found:
                label = f"{folder.name}/{label}"
            found.setdefault(label, path)
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


class Host:
    """The tab's view of its surroundings. Subclasses say where the files are; the rest has defaults."""

    name = "host"

    # -- folders and files -------------------------------------------------------------------
    def lora_dirs(self) -> list[Path]:
        """Folders LoRAs are listed from; merged LoRAs are saved in the first."""
        raise NotImplementedError

    def checkpoint_dir(self) -> Path | None:
        """Where baked checkpoints are saved (None: baking is not available)."""
        raise NotImplementedError

    def loras(self) -> dict[str, Path]:
        """LoRA files by the label the dropdowns show."""
        return scan_files(self.lora_dirs(), LORA_SUFFIXES)

    def checkpoints(self) -> dict[str, Path]:
        """Checkpoint files by the label the dropdowns show."""
        folder = self.checkpoint_dir()
        return scan_files([folder], CHECKPOINT_SUFFIXES) if folder else {}

    def current_checkpoint(self) -> str | None:
        """The label of the checkpoint in use (the bake default), if any."""
        return None

    def lora_output_dir(self) -> Path:
        dirs = self.lora_dirs()
        if not dirs:
            raise LoraMergeError("no LoRA folder configured")
        return dirs[0]

    def presets(self) -> PresetBook:
        """Block-weight presets: ours, then an installed LBW's (see ``load_presets``)."""
        return load_presets()

    def device(self) -> str:
        """Where the math runs unless the user picks otherwise."""
        from ..ops.merge import default_device

        return default_device()

    def semantics(self) -> str:
        """Whose DoRA rule a bake follows: the WebUI that will use the result ("a1111" or "forge")."""
        return "a1111"

    def runs_flux(self) -> bool | None:
        """Whether this WebUI can generate with Flux (None: not a WebUI, so no telling)."""
        return None

    # -- after a job ----------------------------------------------------------------------------
    def refresh_loras(self) -> None:
        """Make the host see LoRA files that appeared since it last looked."""

    def refresh_checkpoints(self) -> None:
        """Make the host see checkpoint files that appeared since it last looked."""

    def lora_written(self, path: Path) -> list[str]:
        """A LoRA file was written (maybe over one the host has cached): make the host use the new bytes.

        Returns notes for the user."""
        self.refresh_loras()
        return []

    def checkpoint_written(self, path: Path) -> list[str]:
        """A checkpoint file was written (maybe over the loaded one); returns notes for the user."""
        self.refresh_checkpoints()
        return []

    # -- the loaded model (WebUIs only) -----------------------------------------------------------
    supports_live_bake = False

    def live_model(self) -> LiveModel:
        """The model the host has loaded, for a live bake; a LoraMergeError when there is none."""
        raise LoraMergeError("baking into the loaded model needs a running WebUI with a model loaded")

    def live_bake(self) -> LiveBake | None:
        """The live bake applied to the loaded model, if any (None once that model is unloaded)."""
        return None

    def set_live_bake(self, bake: LiveBake | None) -> None:
        raise LoraMergeError("baking into the loaded model needs a running WebUI")

    def loaded_checkpoint_file(self) -> Path | None:
        """The file the loaded model came from."""
        return None

    # -- running a job --------------------------------------------------------------------------
    def run_job(self, title: str, job: Callable[[], T], on_wait: Callable[[str], None] | None = None) -> T:
        """Run ``job`` exclusively (never beside another job or, in a WebUI, an image generation).

        ``on_wait(message)`` is called first when the job has to wait for one that is running."""
        raise NotImplementedError

    def job_progress(self, done: int, total: int, what: str) -> None:
        """Called as a job advances; raises :class:`JobInterrupted` once the user asked to stop."""

    def interrupt(self) -> None:
        """Ask the running job to stop at its next progress step."""


class StandaloneHost(Host):
    """``python -m lib_loramerge ui``: folders from the command line, a lock and a stop flag of its own."""

    name = "standalone"

    def __init__(self, lora_dirs: Sequence[str | os.PathLike], checkpoint_dir: str | os.PathLike | None = None, *,
                 device: str | None = None, webui_root: str | os.PathLike | None = None,
                 preset_files: Sequence[str | os.PathLike] = ()):
        self._lora_dirs = [Path(d).resolve() for d in lora_dirs]
        self._checkpoint_dir = Path(checkpoint_dir).resolve() if checkpoint_dir else None
        self._device = device
        self._webui_root = webui_root
        self._preset_files = list(preset_files)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def lora_dirs(self) -> list[Path]:
        return list(self._lora_dirs)

    def checkpoint_dir(self) -> Path | None:
        return self._checkpoint_dir

    def presets(self) -> PresetBook:
        return load_presets(self._preset_files, self._webui_root)

    def device(self) -> str:
        return self._device or super().device()

    def run_job(self, title: str, job: Callable[[], T], on_wait: Callable[[str], None] | None = None) -> T:
        if on_wait is not None and self._lock.locked():
            on_wait("waiting for the running job to finish…")
        with self._lock:
            self._stop.clear()
            try:
                return job()
            finally:
                self._stop.clear()

    def job_progress(self, done: int, total: int, what: str) -> None:
        if self._stop.is_set():
            raise JobInterrupted()

    def interrupt(self) -> None:
        self._stop.set()
