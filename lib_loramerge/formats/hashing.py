"""The hashes the WebUIs show, computed on another thread while a job does its work.

A LoRA's hash is the sha256 of its safetensors data section (A1111's ``sshs_model_hash`` /
Civitai's AutoV2); a checkpoint's is the sha256 of the whole file. hashlib releases the GIL, so a
thread hashing beside the merge or bake costs one core, not wall time.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from ..errors import LoraMergeError
from .safetensors_io import read_header

CHUNK = 8 << 20


def file_sha256(path: str | os.PathLike, start: int = 0) -> str:
    """sha256 of ``path`` from byte ``start`` to the end."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def data_sha256(path: str | os.PathLike) -> str:
    """A LoRA's hash as A1111 computes it: the data section of a safetensors file, else the whole file."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return file_sha256(path, read_header(path).data_start)
    return file_sha256(path)


class BackgroundHashes(threading.Thread):
    """Hashes files one after another on a thread; ``result(i)`` waits for the i-th.

    ``whole``: hash whole files (checkpoints); else as :func:`data_sha256` (LoRAs).
    """

    def __init__(self, paths: Sequence[Path | None], whole: bool = False):
        super().__init__(daemon=True, name="lora-merger-hash")
        self.paths = list(paths)
        self.whole = whole
        self.digests: list[str] = [""] * len(self.paths)
        self.error: tuple[Path, BaseException] | None = None
        self.start()

    def run(self) -> None:
        for i, path in enumerate(self.paths):
            if path is None or not path.is_file():  # a LoRA built in memory has no file
                continue
            try:
                self.digests[i] = file_sha256(path) if self.whole else data_sha256(path)
            except BaseException as e:  # reported by result()
                self.error = (path, e)
                return

    def result(self, i: int = 0) -> str:
        self.join()
        if self.error is not None:
            path, e = self.error
            if isinstance(e, LoraMergeError):
                raise e
            raise LoraMergeError(f"cannot hash the file ({getattr(e, 'strerror', None) or e})", path)
        return self.digests[i]
