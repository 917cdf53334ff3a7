"""The hashes the WebUIs show, computed on another thread while a job does its work.

A LoRA's hash is the sha256 of its safetensors data section (A1111's ``sshs_model_hash`` /
Civitai's AutoV2); a checkpoint's is the sha256 of the whole file. hashlib releases the GIL, so a
thread hashing beside the merge or bake costs one core, not wall time; digests are kept in a
small cache keyed by path, size and mtime (as A1111 keeps its own), so a checkpoint baked into
again is not read twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from ..errors import LoraMergeError

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


def legacy_model_hash(path: str | os.PathLike) -> str:
    """A1111's old checkpoint hash: sha256 of the 64 KiB at offset 1 MiB, 8 hex digits (``sd_merge_models``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        h.update(f.read(0x10000))
    return h.hexdigest()[:8]


def data_sha256(path: str | os.PathLike) -> str:
    """A LoRA's hash as A1111 computes it: the data section of a safetensors file, else the whole file."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return file_sha256(path, _data_start(path))
    return file_sha256(path)


def _data_start(path: Path) -> int:
    """Where a safetensors file's data section begins: after the 8-byte header length and the header.
    (Read here without torch, so a CLI job can start hashing while torch is still being imported.)"""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        length = f.read(8)
    n = int.from_bytes(length, "little") if len(length) == 8 else -1
    if not 0 <= n <= size - 8:
        raise LoraMergeError("not a safetensors file (its header length does not fit the file)", path)
    return 8 + n


CACHE_ENV = "LORAMERGE_CACHE_DIR"  # a folder, or "off"


def cache_file() -> Path | None:
    """Where known hashes are kept: $LORAMERGE_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, /sd-webui-lora-merger."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "0", "no") else Path(chosen) / "hashes.json"
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "sd-webui-lora-merger" / "hashes.json"


class HashCache:
    """sha256 digests of files by (path, size, mtime): a 7 GB checkpoint is hashed once, as A1111 caches its
    own checkpoint hashes. Entries whose file changed size or mtime are recomputed; a cache that cannot be
    read or written is simply not used."""

    _lock = threading.Lock()

    def __init__(self, path: Path | None):
        self.path = path

    @staticmethod
    def _key(file: Path, whole: bool) -> tuple[str, dict] | None:
        try:
            st = file.stat()
        except OSError:
            return None
        return f"{'file' if whole else 'data'}:{file.resolve()}", {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def _load(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))  # type: ignore[union-attr]
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, file: Path, whole: bool) -> str | None:
        key = self._key(file, whole) if self.path else None
        if key is None:
            return None
        entry = self._load().get(key[0])
        if isinstance(entry, dict) and all(entry.get(k) == v for k, v in key[1].items()):
            digest = entry.get("sha256")
            return digest if isinstance(digest, str) and len(digest) == 64 else None
        return None

    def put(self, file: Path, whole: bool, digest: str) -> None:
        key = self._key(file, whole) if self.path else None
        if key is None:
            return
        with self._lock, contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
            data = self._load()
            data[key[0]] = {**key[1], "sha256": digest}
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")  # type: ignore[union-attr]
            tmp.write_text(json.dumps(data, indent=0, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.path)  # type: ignore[arg-type]


class BackgroundHashes(threading.Thread):
    """Hashes files one after another on a thread; ``result(i)`` waits for the i-th.

    ``whole``: hash whole files (checkpoints); else as :func:`data_sha256` (LoRAs).
    """

    def __init__(self, paths: Sequence[Path | None], whole: bool = False, cache: HashCache | None = None):
        super().__init__(daemon=True, name="lora-merger-hash")
        self.paths = list(paths)
        self.whole = whole
        self.cache = cache if cache is not None else HashCache(cache_file())
        self.digests: list[str] = [""] * len(self.paths)
        self.cached: list[bool] = [False] * len(self.paths)
        self.error: tuple[Path, BaseException] | None = None
        self.start()

    def run(self) -> None:
        for i, path in enumerate(self.paths):
            if path is None or not path.is_file():  # a LoRA built in memory has no file
                continue
            try:
                known = self.cache.get(path, self.whole)
                if known:
                    self.digests[i], self.cached[i] = known, True
                    continue
                self.digests[i] = file_sha256(path) if self.whole else data_sha256(path)
                self.cache.put(path, self.whole, self.digests[i])
            except BaseException as e:  # reported by result()
                self.error = (path, e)
                return

    @classmethod
    def reuse(cls, started: BackgroundHashes | None, paths: Sequence[Path | None],
              whole: bool = False) -> BackgroundHashes:
        """``started`` (hashes begun earlier: the CLI starts them while torch is imported) when it hashes
        exactly these files this way, else hashing them starts now."""
        if started is not None and started.covers(paths, whole):
            return started
        return cls(paths, whole)

    def covers(self, paths: Sequence[Path | None], whole: bool = False) -> bool:
        """Whether this hashes exactly ``paths`` (the same files, in order) the ``whole`` way."""
        def same(a: Path | None, b: Path | None) -> bool:
            if a is None or b is None:
                return a is b
            try:
                return os.path.samefile(a, b)
            except OSError:
                return False
        return whole == self.whole and len(paths) == len(self.paths) and \
            all(same(a, b) for a, b in zip(self.paths, paths, strict=True))

    def result(self, i: int = 0) -> str:
        self.join()
        if self.error is not None:
            path, e = self.error
            if isinstance(e, LoraMergeError):
                raise e
            raise LoraMergeError(f"cannot hash the file ({getattr(e, 'strerror', None) or e})", path)
        return self.digests[i]
