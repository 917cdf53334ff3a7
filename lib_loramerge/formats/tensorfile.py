"""Open a tensor container (.safetensors, or .pt/.ckpt through the safe unpickler) by key.

Keys, dtypes and shapes come from the header alone, so a file can be classified (LoRA format,
checkpoint, something else) before any tensor is read; tensors are then read one by one.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoraMergeError
from .safetensors_io import ByteRange, Header, read_header, torch_dtype

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".ckpt", ".pth", ".bin")


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]


class TensorFile:
    """Read-only access to the tensors of one file, by key, loading each tensor on demand."""

    def __init__(self, path: Path, infos: dict[str, TensorInfo], metadata: dict[str, str],
                 container: str, header: Header | None = None, tensors: dict[str, torch.Tensor] | None = None,
                 non_tensors: list[str] | None = None):
        self.path = path
        self.infos = infos
        self.metadata = metadata
        self.container = container  # "safetensors" or "pickle"
        self.header = header
        self.non_tensors = non_tensors or []
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor into its own memory (no mmap: memory is released as soon as it is dropped)."""
        if key not in self.infos:
            raise KeyError(key)
        if self._tensors is not None:
            return self._tensors[key]
        info = self.infos[key]
        out = torch.empty(info.shape, dtype=info.dtype)
        self.read_into(key, out)
        return out

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Read one tensor's bytes into ``out``, a contiguous CPU tensor of its dtype and shape: memory the
        caller reuses tensor after tensor (a batch's staging buffer), warm in the cache and in the page tables."""
        self.read_many_into([(key, out)])

    def read_many_into(self, requests: Sequence[tuple[str, torch.Tensor]]) -> None:
        """:meth:`read_into` for several tensors: the file opened and its size checked once, and tensors
        that lie back to back in it (a module's down and up factors) read by one system call."""
        for key, out in requests:
            info = self.infos[key]
            if out.dtype != info.dtype or tuple(out.shape) != info.shape or not out.is_contiguous():
                raise LoraMergeError(f"internal: tensor '{key}' is {info.dtype} {list(info.shape)}, the buffer "
                                     f"{out.dtype} {list(out.shape)}", self.path)
        if self._tensors is not None:
            for key, out in requests:
                out.copy_(self._tensors[key])
            return
        assert self.header is not None
        entries = self.header.entries
        runs: list[tuple[int, list[memoryview], str]] = []  # (offset, buffers, first key) of contiguous bytes
        end = None
        for key, out in sorted(requests, key=lambda r: entries[r[0]].begin):
            entry = entries[key]
            if entry.end == entry.begin:
                continue
            target = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            if entry.begin == end:
                runs[-1][1].append(target)
            else:
                runs.append((self.header.data_start + entry.begin, [target], key))
            end = entry.end
        if not runs:
            return
        try:
            with open(self.path, "rb", buffering=0) as f:  # unbuffered: the bytes go straight into the buffers
                if os.fstat(f.fileno()).st_size != self.header.file_size:
                    raise LoraMergeError("the file changed on disk while it was being read", self.path)
                for offset, buffers, key in runs:
                    if not _read_exactly(f, offset, buffers):
                        raise LoraMergeError(f"truncated file: tensor '{key}' is incomplete", self.path)
        except OSError as e:
            raise LoraMergeError(f"cannot read tensor '{runs[0][2]}' ({_short(e)})", self.path) from e

    def byte_range(self, key: str) -> ByteRange | None:
        """Where a tensor's raw bytes lie in the file (safetensors only), for copying it unchanged."""
        if self.header is None:
            return None
        entry = self.header.entries[key]
        return ByteRange(self.path, self.header.data_start + entry.begin, entry.end - entry.begin)

    def close(self) -> None:
        """Nothing stays open between reads; kept for the context-manager protocol."""

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_exactly(f, offset: int, buffers: list[memoryview]) -> bool:
    """Fill ``buffers`` with the bytes from ``offset`` on, in one ``preadv`` where the OS has it (else seek
    and read). A read may return less than asked (2 GiB at most on Linux): go on until all is read.
    False at the end of the file."""
    pending = [b for b in buffers if len(b)]
    preadv = getattr(os, "preadv", None)
    if preadv is None:
        f.seek(offset)
    while pending:
        n = preadv(f.fileno(), pending[:512], offset) if preadv is not None else f.readinto(pending[0])
        if not n:
            return False
        offset += n
        while n:  # drop what was filled
            take = min(n, len(pending[0]))
            n -= take
            pending[0] = pending[0][take:]
            if not pending[0]:
                pending.pop(0)
    return True


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


def check_input_path(path: str | os.PathLike) -> Path:
    """Refuse a missing file, a folder or an empty file, naming it."""
    p = Path(path)
    if not p.exists():
        raise LoraMergeError("no such file", p)
    if p.is_dir():
        raise LoraMergeError("is a directory, not a file", p)
    if p.stat().st_size == 0:
        raise LoraMergeError("empty file", p)
    if not os.access(p, os.R_OK):
        raise LoraMergeError("file is not readable (permissions)", p)
    return p


def open_tensor_file(path: str | os.PathLike, container: str | None = None) -> TensorFile:
    """Open ``path`` by its suffix (or as ``container``, "safetensors"); anything but safetensors or a
    weights-only pickle is refused."""
    p = check_input_path(path)
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES or container == "safetensors":
        header = read_header(p)
        infos = {k: TensorInfo(torch_dtype(e.dtype), e.shape) for k, e in header.entries.items()}
        return TensorFile(p, infos, header.metadata, "safetensors", header=header)
    if suffix in PICKLE_SUFFIXES:
        return _open_pickle(p)
    raise LoraMergeError(
        f"unsupported file type '{p.suffix or '(no suffix)'}' (expected .safetensors, or .pt/.ckpt)", p)


# slack for the pickle and the zip's own records beside the tensor data
_PICKLE_SLACK = 1 << 20


def check_pickle_archive(p: Path) -> None:
    """Refuse a torch file whose loading could allocate far more than the file holds, before loading it.

    torch.save writes a zip whose records are stored, not compressed: the tensors' bytes are the
    file's bytes. A compressed record can declare gigabytes in a few kilobytes (torch would
    allocate them all), and the old pre-zip format declares each storage's size in the pickle and
    allocates it before reading: neither is something torch.save writes today.
    """
    if not zipfile.is_zipfile(p):
        raise LoraMergeError("refused: an old (pre-zip, torch < 1.6) or unknown pickle format, whose tensor sizes "
                             "cannot be checked before loading; re-save it with a current torch or as .safetensors", p)
    try:
        with zipfile.ZipFile(p) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise LoraMergeError(f"corrupt or truncated .pt file ({_short(e)})", p) from None
    size = p.stat().st_size
    declared = sum(r.file_size for r in records)
    if declared > size + _PICKLE_SLACK:
        packed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
        what = f"compressed records (e.g. '{packed[0]}')" if packed else "its records"
        raise LoraMergeError(f"refused: {what} declare {declared} bytes in a file of {size} bytes "
                             "(torch.save stores tensors uncompressed)", p)


def _open_pickle(p: Path) -> TensorFile:
    check_pickle_archive(p)
    try:
        with warnings.catch_warnings():  # torch warns on some refusals; the error line says it all
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise LoraMergeError(
                "refused: this pickle needs arbitrary code to load, which is unsafe "
                "(only plain tensor files are read; convert it to .safetensors with a tool you trust)", p) from e
        raise LoraMergeError(f"corrupt or unsupported pickle ({_short(e)})", p) from e
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        raise LoraMergeError(f"corrupt or truncated .pt file ({_short(e)})", p) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning-style checkpoint wrapper
    if isinstance(obj, (list, tuple)):
        if obj and all(isinstance(t, torch.Tensor) for t in obj):
            raise LoraMergeError(
                f"unsupported format: a bare pickled list of {len(obj)} tensors (cloneofsimo lora_diffusion "
                "'.pt'); its tensors have positions, not names, so they cannot be matched to model layers", p)
        raise LoraMergeError(f"not a LoRA: the pickle holds a {type(obj).__name__}, not named tensors", p)
    if not isinstance(obj, dict):
        raise LoraMergeError(f"not a LoRA: the pickle holds a {type(obj).__name__}, not named tensors", p)
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    others = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    infos = {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    return TensorFile(p, infos, {}, "pickle", tensors=tensors, non_tensors=others)
