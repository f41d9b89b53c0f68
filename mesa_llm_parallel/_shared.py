"""One quota for several processes: the cap and the start rate kept outside the process.

Core objects: :class:`SharedPermits` (plugs a cluster-wide semaphore into the process's
:data:`~mesa_llm_parallel._permits.permits`) and :class:`SharedSlots` (plugs a
cluster-wide start schedule into the process's
:data:`~mesa_llm_parallel._ratelimit.limiter`), and the two kinds of store they use:

* on one machine, a :mod:`multiprocessing` manager's ``BoundedSemaphore``, ``Lock`` and
  ``Value`` (:class:`ManagerQuota`);
* on a Dask cluster, ``distributed.Semaphore`` for the cap and an Actor
  (:class:`SlotSchedule`) for the start schedule (:class:`DaskQuota`).

Both are plain picklable objects sent along with each run; every process that runs one
of the batch's runs plugs them in while it has runs of that batch (:func:`join` and
:func:`leave`). Nothing else of the engine changes: its steps take permits and start
slots from the same two objects as ever.

Costs (measured on a 2-core machine, ``docs/benchmarks.md`` scenario 15): a Dask
semaphore acquire or release is one round trip to the scheduler (about 1 ms), an Actor
call about 3 ms; a manager call about 0.1 ms. So the permits are taken by one thread per
process, one at a time (never by an event loop's thread, which would stall every agent
on it), and start slots are reserved a few at a time (:data:`SLOTS_AHEAD`).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from mesa_llm_parallel._permits import _Waiter, permits
from mesa_llm_parallel._ratelimit import limiter

__all__ = [
    "DaskQuota",
    "ManagerQuota",
    "Quota",
    "SharedPermits",
    "SharedSlots",
    "SlotSchedule",
    "join",
    "leave",
]

logger = logging.getLogger("mesa_llm_parallel")

#: How much of the start schedule a process reserves at once, in seconds of schedule
#: (at least one slot). Slots it does not use lapse, so this is small: at 100 starts/s,
#: 2 slots per round trip, and at most 2 lost when a process's step ends.
SLOTS_AHEAD: Final = 0.02

#: How late a reserved slot may still be used, as a fraction of the interval between
#: starts: a start late by this much brings the next one closer by as much.
_LATE_FRACTION: Final = 0.1

#: How long the permit thread blocks on the shared semaphore before checking whether
#: its waiter is still there, in seconds.
_ACQUIRE_POLL: Final = 0.25


class _Semaphore(Protocol):
    def acquire(self, timeout: float) -> bool: ...

    def release(self) -> None: ...


class Quota(Protocol):
    """What a shared quota gives each process (picklable)."""

    #: Identifies the batch: processes plug in one quota at a time.
    key: str

    def semaphore(self) -> _Semaphore | None:
        """The cluster-wide cap, bound to this process (None: no cap)."""

    def reserve(self, rate: float, count: int) -> list[float]:
        """The next ``count`` start times at ``rate`` per second, as :func:`time.time`."""

    def stop_requested(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; whether the batch was asked to stop."""


# -- the cap ----------------------------------------------------------------------------
class SharedPermits:
    """The process's permits, each backed by a lease of a cluster-wide semaphore.

    Replaces :class:`~mesa_llm_parallel._permits.Permits`'s own counting while plugged
    in (``permits.shared``): waiters queue here, first come first served, and one
    thread takes leases for them; a release hands the lease back from another thread.
    The ``limit`` each acquirer passes is the same cap the semaphore was made with.
    """

    def __init__(self, semaphore: _Semaphore) -> None:
        #: Called (with no lock held) when the last permit out comes back.
        self.on_idle: Callable[[], None] | None = None
        self._semaphore = semaphore
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._releases: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._closed = False
        self._store_lost = False
        self.held = 0
        self._acquirer = threading.Thread(
            target=self._acquire_loop, name="mesa-llm-parallel-permits", daemon=True
        )
        self._releaser = threading.Thread(
            target=self._release_loop, name="mesa-llm-parallel-permits-release", daemon=True
        )
        self._acquirer.start()
        self._releaser.start()

    def try_acquire(self, limit: int) -> bool:
        return False  # a lease is a round trip: never taken on the caller's thread

    def acquire_soon(self, limit: int, loop: Any, callback: Callable[[], object]) -> _Waiter | None:
        waiter = _Waiter(loop=loop, callback=callback)
        self._enqueue(waiter)
        return waiter

    def acquire(self, limit: int, halted: threading.Event) -> bool:
        waiter = _Waiter(event=threading.Event())
        self._enqueue(waiter)
        while not waiter.event.wait(0.05):  # type: ignore[union-attr]
            if halted.is_set():
                self.withdraw(waiter)
                return False
        return True

    def withdraw(self, waiter: _Waiter) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
            return
        if waiter.granted:
            self.release()

    def release(self) -> None:
        with self._lock:
            self.held -= 1
            idle = self.held == 0
        self._releases.put(True)
        if idle and self.on_idle is not None:
            self.on_idle()

    def close(self) -> None:
        """Stop taking leases; the threads end once every lease went back."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()

    def _enqueue(self, waiter: _Waiter) -> None:
        with self._lock:
            self._waiters.append(waiter)
            self._wake.notify()

    def _acquire_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._waiters and not self._closed:
                        self._wake.wait()
                    if self._closed:
                        return
                try:
                    leased = self._semaphore.acquire(timeout=_ACQUIRE_POLL)
                except Exception:
                    # The store is gone (the batch ended, or its caller or cluster
                    # died): the runs of this process are being stopped; waiters withdraw.
                    if not self._closed and not self._store_lost:
                        self._store_lost = True
                        logger.warning(
                            "mesa_llm_parallel: the batch's shared concurrency cap is unreachable",
                            exc_info=True,
                        )
                    time.sleep(_ACQUIRE_POLL)
                    continue
                if leased:
                    self._grant()  # or, withdrawn meanwhile, queued to go back
        finally:
            self._releases.put(False)  # after every release queued so far

    def _grant(self) -> None:
        """A lease was taken: the oldest waiter gets it, or it goes back."""
        while True:
            with self._lock:
                if not self._waiters:
                    break
                waiter = self._waiters.popleft()
                waiter.granted = True
                self.held += 1
            if waiter.wake():
                return
            with self._lock:  # its loop is closed: the lease goes to the next waiter
                waiter.granted = False
                self.held -= 1
        self._releases.put(True)  # withdrawn while the lease was on its way

    def _release_loop(self) -> None:
        while self._releases.get():
            try:
                self._semaphore.release()
            except Exception:  # the store is gone: so is the lease
                logger.debug("mesa_llm_parallel: returning a shared permit failed", exc_info=True)


# -- the start rate ---------------------------------------------------------------------
class SharedSlots:
    """The process's start slots, reserved a few at a time from a cluster-wide schedule."""

    def __init__(self, quota: Quota) -> None:
        self._quota = quota
        self._lock = threading.Lock()
        self._rate = 0.0
        self._slots: list[float] = []  # time.monotonic() times, sorted

    def reserve(self, rate: float) -> tuple[float, float]:
        with self._lock:
            now = time.monotonic()
            if rate != self._rate:
                self._slots.clear()
                self._rate = rate
            slots = self._slots
            late = now - _LATE_FRACTION / rate
            del slots[: bisect.bisect_left(slots, late)]
            while not slots:
                count = max(1, math.ceil(rate * SLOTS_AHEAD))
                offset = time.monotonic() - time.time()
                fresh = self._quota.reserve(rate, count)
                now = time.monotonic()
                late = now - _LATE_FRACTION / rate
                slots.extend(t + offset for t in fresh if t + offset >= late)
            slot = slots.pop(0)
        return slot, max(0.0, slot - now)

    def give_back(self, slot: float, rate: float) -> None:
        with self._lock:
            if rate == self._rate and slot > time.monotonic():
                bisect.insort(self._slots, slot)


# -- joining ----------------------------------------------------------------------------
class _Run(Protocol):
    """A run of the batch in this process, to stop (``batchrunner._RunControl``)."""

    def halt(self) -> None: ...

    def cancel(self) -> None: ...


class _Membership:
    __slots__ = ("closing", "count", "key", "permits", "watchers")

    def __init__(self, key: str, shared_permits: SharedPermits | None) -> None:
        self.key = key
        self.closing = False  # its last run ended; permits of calls still running are out
        self.count = 0
        self.permits = shared_permits
        self.watchers: list[_Run] = []


class _Process:
    """This process's membership in a batch (one at a time)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.member: _Membership | None = None


_process = _Process()


class QuotaBusyError(RuntimeError):
    """This process already runs the runs of another batch under another quota."""


#: How long a run waits for the previous batch's calls still running in this process
#: (calls that outlived a timeout or an interrupt) to give their permits back, in seconds.
_DRAIN_WAIT: Final = 30.0


def join(quota: Quota, run: _Run) -> None:
    """Plug ``quota`` into this process for ``run``, which is stopped if the batch stops.

    Raises:
        QuotaBusyError: The process runs another batch's runs, under its quota (or its
            calls still out did not end within :data:`_DRAIN_WAIT` seconds).
    """
    deadline = time.monotonic() + _DRAIN_WAIT
    with _process.lock:
        while (member := _process.member) is not None and member.key != quota.key:
            left = deadline - time.monotonic()
            if not member.closing or left <= 0:
                out = member.permits.held if member.permits is not None else 0
                raise QuotaBusyError(
                    "this process already runs another batch_run's runs under that batch's "
                    f"quota ({out} of its calls still out); run one batch at a time per "
                    "worker process, or give each batch its own workers"
                )
            _process.changed.wait(left)  # its last calls are about to give permits back
        if member is None:
            semaphore = quota.semaphore()
            shared_permits = SharedPermits(semaphore) if semaphore is not None else None
            member = _Membership(quota.key, shared_permits)
            if shared_permits is not None:
                shared_permits.on_idle = functools.partial(_unplug_when_done, member)
            permits.shared = shared_permits
            limiter.shared = SharedSlots(quota)
            _process.member = member
            threading.Thread(
                target=_watch, args=(quota, member), name="mesa-llm-parallel-stop", daemon=True
            ).start()
        member.closing = False
        member.count += 1
        member.watchers.append(run)


def leave(run: _Run) -> None:
    """``run`` has ended: unplug the quota after the last run of the process.

    Permits still out (calls running on in threads) go back to the batch's store first:
    the quota stays plugged in until they have.
    """
    with _process.lock:
        member = _process.member
        if member is None:
            return
        with contextlib.suppress(ValueError):
            member.watchers.remove(run)
        member.count -= 1
        if member.count > 0:
            return
        member.closing = True
    _unplug_when_done(member)


def _unplug_when_done(member: _Membership) -> None:
    with _process.lock:
        if _process.member is not member or not member.closing:
            return
        if member.permits is not None and member.permits.held > 0:
            return  # called again by the last permit to come back
        _process.member = None
        permits.shared = None
        limiter.shared = None
        _process.changed.notify_all()
    if member.permits is not None:
        member.permits.close()


def _watch(quota: Quota, member: _Membership) -> None:
    """Wait for the batch's stop request; then stop this process's runs of it."""
    while True:
        with _process.lock:
            if _process.member is not member:
                return
        try:
            stop = quota.stop_requested(1.0)
        except Exception:  # the caller or the cluster is gone: stop the runs
            stop = True
        if stop:
            with _process.lock:
                runs = list(member.watchers) if _process.member is member else []
            for run in runs:  # every run starts nothing more before any is interrupted
                run.halt()
            for run in runs:
                run.cancel()
            return


with contextlib.suppress(AttributeError):
    os.register_at_fork(after_in_child=_process.__init__)


# -- stores -----------------------------------------------------------------------------
class ManagerQuota:
    """A quota kept by a :mod:`multiprocessing` manager: for processes on this machine.

    Args:
        manager: A started ``SyncManager`` (``multiprocessing.get_context(...).Manager()``).
        key: The batch's identity.
        cap: The cluster-wide ``max_concurrency``, or None.
    """

    def __init__(self, manager: Any, key: str, cap: int | None) -> None:
        self.key = key
        self._semaphore = manager.BoundedSemaphore(cap) if cap is not None else None
        self._lock = manager.Lock()
        self._next = manager.Value("d", 0.0)
        self._stop = manager.Event()

    def semaphore(self) -> _Semaphore | None:
        if self._semaphore is None:
            return None
        return _ManagerSemaphore(self._semaphore)

    def reserve(self, rate: float, count: int) -> list[float]:
        with self._lock:
            start = max(time.time(), self._next.value)
            self._next.value = start + count / rate
        return [start + i / rate for i in range(count)]

    def stop_requested(self, timeout: float) -> bool:
        return bool(self._stop.wait(timeout))

    def request_stop(self) -> None:
        """Ask every process to stop the batch's runs (from the caller)."""
        self._stop.set()


class _ManagerSemaphore:
    __slots__ = ("_proxy",)

    def __init__(self, proxy: Any) -> None:
        self._proxy = proxy

    def acquire(self, timeout: float) -> bool:
        return bool(self._proxy.acquire(True, timeout))

    def release(self) -> None:
        self._proxy.release()


class SlotSchedule:
    """The cluster-wide start schedule, kept on one Dask worker as an Actor."""

    def __init__(self) -> None:
        self._next = 0.0

    def reserve(self, rate: float, count: int) -> list[float]:
        """The next ``count`` start times at ``rate`` per second (:func:`time.time`)."""
        start = max(time.time(), self._next)
        self._next = start + count / rate
        return [start + i / rate for i in range(count)]


class DaskQuota:
    """A quota kept by a Dask cluster's scheduler (semaphore, stop event) and an Actor.

    Made by the caller with :meth:`create`; pickled into every run; bound to the worker
    process by :meth:`semaphore`, which must be called in the task's own thread (Dask's
    primitives find their worker there).
    """

    def __init__(self, key: str, semaphore: Any, schedule: Any, stop: Any) -> None:
        self.key = key
        self._semaphore = semaphore
        self._schedule = schedule
        self._stop = stop

    @classmethod
    def create(cls, client: Any, key: str, cap: int | None, rate: float | None) -> DaskQuota:
        """Make the batch's semaphore, schedule Actor and stop event on ``client``'s cluster."""
        import distributed

        semaphore = None
        if cap is not None:
            semaphore = distributed.Semaphore(max_leases=cap, name=f"{key}-cap")
        schedule = None
        if rate is not None:
            schedule = client.submit(SlotSchedule, actor=True, key=f"{key}-slots").result()
        stop = distributed.Event(f"{key}-stop", client=client)
        return cls(key, semaphore, schedule, stop)

    def semaphore(self) -> _Semaphore | None:
        # Bind the primitives to this worker now, in the task's thread.
        self._stop.is_set()
        if self._semaphore is None:
            return None
        self._semaphore.get_value()
        return self._semaphore

    def reserve(self, rate: float, count: int) -> list[float]:
        if self._schedule is None:
            raise RuntimeError("this batch has no shared rate limit")
        return list(self._schedule.reserve(rate, count).result())

    def stop_requested(self, timeout: float) -> bool:
        return bool(self._stop.wait(timeout))

    def request_stop(self) -> None:
        """Ask every worker to stop the batch's runs (from the caller)."""
        self._stop.set()

    def close(self) -> None:
        """The batch is over (from the caller): workers stop waiting on it."""
        with contextlib.suppress(Exception):
            self._stop.set()  # wakes every worker's watcher, which then finds no runs
        if self._semaphore is not None:
            with contextlib.suppress(Exception):
                # Leases of runs just stopped go back from the workers' release threads
                # a moment after the runs return: give them that moment.
                deadline = time.monotonic() + 2.0
                while self._semaphore.get_value() and time.monotonic() < deadline:
                    time.sleep(0.05)
                self._semaphore.close()
