"""Process-wide runtime settings a job may change for its duration, and restore."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore the previous count.

    Jobs that keep other threads busy (module workers, a writer, a hasher) use 1: torch's own
    pool would otherwise spin-wait for a core that is taken, which can make small ops 10× slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
