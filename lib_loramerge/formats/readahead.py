"""One reader thread running ahead of its consumer within a byte budget (the writer's prefetch, extract's reads)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(items: Sequence[T], make: Callable[[T], R], size: Callable[[T], int], *, ahead: int, budget: int,
               name: str) -> Iterator[R]:
    """``make(item)`` for each item, in order, made by one thread ahead of the consumer: at least
    ``ahead`` results, and more while their ``size`` (bytes) fits in ``budget``. An exception in
    ``make`` is raised in the consumer at that item; closing the iterator stops and joins the thread.
    """
    ready: collections.deque = collections.deque()
    lock = threading.Condition()
    queued = [0]  # bytes made and not yet taken
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                with lock:
                    lock.wait_for(lambda item=item: stop.is_set() or len(ready) < ahead
                                  or queued[0] + size(item) <= budget)
                if stop.is_set():
                    return
                made = make(item)
                with lock:
                    ready.append((item, made, None))
                    queued[0] += size(item)
                    lock.notify_all()
        except BaseException as e:  # handed to the consumer, raised there
            with lock:
                ready.append((None, None, e))
                lock.notify_all()

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        for _ in items:
            with lock:
                lock.wait_for(lambda: bool(ready))
                item, made, error = ready.popleft()
                if error is None:
                    queued[0] -= size(item)
                lock.notify_all()
            if error is not None:
                raise error
            yield made
    finally:
        with lock:
            stop.set()
            lock.notify_all()
        worker.join()
