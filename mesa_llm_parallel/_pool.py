"""The library's thread pool: created lazily, reused across steps, resizable at any time.

Core objects: :class:`WorkerPool` (a fixed-size pool of worker threads),
:class:`ResizablePool` (which swaps pools on resize) and :data:`pool`, the one
resizable pool that every step of the process leases from.

A step *leases* a pool of the size it read from the settings when it started and keeps
it for its whole duration. When a later step asks for another size, a new pool is made
and the old one is retired: it is shut down (without waiting) once the last step that
leased it has returned. A resize therefore never disturbs a step in progress, and
retired workers exit as soon as they are idle, so thousands of resizes leave no threads
behind.

A call that overran its timeout cannot be stopped. Its thread is *abandoned*
(:meth:`WorkerPool.abandon`): it no longer counts as one of the pool's workers, so the
pool starts another thread in its place, and it exits as soon as its call returns. Up to
``max_workers`` threads may be abandoned at once in the whole process; past that,
:class:`StuckThreadsError` names the stuck agents and no step starts more threads until
some of those calls return, instead of the process growing threads without bound.

After ``os.fork()`` the child has none of the parent's threads: every pool is forgotten
there (``_reset_after_fork``) and the child's first step starts new workers.

Why not :class:`concurrent.futures.ThreadPoolExecutor`: its workers are joined at
interpreter exit, so one agent stuck in a call without a timeout would stop a script
from ever exiting; a KeyboardInterrupt that lands while it starts a worker thread
leaves that thread uncounted, so the pool grows past its size; and an idle worker
briefly keeps its last job (an agent, hence a model) alive. These workers are daemon
threads, registered before they start, and drop each job before reporting its result.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, Final

__all__ = [
    "ResizablePool",
    "StuckThreadsError",
    "WorkerPool",
    "check_stuck_threads",
    "is_pool_thread",
    "pool",
    "stuck_threads",
]

_THREAD_PREFIX = "mesa-llm-parallel-worker"
_thread_numbers = itertools.count(1)
_pool_threads = threading.local()

_Job = tuple[Future[Any], Callable[[], Any]]


def _mark_pool_thread() -> None:
    _pool_threads.inside = True


def is_pool_thread() -> bool:
    """True when the calling thread is one of the library's pool workers."""
    return getattr(_pool_threads, "inside", False)


class StuckThreadsError(RuntimeError):
    """Too many threads are stuck in calls that overran their timeout.

    Attributes:
        stuck: Descriptions (``repr``) of the agents whose calls are still running.
        bound: The most abandoned threads allowed at once (the step's ``max_workers``).
    """

    def __init__(self, stuck: list[str], bound: int) -> None:
        self.stuck = stuck
        self.bound = bound
        listed = ", ".join(stuck[:5]) + (f" and {len(stuck) - 5} more" if len(stuck) > 5 else "")
        super().__init__(
            f"{len(stuck)} thread(s) are still stuck in agent calls that overran their "
            f"timeout ({listed}); mesa_llm_parallel keeps at most max_workers={bound} such "
            "threads at once and starts no more spare workers. Give the agents' blocking "
            "calls a timeout of their own (an HTTP client's timeout), or raise max_workers."
        )


# Threads abandoned in calls that overran their timeout and have not returned yet, with a
# description of the agent each runs. A thread removes itself when its call returns.
_stuck: dict[threading.Thread, str] = {}
_stuck_lock = threading.Lock()


def stuck_threads() -> int:
    """How many abandoned threads (calls that overran their timeout) still run."""
    return len(_stuck)


def check_stuck_threads(bound: int) -> None:
    """Raise :class:`StuckThreadsError` if more than ``bound`` abandoned threads still run."""
    with _stuck_lock:
        if len(_stuck) > bound:
            raise StuckThreadsError(list(_stuck.values()), bound)


class WorkerPool:
    """At most ``size`` daemon worker threads, started on demand, running submitted jobs."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        # The thread running each job, so that a job's thread can be abandoned.
        self._running: dict[Future[Any], threading.Thread] = {}
        self._idle = 0  # workers waiting for a job that no submit has claimed yet
        self._shutdown = False

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn()`` on a worker; return the future of its result."""
        future: Future[Any] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to a worker pool that has been shut down")
            self._jobs.put((future, fn))
            if self._idle:
                self._idle -= 1  # that worker will take this job
            elif len(self._threads) < self.size:
                self._start_thread()
        return future

    def _start_thread(self) -> None:
        """Start one more worker (called with the lock held)."""
        thread = threading.Thread(
            target=self._work, name=f"{_THREAD_PREFIX}-{next(_thread_numbers)}", daemon=True
        )
        # Registered before it starts: an interrupt during start() cannot make the pool
        # lose count of it.
        self._threads.add(thread)
        thread.start()

    def abandon(self, future: Future[Any], label: str, bound: int) -> bool:
        """Give up on the thread running ``future``'s job; start no more jobs on it.

        The thread stops counting as one of the pool's workers (the next submit may start
        a new one) and exits when the job returns. Returns False when the job is not
        running (it has not started, or has returned).

        Raises:
            StuckThreadsError: After abandoning it, when more than ``bound`` abandoned
                threads are still running. The step that gets it stops; every later step
                raises it at its start until enough of those calls have returned, so
                the process never holds more than ``bound + 1`` stuck threads.
        """
        with self._lock:
            thread = self._running.get(future)
            if thread is None or thread not in self._threads:
                return False
            self._threads.discard(thread)
            # Its replacement, at once: jobs queued behind the stuck one (another step's
            # runners) must not wait for a thread that may never come back.
            if not self._shutdown:
                self._start_thread()
            with _stuck_lock:
                _stuck[thread] = label
                over = len(_stuck) > bound
                stuck = list(_stuck.values())
        if over:
            raise StuckThreadsError(stuck, bound)
        return True

    def alive(self) -> int:
        """How many of the pool's threads are still running."""
        with self._lock:
            return sum(thread.is_alive() for thread in self._threads)

    def shutdown(self, *, wait: bool = False) -> None:
        """Let every worker exit once the jobs already submitted are done."""
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        if wait:
            current = threading.current_thread()
            for thread in threads:
                if thread is not current:
                    thread.join()

    def _work(self) -> None:
        _mark_pool_thread()
        me = threading.current_thread()
        try:
            while True:
                try:
                    item = self._jobs.get_nowait()
                except queue.Empty:
                    with self._lock:
                        self._idle += 1
                    item = self._jobs.get()
                if item is None:
                    return
                future, fn = item
                del item
                if future.set_running_or_notify_cancel():
                    with self._lock:
                        self._running[future] = me
                    try:
                        result = fn()
                    except BaseException as exc:  # handed to whoever waits for the job
                        del fn
                        self._job_done(future)
                        future.set_exception(exc)
                    else:
                        del fn
                        self._job_done(future)
                        future.set_result(result)
                    with self._lock:
                        if me not in self._threads:  # abandoned: the pool replaced it
                            return
                del future
        finally:
            with self._lock:
                self._threads.discard(me)
            with _stuck_lock:
                _stuck.pop(me, None)

    def _job_done(self, future: Future[Any]) -> None:
        with self._lock:
            self._running.pop(future, None)


class _Entry:
    __slots__ = ("pool", "retired", "users")

    def __init__(self, size: int) -> None:
        self.pool = WorkerPool(size)
        self.users = 0
        self.retired = False


_resizable_pools: weakref.WeakSet[ResizablePool] = weakref.WeakSet()


class ResizablePool:
    """A thread pool whose size can change between steps.

    Use :meth:`lease` for the duration of a step; read :attr:`size` for the size of the
    pool the next step will get (None before the first step).
    """

    def __init__(self) -> None:
        self._forget()
        _resizable_pools.add(self)

    def _forget(self) -> None:
        """Start empty: no current pool, nothing retired (also in a forked child)."""
        self._lock = threading.Lock()
        self._current: _Entry | None = None
        # Pools shut down without waiting, kept so that shutdown(wait=True) can join
        # their threads; pruned once those threads have exited.
        self._retired: list[WorkerPool] = []

    @property
    def size(self) -> int | None:
        """The size of the current pool, or None when none has been created."""
        entry = self._current
        return None if entry is None else entry.pool.size

    @contextlib.contextmanager
    def lease(self, size: int) -> Iterator[WorkerPool]:
        """Yield a pool of ``size`` workers, kept alive until the block ends."""
        retired: _Entry | None = None
        with self._lock:
            entry = self._current
            if entry is None or entry.pool.size != size:
                if entry is not None:
                    entry.retired = True
                    if entry.users == 0:
                        retired = entry
                entry = self._current = _Entry(size)
            entry.users += 1
        if retired is not None:
            self._retire(retired.pool)
        try:
            yield entry.pool
        finally:
            with self._lock:
                entry.users -= 1
                done = entry.retired and entry.users == 0
            if done:
                self._retire(entry.pool)

    def _retire(self, workers: WorkerPool) -> None:
        workers.shutdown(wait=False)
        with self._lock:
            self._retired = [old for old in self._retired if old.alive()]
            self._retired.append(workers)

    def replace(self) -> None:
        """Give the next step a fresh pool; the current one retires once no step uses it.

        Used after an interrupt: the interrupted step's agents may still occupy every
        worker (a thread cannot be stopped), and the next step must not queue behind
        them. Their threads exit once their calls return.
        """
        with self._lock:
            entry, self._current = self._current, None
            if entry is None:
                return
            entry.retired = True
            idle = entry.users == 0
        if idle:
            self._retire(entry.pool)

    def shutdown(self, *, wait: bool = True) -> None:
        """Retire the current pool; its threads exit once no step uses them.

        With ``wait``, also wait for the threads of every idle retired pool to exit.
        Threads still running an agent that timed out are waited for too: call it when
        no step is running.
        """
        with self._lock:
            entry, self._current = self._current, None
            retired, self._retired = self._retired, []
            idle = False
            if entry is not None:
                entry.retired = True
                idle = entry.users == 0
        if entry is not None and idle:
            entry.pool.shutdown(wait=wait)
        if wait:
            for workers in retired:
                workers.shutdown(wait=True)


#: The library's one thread pool, shared by every step of the process.
pool: Final = ResizablePool()


def _reset_after_fork() -> None:
    """In a forked child: forget the parent's workers, which do not exist here.

    Their pools would believe they have idle workers and queue jobs for ever. The child's
    next step starts new ones. Nothing of the parent's threads is touched.
    """
    global _pool_threads, _stuck, _stuck_lock  # noqa: PLW0603
    _pool_threads = threading.local()  # the forking thread is no worker in the child
    _stuck = {}
    _stuck_lock = threading.Lock()
    for resizable in list(_resizable_pools):
        resizable._forget()


os.register_at_fork(after_in_child=_reset_after_fork)
