"""safetensors without surprises: a validating header reader and a streaming, atomic writer.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor dtypes,
shapes and byte ranges, plus string metadata) padded with spaces to 8 bytes, then raw tensor
bytes. Reading the header ourselves lets us reject a truncated or foreign file with a precise
message before any tensor is touched; writing it ourselves lets a checkpoint be baked tensor by
tensor (peak memory: one tensor, not one model) and lets the sshs hashes be computed over
exactly the bytes that reach the disk.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import math
import os
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoraMergeError
from ..runtime import torch_threads
from .atomic import discard, new_file_mode, publish, temp_path
from .readahead import read_ahead

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
    """Parse and validate a safetensors header; raise a one-line LoraMergeError when it is not one.

    Besides the syntax, the format's own rule is enforced: the tensors' byte ranges, sorted by
    offset, tile the data section exactly (no overlap, no gap, nothing after the last one). A
    header whose entries share bytes would let a small file pose as a large one, so that every
    job reading it does work (and writes output) out of all proportion to its size.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise LoraMergeError(f"not a safetensors file ({size} bytes, too short for a header)", path)
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or n < 2:
                raise LoraMergeError("not a safetensors file (its first 8 bytes are not a header length)", path)
            if n > size - 8:
                raise LoraMergeError(
                    f"truncated or not a safetensors file (header of {n} bytes, file of {size} bytes)", path)
            raw = f.read(n)
    except OSError as e:
        raise LoraMergeError(f"cannot read the file ({e.strerror or e})", path) from None
    header = _parse_json(raw, path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoraMergeError("corrupt safetensors header (__metadata__ must map names to strings)", path)
    for key, value in metadata.items():
        _check_text(key, "metadata key", path)
        _check_text(value, f"metadata value of '{_shown(key)}'", path)
    data_size = size - 8 - n
    entries: dict[str, HeaderEntry] = {}
    for name, info in header.items():
        _check_text(name, "tensor name", path)
        entries[name] = _parse_entry(name, info, path)
    _check_tiling(entries, data_size, path)
    return Header(entries=entries, metadata=dict(metadata), data_start=8 + n, file_size=size)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(raw: bytes, path: Path) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        raise LoraMergeError("not a safetensors file (the header is not JSON)", path) from None
    except RecursionError:
        raise LoraMergeError("corrupt safetensors header (JSON nested too deeply)", path) from None
    if not isinstance(header, dict):
        raise LoraMergeError("not a safetensors file (the header is not a JSON object)", path)
    return header


def _shown(text: str, limit: int = 80) -> str:
    """A name from a file, safe to print (lone surrogates and control characters escaped)."""
    safe = text.encode("utf-8", "backslashreplace").decode("utf-8")
    safe = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in safe)
    return safe if len(safe) <= limit else safe[:limit] + "…"


def _check_text(text: str, what: str, path: Path) -> None:
    """JSON may spell lone UTF-16 surrogates (\\ud800); no UTF-8 file can hold them, and the reference
    reader refuses them: so do we, rather than fail later writing them out."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise LoraMergeError(f"corrupt safetensors header ({what} '{_shown(text)}' is not valid Unicode)", path) from None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(name: str, info: object, path: Path) -> HeaderEntry:
    def fail(why: str) -> LoraMergeError:
        return LoraMergeError(f"corrupt safetensors header (tensor '{_shown(name)}'{why})", path)

    if not isinstance(info, dict):
        raise fail(": not an entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if (not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list)
            or len(offsets) != 2):
        raise fail(": bad entry")
    if not all(_is_int(d) for d in (*shape, *offsets)):
        raise fail(f": shape {shape} and offsets {offsets} must be whole numbers")
    shape_t, (begin, end) = tuple(shape), offsets
    if dtype not in _ITEMSIZE or any(d < 0 for d in shape_t):
        raise fail(f": dtype {_shown(dtype)}, shape {shape}")
    expected = math.prod(shape_t) * _ITEMSIZE[dtype]
    if begin < 0 or end - begin != expected:
        raise fail(f" has {end - begin} bytes, its shape needs {expected}")
    return HeaderEntry(dtype, shape_t, begin, end)


def _check_tiling(entries: dict[str, HeaderEntry], data_size: int, path: Path) -> None:
    position = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin < position:
            raise LoraMergeError(f"corrupt safetensors header (tensor '{_shown(name)}' overlaps the bytes of another "
                                 f"tensor at data offset {e.begin})", path)
        if e.begin > position:
            raise LoraMergeError(f"corrupt safetensors header ({e.begin - position} bytes before tensor "
                                 f"'{_shown(name)}' belong to no tensor)", path)
        position = e.end
    if position > data_size:
        last = max(entries, key=lambda k: entries[k].end)
        raise LoraMergeError(
            f"truncated file: tensor '{_shown(last)}' ends at data byte {position} but the file holds {data_size}", path)
    if position < data_size:
        raise LoraMergeError(f"corrupt safetensors file ({data_size - position} bytes after the last tensor "
                             "belong to no tensor)", path)


# ----------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class ByteRange:
    """Raw tensor bytes to copy unchanged from another file (same dtype and shape in and out)."""

    path: Path
    offset: int  # absolute offset in ``path``
    nbytes: int


@dataclass
class TensorSpec:
    """A tensor to write: its final dtype and shape, and the tensor, a function making it, or raw bytes.

    A producer is called once, when the writer reaches the tensor, so a caller can stream a
    checkpoint without holding all of it; the tensor it returns is cast to ``dtype``. A
    :class:`ByteRange` is copied from its file by the kernel, never through Python objects.
    ``check``: ``"result"`` refuses to write a tensor holding NaN/Inf once cast (a computed
    result); ``"cast"`` refuses only values the cast made infinite (an input's own NaN passes).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: torch.Tensor | Callable[[], torch.Tensor] | ByteRange
    check: str = ""

    def __post_init__(self) -> None:
        self.nbytes = math.prod(self.shape) * _ITEMSIZE[dtype_name(self.dtype)]

    @property
    def is_copy(self) -> bool:
        return isinstance(self.source, ByteRange)

    def materialize(self) -> torch.Tensor:
        if isinstance(self.source, ByteRange):
            return _read_range(self.source, self.dtype, self.shape)
        made = callable(self.source)
        t = self.source() if made else self.source
        if tuple(t.shape) != tuple(self.shape):
            raise LoraMergeError(f"internal: tensor {self.name} has shape {list(t.shape)}, expected {list(self.shape)}")
        out = t.detach().to(device="cpu", dtype=self.dtype).contiguous()
        if made and out.data_ptr() == t.data_ptr():  # a producer may reuse its buffer for the next tensor
            out = out.clone()
        if self.check and out.is_floating_point() and not all_finite(out):
            if all_finite(t):
                raise LoraMergeError(f"values beyond the range of {short_dtype_name(self.dtype)} (lower the strengths, or "
                                     "save as fp32 or bf16); nothing was written", module=self.name)
            if self.check == "result":
                raise LoraMergeError("the result holds NaN or Inf values; nothing was written", module=self.name)
        return out


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``. NaN and ±Inf propagate into a sum (one fast pass); only when the float32
    sum itself overflows (huge but finite values) is every element tested."""
    if t.numel() == 0:
        return True
    if math.isfinite(float(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def short_dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _read_range(r: ByteRange, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    buf = bytearray(r.nbytes)
    with open(r.path, "rb") as f:
        f.seek(r.offset)
        if f.readinto(buf) != r.nbytes:
            raise LoraMergeError("truncated file: a tensor is incomplete", r.path)
    if not buf:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def spec_of(name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> TensorSpec:
    return TensorSpec(name, dtype or tensor.dtype, tuple(tensor.shape), tensor)


def ordered(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """Data-section order of safetensors: larger dtypes first (by its enum), then by name."""
    rank = {n: i for i, n in enumerate(_DTYPE_ENUM_ORDER)}
    return sorted(specs, key=lambda s: (-rank[dtype_name(s.dtype)], s.name))


def header_bytes(specs: list[TensorSpec], metadata: Mapping[str, str] | None, entries: str | None = None) -> bytes:
    """The length prefix and JSON header for ``specs`` (already ordered), as safetensors writes it.

    ``entries``: :func:`header_entries` of ``specs``, when the caller renders several headers that
    differ only in their metadata.
    """
    if entries is None:
        entries = header_entries(specs)
    parts = []
    if metadata:
        meta = {str(k): str(v) for k, v in metadata.items()}
        parts.append('"__metadata__":' + json.dumps(meta, separators=(",", ":"), ensure_ascii=False))
    if entries:
        parts.append(entries)
    text = "{" + ",".join(parts) + "}"
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, e.g. from a file name that is not UTF-8
        bad = text[max(0, e.start - 40):e.end + 10].encode("utf-8", "backslashreplace").decode()
        raise LoraMergeError(f"internal: metadata or a tensor name is not valid Unicode (near '{bad}')") from None
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def header_entries(specs: list[TensorSpec]) -> str:
    """The tensors' part of the header JSON (without braces), in data order, as safetensors writes it."""
    offset = 0
    seen = set()
    items = []
    for s in specs:
        if s.name in seen or s.name == "__metadata__":
            raise LoraMergeError(f"internal: duplicate or reserved tensor name '{s.name}'")
        seen.add(s.name)
        entry = {"dtype": dtype_name(s.dtype), "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        items.append(json.dumps(s.name, ensure_ascii=False) + ":" + json.dumps(entry, separators=(",", ":")))
        offset += s.nbytes
    return ",".join(items)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor (no copy)."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


Payload = memoryview | ByteRange


PREFETCH_BYTES = 64 << 20  # how far the prefetch thread may run ahead of the writer (beside one tensor)


def iter_data(specs: list[TensorSpec], prefetch: int = 0, *, raw_copies: bool = False
              ) -> Iterator[tuple[TensorSpec, Payload]]:
    """Each spec with its bytes, in order.

    ``raw_copies``: a :class:`ByteRange` spec comes back as the range itself (for the caller to
    copy), otherwise as its bytes. With ``prefetch`` > 0 a thread makes the other tensors ahead,
    at least ``prefetch`` of them and as many more as fit in :data:`PREFETCH_BYTES`, so producing
    patched tensors overlaps with writing (or copying) everything before them.
    """
    def passes_through(s: TensorSpec) -> bool:
        return raw_copies and s.is_copy

    if prefetch <= 0:
        for s in specs:
            yield s, (s.source if passes_through(s) else tensor_bytes(s.materialize()))  # type: ignore[misc]
        return
    made = read_ahead([s for s in specs if not passes_through(s)], lambda s: tensor_bytes(s.materialize()),
                      lambda s: s.nbytes, ahead=prefetch, budget=PREFETCH_BYTES, name="safetensors-prefetch")
    try:
        for s in specs:
            yield s, (s.source if passes_through(s) else next(made))  # type: ignore[misc]
    finally:
        made.close()


MODEL_HASH_KEY, LEGACY_HASH_KEY = "sshs_model_hash", "sshs_legacy_hash"
MODELSPEC_HASH_KEY = "modelspec.hash_sha256"  # sai modelspec: "0x" + the same sha256 of the data section


class _HashTap:
    """kohya's ``sshs_model_hash`` and ``sshs_legacy_hash``, fed the data section as it is written.

    model hash: sha256 of the data section (what A1111 and Civitai compute from the file).
    legacy hash: first 8 hex digits of sha256 over the 64 KiB at offset 1 MiB of the file that
    safetensors would write with only the ``ss_*`` metadata (kohya's definition).

    The sha256 runs on a thread (hashlib releases the GIL), beside the writes, at most
    :data:`BEHIND` bytes behind them (the data it holds stays alive until hashed); :meth:`close`
    stops it when the write fails.
    """

    LO, HI = 0x100000, 0x110000
    BEHIND = 64 << 20

    def __init__(self, specs: list[TensorSpec], metadata: Mapping[str, str], entries: str | None = None):
        self.modelspec = MODELSPEC_HASH_KEY in metadata
        ss_meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
        head = header_bytes(specs, ss_meta, entries)
        self.model = hashlib.sha256()
        self.legacy = bytearray(head[self.LO:self.HI])
        self.pos = len(head)
        self._pending: collections.deque[memoryview | None] = collections.deque()
        self._pending_bytes = 0
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def feed(self, data: memoryview) -> None:
        end = self.pos + len(data)
        if end > self.LO and self.pos < self.HI:
            self.legacy += data[max(self.LO - self.pos, 0):min(self.HI - self.pos, len(data))]
        self.pos = end
        if self._thread is None:
            self._thread = threading.Thread(target=self._hash, name="safetensors-hash", daemon=True)
            self._thread.start()
        with self._ready:
            self._ready.wait_for(lambda: self._pending_bytes < self.BEHIND)
            self._pending.append(data)
            self._pending_bytes += len(data)
            self._ready.notify_all()

    def _hash(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: bool(self._pending))
                data = self._pending[0]
            if data is None:
                return
            self.model.update(data)
            with self._ready:
                self._pending.popleft()
                self._pending_bytes -= len(data)
                self._ready.notify_all()

    def close(self) -> None:
        """Let the thread finish what it holds, and stop."""
        if self._thread is not None:
            with self._ready:
                self._pending.append(None)
                self._ready.notify_all()
            self._thread.join()
            self._thread = None

    def digests(self) -> dict[str, str]:
        self.close()
        found = {MODEL_HASH_KEY: self.model.hexdigest(),
                 LEGACY_HASH_KEY: hashlib.sha256(bytes(self.legacy)).hexdigest()[:8]}
        if self.modelspec:
            found[MODELSPEC_HASH_KEY] = "0x" + found[MODEL_HASH_KEY]
        return found


def file_size(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None, *, sshs: bool = False) -> int:
    """The exact size of the file :func:`write_safetensors` would write (nothing is produced or written)."""
    specs = ordered(specs)
    meta = dict(metadata or {})
    if sshs:
        meta[MODEL_HASH_KEY], meta[LEGACY_HASH_KEY] = "0" * 64, "0" * 8  # the hashes' final lengths
    return len(header_bytes(specs, meta)) + sum(s.nbytes for s in specs)


def sshs_hashes(specs: Iterable[TensorSpec], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of ``specs`` as they would be written (see :class:`_HashTap`)."""
    specs = ordered(specs)
    tap = _HashTap(specs, metadata)
    for _, data in iter_data(specs):
        tap.feed(data)  # type: ignore[arg-type]
    d = tap.digests()
    return d[MODEL_HASH_KEY], d[LEGACY_HASH_KEY]


def write_safetensors(path: str | os.PathLike, specs: Iterable[TensorSpec],
                      metadata: Mapping[str, str] | None = None, *, overwrite: bool = False,
                      sshs: bool = False, finalize: Callable[[], Mapping[str, str]] | None = None,
                      progress: Callable[[int, int, str], None] | None = None, prefetch: int = 0,
                      before_publish: Callable[[Path], None] | None = None) -> dict[str, str]:
    """Write a safetensors file atomically: a temp file in the target folder, fsync, rename.

    Tensors are produced, cast and written one at a time; :class:`ByteRange` tensors are copied
    by the kernel from their file. Metadata known only once the data is written goes in last,
    into a header of unchanged length: with ``sshs`` the kohya hashes, computed over the bytes as
    they go out; with ``finalize``, the values it returns (each replacing a placeholder of the
    same length already in ``metadata``). An existing file is replaced only with ``overwrite``
    (keeping its permissions; a new file gets the umask's); on any failure, or SIGINT/SIGTERM in
    the CLI, the temp file is removed and nothing is left behind. ``progress(done, total, name)``
    is called after each tensor (it may raise to stop the job); ``prefetch`` makes tensors ahead
    in a thread (see :func:`iter_data`). ``before_publish(temp_path)`` is called with the complete,
    synced file before it takes its name (a verification): if it raises, nothing is published.
    Returns the metadata written.
    """
    path = Path(path)
    check_writable_target(path, overwrite)
    specs = ordered(specs)
    meta = dict(metadata or {})
    tap = None
    entries = header_entries(specs)
    if sshs:
        meta[MODEL_HASH_KEY], meta[LEGACY_HASH_KEY] = "0" * 64, "0" * 8  # placeholders of the final length
        tap = _HashTap(specs, meta, entries)
    head = header_bytes(specs, meta, entries)
    mode = new_file_mode(path, overwrite)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        try:
            copier = _RangeCopier(fd)
            writeback = _Writeback(fd)
            try:  # the hash thread takes a core: torch's own pool would spin-wait for it (see torch_threads)
                with torch_threads(1) if tap else contextlib.nullcontext():
                    _write_all(fd, memoryview(head))
                    for done, (spec, data) in enumerate(iter_data(specs, prefetch, raw_copies=tap is None), 1):
                        if isinstance(data, ByteRange):
                            copier.copy(data)
                        else:
                            if len(data) != spec.nbytes:
                                raise LoraMergeError(f"internal: {spec.name} gave {len(data)} bytes, expected {spec.nbytes}")
                            _write_all(fd, data)
                            if tap:
                                tap.feed(data)
                        writeback.advance()
                        if progress:
                            progress(done, len(specs), spec.name)
            finally:
                copier.close()
                if tap:
                    tap.close()
            if tap or finalize:
                meta.update(tap.digests() if tap else {})
                meta.update(finalize() if finalize else {})
                final = header_bytes(specs, meta, entries)
                if len(final) != len(head):
                    raise LoraMergeError("internal: late metadata changed the header length")
                os.lseek(fd, 0, os.SEEK_SET)
                _write_all(fd, memoryview(final))
            if os.name != "nt":
                os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        if before_publish:
            before_publish(tmp)
        publish(tmp, path, overwrite)
    except OSError as e:
        discard(tmp)
        raise LoraMergeError(f"cannot write the output ({e.strerror or e})", path) from None
    except BaseException:
        discard(tmp)
        raise
    return meta


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


class _Writeback:
    """Starts the disk write of each finished chunk while the job goes on, so the final fsync has
    little left to wait for (Linux: POSIX_FADV_DONTNEED on dirty pages starts their writeback and
    keeps the output from crowding the page cache). A no-op elsewhere."""

    CHUNK = 128 << 20

    def __init__(self, fd: int):
        self.fd = fd
        self.flushed = 0
        self.enabled = hasattr(os, "posix_fadvise") and sys.platform.startswith("linux")

    def advance(self) -> None:
        if not self.enabled:
            return
        position = os.lseek(self.fd, 0, os.SEEK_CUR)
        if position - self.flushed >= self.CHUNK:
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, self.flushed, position - self.flushed, os.POSIX_FADV_DONTNEED)
            self.flushed = position


class _RangeCopier:
    """Copies byte ranges of other files to the output's current position, kernel-side when it can.

    ``os.copy_file_range`` (Linux; may even share the blocks), else ``os.sendfile``, else reads
    into one reusable buffer: the bytes never become Python objects.
    """

    CHUNK = 64 << 20

    def __init__(self, out_fd: int):
        self.out_fd = out_fd
        self.sources: dict[Path, int] = {}
        self.method = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile" if hasattr(
            os, "sendfile") and os.name != "nt" and os.uname().sysname == "Linux" else "read"
        self.buffer: bytearray | None = None

    def _source(self, path: Path) -> int:
        if path not in self.sources:
            self.sources[path] = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return self.sources[path]

    def copy(self, r: ByteRange) -> None:
        src = self._source(r.path)
        offset, left = r.offset, r.nbytes
        while left:
            n = self._copy_some(src, offset, min(left, self.CHUNK))
            if n == 0:
                raise LoraMergeError("truncated file: a tensor is incomplete", r.path)
            offset += n
            left -= n

    def _copy_some(self, src: int, offset: int, count: int) -> int:
        if self.method == "copy_file_range":
            try:
                return os.copy_file_range(src, self.out_fd, count, offset)
            except OSError as e:  # across file systems on old kernels, or not supported here
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                self.method = "sendfile" if hasattr(os, "sendfile") and os.name != "nt" else "read"
        if self.method == "sendfile":
            try:
                return os.sendfile(self.out_fd, src, offset, count)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                self.method = "read"
        if self.buffer is None:
            self.buffer = bytearray(self.CHUNK)
        view = memoryview(self.buffer)[:count]
        n = os.preadv(src, [view], offset) if hasattr(os, "preadv") else _pread_into(src, view, offset)
        _write_all(self.out_fd, view[:n])
        return n

    def close(self) -> None:
        for fd in self.sources.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sources.clear()


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    os.lseek(fd, offset, os.SEEK_SET)
    data = os.read(fd, len(view))
    view[:len(data)] = data
    return len(data)


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


def file_data_sha256(path: str | os.PathLike) -> str:
    """sha256 of a safetensors file's data section: A1111's LoRA hash (and Civitai's AutoV2)."""
    header = read_header(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(header.data_start)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
