"""What the benchmarks share: timing a fresh Python process, a quiet disk between runs, spreads."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_WRAPPER = """
import os, runpy, sys, time
t = time.perf_counter()
sys.argv = sys.argv[1:]

def report():
    # VmHWM is this process image's own peak (ru_maxrss would include the parent's at fork time)
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print("BENCH", time.perf_counter() - t, hwm / 1024, file=sys.stderr, flush=True)

real_exit = os._exit
def _exit(code):  # a program that skips the interpreter's teardown still reports
    report()
    real_exit(code)
os._exit = _exit
code = 0
try:
    if sys.argv[0].endswith(".py"):
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code or 0
report()
sys.exit(code)
"""


def run_once(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stdout) of one fresh Python process running ``argv``."""
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"benchmark step failed: {' '.join(argv)}\n{r.stderr}")
    rss = float(next(line.split()[2] for line in r.stderr.splitlines() if line.startswith("BENCH")))
    return wall, rss, r.stdout


def timed_process(argv: list[str], repeat: int = 3, env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(best wall seconds of ``repeat`` runs, peak RSS in MiB, stdout) of a fresh Python process."""
    best = None
    for _ in range(repeat):
        run = run_once(argv, env)
        if best is None or run[0] < best[0]:
            best = run
    return best


def quiet_disk(*outputs: Path, pause: float = 1.0) -> None:
    """Remove earlier outputs and let the disk settle: freeing (and discarding) the blocks of a
    2 GB file slows the writes that follow it, which would charge one step for another's file."""
    for out in outputs:
        out.unlink(missing_ok=True)
    os.sync()
    time.sleep(pause)


Step = tuple[list[str], Callable[[], dict[str, str]]]  # (argv, env made fresh for each run)


def interleaved_rounds(steps: dict[str, Step], runs: int, outputs: Sequence[Path]
                       ) -> tuple[dict[str, list[float]], dict[str, float], dict[str, list[tuple[float, str]]]]:
    """Run every step once per round, round after round, each on a quiet disk: (wall seconds per
    step, peak RSS per step in MiB, (wall, stdout) of every run per step)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    rss: dict[str, float] = {}
    printed: dict[str, list[tuple[float, str]]] = {name: [] for name in steps}
    for _ in range(runs):
        for name, (argv, env) in steps.items():
            quiet_disk(*outputs, pause=0.5)
            wall, peak, stdout = run_once(argv, env())
            times[name].append(wall)
            rss[name] = max(rss.get(name, 0.0), peak)
            printed[name].append((wall, stdout))
    return times, rss, printed


def spread(values: list[float]) -> str:
    """median (min–max) of a few runs."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as info:
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"
