"""safetensors without surprises: a validating header reader and a streaming, atomic writer.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor dtypes,
shapes and byte ranges, plus string metadata) padded with spaces to 8 bytes, then raw tensor
bytes. Reading the header ourselves lets us reject a truncated or foreign file with a precise
message before any tensor is touched; writing it ourselves lets a checkpoint be baked tensor by
tensor (peak memory: one tensor, not one model) and lets the sshs hashes be computed over
exactly the bytes that reach the disk.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import queue
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoraMergeError

# safetensors dtype names, in the order of the library's own enum: the writer sorts tensors by
# this order (descending), then by name, exactly as safetensors.torch.save does, so that a file
# we write has the same data section as the reference implementation would produce.
_DTYPE_ENUM_ORDER = [
    "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
    "I32", "U32", "F32", "F64", "I64", "U64",
]
_NAME_TO_DTYPE: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32,
    "F64": torch.float64, "I64": torch.int64,
}
for _name, _attr in (("F8_E5M2", "float8_e5m2"), ("F8_E4M3", "float8_e4m3fn"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):  # newer dtypes: absent from the torch 2.1 that A1111 ships
        _NAME_TO_DTYPE[_name] = getattr(torch, _attr)
_DTYPE_TO_NAME = {v: k for k, v in _NAME_TO_DTYPE.items()}
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
             "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float16`` → ``"F16"``)."""
    try:
        return _DTYPE_TO_NAME[dtype]
    except KeyError:
        raise LoraMergeError(f"dtype {dtype} cannot be stored in safetensors") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    try:
        return _NAME_TO_DTYPE[name]
    except KeyError:
        raise LoraMergeError(f"tensor dtype {name} is not supported by this torch") from None


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as the header describes it; offsets are relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    entries: dict[str, HeaderEntry]
    metadata: dict[str, str]
    data_start: int  # absolute file offset of the data section
    file_size: int


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate a safetensors header; raise a one-line LoraMergeError when it is not one."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise LoraMergeError(f"not a safetensors file ({size} bytes, too short for a header)", path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or n < 2:
            raise LoraMergeError("not a safetensors file (its first 8 bytes are not a header length)", path)
        if n > size - 8:
            raise LoraMergeError(
                f"truncated or not a safetensors file (header of {n} bytes, file of {size} bytes)", path)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise LoraMergeError("not a safetensors file (the header is not JSON)", path) from None
    if not isinstance(header, dict):
        raise LoraMergeError("not a safetensors file (the header is not a JSON object)", path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoraMergeError("corrupt safetensors header (__metadata__ must map names to strings)", path)
    data_size = size - 8 - n
    entries: dict[str, HeaderEntry] = {}
    for name, info in header.items():
        entries[name] = _parse_entry(name, info, data_size, path)
    return Header(entries=entries, metadata=dict(metadata), data_start=8 + n, file_size=size)


def _parse_entry(name: str, info: object, data_size: int, path: Path) -> HeaderEntry:
    try:
        dtype = info["dtype"]  # type: ignore[index]
        shape = tuple(int(d) for d in info["shape"])  # type: ignore[index]
        begin, end = (int(o) for o in info["data_offsets"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        raise LoraMergeError(f"corrupt safetensors header (bad entry for tensor '{name}')", path) from None
    if dtype not in _ITEMSIZE or any(d < 0 for d in shape):
        raise LoraMergeError(f"corrupt safetensors header (tensor '{name}': dtype {dtype}, shape {list(shape)})", path)
    expected = math.prod(shape) * _ITEMSIZE[dtype]
    if end - begin != expected or begin < 0:
        raise LoraMergeError(
            f"corrupt safetensors header (tensor '{name}' has {end - begin} bytes, its shape needs {expected})", path)
    if end > data_size:
        raise LoraMergeError(
            f"truncated file: tensor '{name}' ends at data byte {end} but the file holds {data_size}", path)
    return HeaderEntry(dtype, shape, begin, end)


# ----------------------------------------------------------------------------------------------
# Writing


@dataclass
class TensorSpec:
    """A tensor to write: its final dtype and shape, and either the tensor or a function making it.

    A producer is called once, when the writer reaches the tensor, so a caller can stream a
    checkpoint without holding all of it. The tensor it returns is cast to ``dtype``.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: torch.Tensor | Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[dtype_name(self.dtype)]

    def materialize(self) -> torch.Tensor:
        t = self.source() if callable(self.source) else self.source
        if tuple(t.shape) != tuple(self.shape):
            raise LoraMergeError(f"internal: tensor {self.name} has shape {list(t.shape)}, expected {list(self.shape)}")
        return t.detach().to(device="cpu", dtype=self.dtype).contiguous()


def spec_of(name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> TensorSpec:
    return TensorSpec(name, dtype or tensor.dtype, tuple(tensor.shape), tensor)


def ordered(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """Data-section order of safetensors: larger dtypes first (by its enum), then by name."""
    rank = {n: i for i, n in enumerate(_DTYPE_ENUM_ORDER)}
    return sorted(specs, key=lambda s: (-rank[dtype_name(s.dtype)], s.name))


def header_bytes(specs: list[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    """The length prefix and JSON header for ``specs`` (already ordered), as safetensors writes it."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    seen = set()
    for s in specs:
        if s.name in seen or s.name == "__metadata__":
            raise LoraMergeError(f"internal: duplicate or reserved tensor name '{s.name}'")
        seen.add(s.name)
        header[s.name] = {"dtype": dtype_name(s.dtype), "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor (no copy)."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def iter_data(specs: list[TensorSpec], prefetch: int = 0) -> Iterator[tuple[TensorSpec, memoryview]]:
    """Each spec with its bytes; with ``prefetch`` > 0 a thread makes up to that many tensors ahead,
    so producing the next tensor overlaps with writing this one."""
    if prefetch <= 0:
        for s in specs:
            yield s, tensor_bytes(s.materialize())
        return
    ready: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce() -> None:
        try:
            for s in specs:
                if stop.is_set():
                    return
                ready.put((s, tensor_bytes(s.materialize()), None))
        except BaseException as e:  # handed to the consumer, raised there
            ready.put((None, None, e))

    worker = threading.Thread(target=produce, name="safetensors-prefetch", daemon=True)
    worker.start()
    try:
        for _ in specs:
            spec, data, error = ready.get()
            if error is not None:
                raise error
            yield spec, data
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.05)
        worker.join()


MODEL_HASH_KEY, LEGACY_HASH_KEY = "sshs_model_hash", "sshs_legacy_hash"


class _HashTap:
    """kohya's ``sshs_model_hash`` and ``sshs_legacy_hash``, fed the data section as it is written.

    model hash: sha256 of the data section (what A1111 and Civitai compute from the file).
    legacy hash: first 8 hex digits of sha256 over the 64 KiB at offset 1 MiB of the file that
    safetensors would write with only the ``ss_*`` metadata (kohya's definition).
    """

    LO, HI = 0x100000, 0x110000

    def __init__(self, specs: list[TensorSpec], metadata: Mapping[str, str]):
        ss_meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
        head = header_bytes(specs, ss_meta)
        self.model = hashlib.sha256()
        self.legacy = bytearray(head[self.LO:self.HI])
        self.pos = len(head)

    def feed(self, data: memoryview) -> None:
        self.model.update(data)
        end = self.pos + len(data)
        if end > self.LO and self.pos < self.HI:
            self.legacy += data[max(self.LO - self.pos, 0):min(self.HI - self.pos, len(data))]
        self.pos = end

    def digests(self) -> dict[str, str]:
        return {MODEL_HASH_KEY: self.model.hexdigest(),
                LEGACY_HASH_KEY: hashlib.sha256(bytes(self.legacy)).hexdigest()[:8]}


def sshs_hashes(specs: Iterable[TensorSpec], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of ``specs`` as they would be written (see :class:`_HashTap`)."""
    specs = ordered(specs)
    tap = _HashTap(specs, metadata)
    for _, data in iter_data(specs):
        tap.feed(data)
    d = tap.digests()
    return d[MODEL_HASH_KEY], d[LEGACY_HASH_KEY]


def write_safetensors(path: str | os.PathLike, specs: Iterable[TensorSpec],
                      metadata: Mapping[str, str] | None = None, *, overwrite: bool = False,
                      sshs: bool = False, finalize: Callable[[], Mapping[str, str]] | None = None,
                      progress: Callable[[int, int], None] | None = None, prefetch: int = 0) -> dict[str, str]:
    """Write a safetensors file atomically: a temp file in the target folder, fsync, rename.

    Tensors are produced, cast and written one at a time. Metadata known only once the data is
    written goes in last, into a header of unchanged length: with ``sshs`` the kohya hashes,
    computed over the bytes as they go out; with ``finalize``, the values it returns (each
    replacing a placeholder of the same length already in ``metadata``). An existing file is
    replaced only with ``overwrite``; on any failure the temp file is removed and nothing is
    left behind. ``progress(done_bytes, total_bytes)`` is called after each tensor; ``prefetch``
    makes tensors ahead in a thread (see :func:`iter_data`). Returns the metadata written.
    """
    path = Path(path)
    check_writable_target(path, overwrite)
    specs = ordered(specs)
    meta = dict(metadata or {})
    tap = None
    if sshs:
        meta[MODEL_HASH_KEY], meta[LEGACY_HASH_KEY] = "0" * 64, "0" * 8  # placeholders of the final length
        tap = _HashTap(specs, meta)
    head = header_bytes(specs, meta)
    total = sum(s.nbytes for s in specs)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(head)
            done = 0
            for spec, data in iter_data(specs, prefetch):
                if len(data) != spec.nbytes:
                    raise LoraMergeError(f"internal: {spec.name} gave {len(data)} bytes, expected {spec.nbytes}")
                f.write(data)
                if tap:
                    tap.feed(data)
                done += len(data)
                if progress:
                    progress(done, total)
            if tap or finalize:
                meta.update(tap.digests() if tap else {})
                meta.update(finalize() if finalize else {})
                final = header_bytes(specs, meta)
                if len(final) != len(head):
                    raise LoraMergeError("internal: late metadata changed the header length")
                f.seek(0)
                f.write(final)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path, overwrite)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return meta


def check_writable_target(path: Path, overwrite: bool) -> None:
    """Fail early (before any work) when the output cannot or must not be written."""
    if path.is_dir():
        raise LoraMergeError("output path is a directory", path)
    if path.exists() and not overwrite:
        raise LoraMergeError("output file exists; choose another name or allow overwriting (--overwrite)", path)
    if not path.parent.is_dir():
        raise LoraMergeError("output folder does not exist", path)
    if not os.access(path.parent, os.W_OK):
        raise LoraMergeError("output folder is not writable", path)


def publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move a finished temp file into place; without ``overwrite`` never replace an existing file."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic "create if absent", even if another process raced us
    except FileExistsError:
        raise LoraMergeError("output file appeared while writing; not overwritten", path) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if path.exists():  # filesystems without hard links (FAT, some network shares)
            raise LoraMergeError("output file appeared while writing; not overwritten", path) from None
        os.rename(tmp, path)
        return
    tmp.unlink()
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_data_sha256(path: str | os.PathLike) -> str:
    """sha256 of a safetensors file's data section: A1111's LoRA hash (and Civitai's AutoV2)."""
    header = read_header(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(header.data_start)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
