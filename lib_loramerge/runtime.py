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


@contextlib.contextmanager
def full_precision_matmul() -> Iterator[None]:
    """float32 matrix products in full float32 for the duration, then the previous setting.

    A WebUI turns on TF32 for CUDA matmuls (10-bit mantissa): fine for sampling, but it would cost
    an extraction three decimal digits of accuracy in ΔW's singular vectors.
    """
    cuda = torch.backends.cuda.matmul
    before = cuda.allow_tf32
    cuda.allow_tf32 = False
    try:
        yield
    finally:
        cuda.allow_tf32 = before
