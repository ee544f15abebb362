"""Process-wide thread pools: started on first use, forgotten in a forked child.

A child forked after a pool ran (multiprocessing's default start method on
Linux) has none of the parent's threads, but a copied executor still counts
them; once it had all its workers it never starts another, and the child's
first task waits forever. Each pool here is dropped in the child (its lock
too, which another thread may have held at the fork) and made again there.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable


class SharedPool:
    """A ThreadPoolExecutor of ``workers()`` threads, made when first asked for."""

    def __init__(self, workers: Callable[[], int], name: str):
        self._workers = workers
        self._name = name
        self._forget()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def get(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max(1, self._workers()),
                                                thread_name_prefix=self._name)
            return self._pool


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
