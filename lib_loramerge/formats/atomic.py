"""Outputs that are complete or absent: temp files that say whose they are, publishing, clean-up.

A job writes ``.NAME.<pid>@<host>.<random>.partial`` beside its output and renames it into place
when it is complete. The name carries the writer's process id and host, so that a later job can
remove what a killed one left (those temp files can be as large as a checkpoint) without ever
touching the temp file of a job that is still running, here or on another machine sharing the
folder. Temp files of this process are also removed on exceptions, on SIGINT/SIGTERM (the CLI
turns those into exceptions) and at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import re
import secrets
import shutil
import socket
import threading
from pathlib import Path

from ..errors import LoraMergeError

TEMP_SUFFIX = ".partial"
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX))
_live: set[Path] = set()  # temp files this process is writing now
_live_lock = threading.Lock()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def temp_path(path: Path) -> Path:
    """A new temp-file name beside ``path`` for this process (registered for clean-up)."""
    tmp = path.parent / f".{path.name}.{os.getpid()}@{_host()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    with _live_lock:
        _live.add(tmp)
    return tmp


def discard(tmp: Path) -> None:
    """Remove a temp file (if it is still there) and forget it."""
    with contextlib.suppress(OSError):
        tmp.unlink()
    with _live_lock:
        _live.discard(tmp)


def forget(tmp: Path) -> None:
    with _live_lock:
        _live.discard(tmp)


@atexit.register
def _remove_live() -> None:  # e.g. the interpreter exits while a worker thread is still writing
    with _live_lock:
        left = list(_live)
    for tmp in left:
        discard(tmp)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on any doubt: yes, so its files are left alone)."""
    if pid <= 0:
        return True
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists
        try:
            code = ctypes.c_ulong()
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return True
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. EPERM: it exists, owned by someone else
    return True


def remove_stale_temp_files(folder: Path) -> list[tuple[Path, int]]:
    """Remove temp files in ``folder`` left by killed jobs of this host; returns (file, bytes) removed.

    Only names this module makes are considered, and only those whose process is gone: another
    live job's temp file, or one made on another host, is never touched.
    """
    removed: list[tuple[Path, int]] = []
    host = _host()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.fullmatch(entry.name)
        if m is None or m["host"] != host or pid_alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            size = entry.stat(follow_symlinks=False).st_size
            os.unlink(entry.path)
            removed.append((Path(entry.path), size))
    return removed


def new_file_mode(path: Path, overwrite: bool) -> int:
    """The mode the output should get: the replaced file's when overwriting, else 0o666 minus the umask."""
    if overwrite:
        with contextlib.suppress(OSError):
            return path.stat().st_mode & 0o7777
    return 0o666 & ~_umask()


def _umask() -> int:
    status = Path("/proc/self/status")
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(x for x in status.read_text().splitlines() if x.startswith("Umask:"))
        return int(line.split()[1], 8)
    with _live_lock:  # os.umask can only be read by setting it: do so briefly, under a lock
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def copy_file(source: Path, path: Path, overwrite: bool) -> None:
    """Copy ``source`` to ``path`` through a temp file beside it (never a half-written copy)."""
    tmp = temp_path(path)
    try:
        shutil.copyfile(source, tmp)
        publish(tmp, path, overwrite)
    except BaseException:
        discard(tmp)
        raise


def publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move a finished temp file into place; without ``overwrite`` never replace an existing file."""
    try:
        _publish(tmp, path, overwrite)
    finally:
        forget(tmp)
    fsync_dir(path.parent)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        try:
            replaced = path.stat()
        except OSError:
            replaced = None
        os.replace(tmp, path)
        if replaced is not None:
            _newer_than(path, replaced.st_mtime_ns)
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


def _newer_than(path: Path, mtime_ns: int) -> None:
    """A file replacing another must look newer: A1111 reloads a LoRA only when its mtime grew, and a
    coarse clock or file system (FAT: 2 s) could give the new file the old one's time."""
    with contextlib.suppress(OSError):
        st = path.stat()
        if st.st_mtime_ns <= mtime_ns:
            os.utime(path, ns=(st.st_atime_ns, mtime_ns + 2_000_000_000))


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
