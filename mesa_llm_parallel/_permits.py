"""One process-wide quota of agents in flight: ``settings.max_concurrency``.

Core object: :data:`permits`, the process's one :class:`Permits`.

A language-model provider counts the calls in flight of a whole account, not of one
step; so does ``max_concurrency``: every agent of every parallel step of the process
(threads, event loops, both modes) holds one permit while it is in flight. A step
started with a cap of *C* starts an agent only while fewer than *C* permits are held in
the whole process. A step started with no cap (None) takes no permits.

* Waiting is first come, first served: a released permit is handed to the oldest
  waiter (a thread, or a step's start loop on its event loop), never raced for.
* An agent run in a thread that outlives its timeout keeps its permit until its call
  really returns: it is still in flight at the server.
* Nested steps: an agent that steps sub-agents holds a permit while it waits for
  them. Its nested step may use that permit (it is *lent*) for one sub-agent at a time,
  and takes more from the quota when there are any, so a nested step always makes
  progress, whatever the cap and however many outer agents wait.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import os
import threading
from collections.abc import Callable
from typing import Any, Final

__all__ = ["Permits", "holds_permit", "permits"]

#: Set in the context every agent of a capped step runs in: an agent there holds a
#: permit while it runs, and a step it starts may use it (see the module's docstring).
holds_permit: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "mesa_llm_parallel_holds_permit", default=False
)


class _Waiter:
    """Someone waiting for a permit: a thread (``event``) or a loop (``callback``)."""

    __slots__ = ("callback", "event", "granted", "loop")

    def __init__(
        self,
        *,
        event: threading.Event | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        callback: Callable[[], object] | None = None,
    ) -> None:
        self.event = event
        self.loop = loop
        self.callback = callback
        self.granted = False

    def wake(self) -> bool:
        """Tell the waiter its permit came; False if its loop is closed (nobody waits)."""
        if self.event is not None:
            self.event.set()
            return True
        try:
            self.loop.call_soon_threadsafe(self.callback)  # type: ignore[union-attr, arg-type]
        except RuntimeError:  # "Event loop is closed"
            return False
        return True


class Permits:
    """A counting semaphore shared by threads and event loops, with per-call limits.

    Thread-safe. ``limit`` is passed by each acquirer (the cap of its step), so steps
    started before and after a change of ``max_concurrency`` each keep their own cap
    while they share one count.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held = 0
        self._waiters: collections.deque[tuple[int, _Waiter]] = collections.deque()
        #: While a batch run's processes share one quota, its permits: every call
        #: below goes there instead (see :mod:`mesa_llm_parallel._shared`).
        self.shared: Any = None

    @property
    def held(self) -> int:
        """Permits held now, by this process."""
        shared = self.shared
        return self._held if shared is None else shared.held

    def try_acquire(self, limit: int) -> bool:
        """Take a permit if fewer than ``limit`` are held and nobody waits before us."""
        if (shared := self.shared) is not None:
            return shared.try_acquire(limit)
        with self._lock:
            if self._held < limit and not self._waiters:
                self._held += 1
                return True
            return False

    def acquire_soon(
        self, limit: int, loop: asyncio.AbstractEventLoop, callback: Callable[[], object]
    ) -> _Waiter | None:
        """Take a permit now (None), or queue: ``callback`` then runs on ``loop`` with it.

        The returned waiter can be withdrawn with :meth:`withdraw`.
        """
        if (shared := self.shared) is not None:
            return shared.acquire_soon(limit, loop, callback)
        with self._lock:
            if self._held < limit and not self._waiters:
                self._held += 1
                return None
            waiter = _Waiter(loop=loop, callback=callback)
            self._waiters.append((limit, waiter))
            return waiter

    def acquire(self, limit: int, halted: threading.Event) -> bool:
        """Block until a permit is free (True) or ``halted`` is set (False)."""
        if (shared := self.shared) is not None:
            return shared.acquire(limit, halted)
        with self._lock:
            if self._held < limit and not self._waiters:
                self._held += 1
                return True
            waiter = _Waiter(event=threading.Event())
            self._waiters.append((limit, waiter))
        event = waiter.event
        while not event.wait(0.05):  # type: ignore[union-attr]
            if halted.is_set():
                self.withdraw(waiter)
                return False
        return True

    def withdraw(self, waiter: _Waiter) -> None:
        """Stop waiting; a permit granted meanwhile is given back."""
        if (shared := self.shared) is not None:
            shared.withdraw(waiter)
            return
        with self._lock:
            for index, (_, queued) in enumerate(self._waiters):
                if queued is waiter:
                    del self._waiters[index]
                    return
        if waiter.granted:
            self.release()

    def release(self) -> None:
        """Give a permit back: to the oldest waiter whose limit allows it, else the pool."""
        if (shared := self.shared) is not None:
            shared.release()
            return
        while True:
            with self._lock:
                handed = None
                for index, (limit, waiter) in enumerate(self._waiters):
                    if self._held - 1 < limit:  # this permit keeps the count under its cap
                        del self._waiters[index]
                        waiter.granted = True
                        handed = waiter
                        break
                if handed is None:
                    self._held -= 1
                    return
            if handed.wake():
                return
            handed.granted = False  # its loop is closed: hand the permit on

    def _reset(self) -> None:
        self.shared = None
        self._lock = threading.Lock()
        self._held = 0
        self._waiters = collections.deque()


#: The process's one quota of agents in flight.
permits: Final = Permits()

with contextlib.suppress(AttributeError):  # not on every platform
    os.register_at_fork(after_in_child=permits._reset)
