"""The library's thread pool: created lazily, reused across steps, resizable at any time.

Core object: :class:`ResizablePool`.

A step *leases* an executor of the size it read from the settings when it started and
keeps it for its whole duration. When a later step asks for another size, a new
executor is made and the old one is retired: it is shut down (without waiting) only
once the last step that leased it has returned. A resize therefore never disturbs a
step in progress, and retired workers exit as soon as they are idle, so thousands of
resizes leave no threads behind.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

__all__ = ["ResizablePool", "is_pool_thread"]

_THREAD_PREFIX = "mesa-llm-parallel-worker"
_pool_threads = threading.local()


def _mark_pool_thread() -> None:
    _pool_threads.inside = True


def is_pool_thread() -> bool:
    """True when the calling thread is one of the library's pool workers."""
    return getattr(_pool_threads, "inside", False)


class _Entry:
    __slots__ = ("executor", "retired", "size", "users")

    def __init__(self, size: int) -> None:
        self.size = size
        self.users = 0
        self.retired = False
        self.executor = ThreadPoolExecutor(
            max_workers=size, thread_name_prefix=_THREAD_PREFIX, initializer=_mark_pool_thread
        )


class ResizablePool:
    """A thread pool whose size can change between steps.

    Use :meth:`lease` for the duration of a step; read :attr:`size` for the size of the
    executor the next step will get (None before the first step).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: _Entry | None = None
        # Executors shut down without waiting, kept so that shutdown(wait=True) can
        # join their threads; pruned once those threads have exited.
        self._retired: list[ThreadPoolExecutor] = []

    @property
    def size(self) -> int | None:
        """The size of the current executor, or None when none has been created."""
        entry = self._current
        return None if entry is None else entry.size

    @contextlib.contextmanager
    def lease(self, size: int) -> Iterator[ThreadPoolExecutor]:
        """Yield an executor with ``size`` workers, kept alive until the block ends."""
        retired: _Entry | None = None
        with self._lock:
            entry = self._current
            if entry is None or entry.size != size:
                if entry is not None:
                    entry.retired = True
                    if entry.users == 0:
                        retired = entry
                entry = self._current = _Entry(size)
            entry.users += 1
        if retired is not None:
            self._retire(retired.executor)
        try:
            yield entry.executor
        finally:
            with self._lock:
                entry.users -= 1
                done = entry.retired and entry.users == 0
            if done:
                self._retire(entry.executor)

    def _retire(self, executor: ThreadPoolExecutor) -> None:
        executor.shutdown(wait=False)
        with self._lock:
            self._retired = [
                old for old in self._retired if any(t.is_alive() for t in old._threads)
            ]
            self._retired.append(executor)

    def shutdown(self, *, wait: bool = True) -> None:
        """Retire the current executor; its threads exit once no step uses them."""
        with self._lock:
            entry, self._current = self._current, None
            retired, self._retired = self._retired, []
            idle = False
            if entry is not None:
                entry.retired = True
                idle = entry.users == 0
        if entry is not None and idle:
            entry.executor.shutdown(wait=wait)
        if wait:
            for executor in retired:
                executor.shutdown(wait=True)
