"""Run a coroutine to completion from synchronous code, wherever that code runs.

A Mesa ``model.step()`` is synchronous, but in asyncio mode it must await many agent
coroutines. Three situations need three answers:

* No event loop runs in the calling thread (a script, a test, a Solara play thread, a
  pool worker): the thread gets ONE persistent loop, created on first use and reused
  for every later step, so async clients and asyncio primitives that agents create in
  one step still work in the next. ``asyncio.run`` is never used: it would create and
  close a loop each time.
* A Jupyter kernel's loop, or one of the library's own loops, is running in the calling
  thread (a cell; an agent that steps sub-agents with the blocking ``shuffle_do``): that
  loop is reused through ``nest_asyncio2``, which is applied lazily, once, only when
  this situation first occurs, and logged (see :func:`_run_nested` for the first
  nesting on a loop that was already running).
* Any other running loop (an asyncio application, a web server, uvloop), or the
  ``loop`` setting ``"background"``: the coroutine runs on a library-owned loop in a
  daemon thread, and the caller blocks until it is done. Someone else's loop is never
  patched.

A model keeps the loop of its first asyncio step as its *home*: later steps run there
wherever they are started from, because what agents create on a loop (an async HTTP
client's connections, locks, queues) works on that loop only. A step started in another
thread is sent to the home loop when that loop runs in its own thread (a notebook's
kernel, a UI server, the background loop), or drives it in the calling thread when it is
idle (a persistent loop whose thread is busy elsewhere or gone: such a loop stays open
for as long as a model lives that calls it home). A home is replaced only when it was
closed, or is someone else's loop that no longer runs.

One function, :func:`choose_loop`, applies these rules for every blocking entry point
and answers with a :class:`LoopChoice`: the loop, which thread runs it while the step
runs there (``RunBy``), and the path that :func:`last_loop_path` reports.

A step sent to a loop that another thread runs waits whenever that loop is busy with
other work: a notebook cell running synchronous code blocks the kernel's loop, and so a
panel's step sent there. The wait is measured (:func:`last_stalled_time`, see
:class:`_SentStep`) and reported as ``StepReport.stalled_time``.

If the caller is interrupted (``KeyboardInterrupt``) or fails while waiting, the
coroutine is cancelled and given the chance to unwind before the exception propagates,
so no task is left pending on a loop that will be reused.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Final, Literal, NamedTuple

from mesa_llm_parallel._ordering import current_turnstile
from mesa_llm_parallel._state import state_of

__all__ = [
    "LoopChoice",
    "choose_loop",
    "close_loops",
    "home_loop",
    "last_loop_path",
    "last_stalled_time",
    "prepare_home",
    "run_coroutine_sync",
    "run_on_thread_loop",
    "thread_loop",
    "wait_event",
]

logger = logging.getLogger("mesa_llm_parallel")

LoopPath = Literal["thread_loop", "running_loop", "background", "home_loop"]

#: How long a cancelled coroutine may take to unwind after an interrupt, in seconds.
_UNWIND_TIMEOUT: Final = 5.0

_local = threading.local()

#: Incremented in a forked child. Loops made before the fork share their selector and
#: wake-up sockets with the parent's: the child never runs them (``_reset_after_fork``).
_generation = 0


def _new_loop() -> asyncio.AbstractEventLoop:
    """A new event loop of the library's own, made in an empty context.

    A loop registers its wake-up reader when it is made, and that callback keeps a copy
    of the context it was made in for the loop's whole life. Loops are often first
    needed inside an agent's step, whose context refers to the agent (and so to its
    model): made there, the persistent loop would keep the model alive forever.
    """
    loop = contextvars.Context().run(asyncio.new_event_loop)
    _own_loops.add(loop)
    return loop


class _PersistentLoop:
    """A persistent loop of the library's, closed when nothing needs it any more.

    It is made for one thread (see :func:`_loop_of_this_thread`) and closed once that
    thread is gone and no living model has the loop as its home. Any thread may run it,
    one at a time: whoever holds ``run_lock`` runs it.
    """

    __slots__ = ("__weakref__", "loop", "run_lock")

    def __init__(self) -> None:
        self.loop = _new_loop()
        self.run_lock = threading.Lock()

    def close(self) -> None:
        """Close the loop unless some thread is running it (or about to).

        As ``asyncio.run`` does at its end: tasks still pending there (a client's
        background worker that an agent started) are cancelled and given up to
        ``_UNWIND_TIMEOUT`` seconds to finish, then async generators are closed.
        """
        if not self.run_lock.acquire(blocking=False):
            return
        try:
            loop = self.loop
            if loop.is_closed() or loop.is_running():
                return
            try:
                pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.wait(pending, timeout=_UNWIND_TIMEOUT))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
        finally:
            self.run_lock.release()

    def __del__(self) -> None:  # its thread has ended, and no living model calls it home
        loop = self.loop
        if not loop.is_closed() and not loop.is_running():
            loop.close()


_persistent_loops: weakref.WeakSet[_PersistentLoop] = weakref.WeakSet()
_persistent_loops_lock = threading.Lock()


def _this_threads_loop() -> _PersistentLoop | None:
    """The calling thread's persistent loop if it has one (never makes one)."""
    return getattr(_local, "own_loop", None)


def _loop_of_this_thread() -> _PersistentLoop:
    """The calling thread's persistent loop (made on first use, or anew once closed)."""
    own = _this_threads_loop()
    if own is None or own.loop.is_closed():
        own = _PersistentLoop()
        _local.own_loop = own
        with _persistent_loops_lock:
            _persistent_loops.add(own)
            _close_at_exit()
    return own


_exit_hook_registered = False


def _close_at_exit() -> None:
    """Once: at interpreter exit, close the library's idle loops as asyncio.run would.

    Without it the loops are only freed, and a task an agent's client left pending on
    one (litellm's logging worker, say) is reported as "destroyed but it is pending".
    """
    global _exit_hook_registered  # noqa: PLW0603 - one hook per process
    if not _exit_hook_registered:
        _exit_hook_registered = True
        atexit.register(close_loops)


def thread_loop() -> asyncio.AbstractEventLoop:
    """Return the calling thread's persistent event loop, creating it on first use."""
    return _loop_of_this_thread().loop


def last_loop_path() -> LoopPath | None:
    """Which way the calling thread's most recent asyncio step ran, or None.

    ``"thread_loop"``: the thread's own persistent loop; ``"running_loop"``: the loop
    already running in the thread (reused through nest-asyncio2); ``"background"``: the
    library's background loop thread; ``"home_loop"``: the model's home loop, which
    belongs to another thread (the step was sent to it, or ran it here while it was idle).
    """
    return getattr(_local, "last_path", None)


# -- reusing a running loop ---------------------------------------------------------
# A blocking step started while a loop runs in the calling thread runs nested on that
# loop only where that is safe and useful: on the library's own loops (an agent's
# ``astep`` that steps sub-agents with the blocking ``shuffle_do``), and on a Jupyter
# kernel's loop (a cell; its later ``await`` code shares the model's loop-bound
# clients). Any other running loop (an asyncio application, a web server, uvloop) is
# left alone: the step runs on the library's background loop thread while the caller
# blocks, as any blocking call would. Nesting a loop needs nest-asyncio2, which patches
# asyncio process-wide and makes its tasks slower, and a chain of nested runs grows with
# the number of callers at once: neither belongs in someone else's application.
_nest_lock = threading.Lock()
_nested_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
_unpatchable_types: set[type] = set()
#: Loops the library made (persistent thread loops, the background loop).
_own_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
#: How many blocking steps run nested on each loop right now.
_nest_depth: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()
#: The most blocking steps nested on one loop at once. Every level costs a dozen or so
#: Python frames, and a chain grows with each caller waiting at once (an agent's
#: ``astep`` stepping sub-agents, tasks of a cell each calling ``model.step()``): past
#: this, a new model's step goes to the background loop instead, and a step that must
#: run on this loop (its model's home) raises :class:`NestingTooDeepError` instead of
#: reaching Python's recursion limit.
MAX_NESTED_STEPS: Final = 32


class NestingTooDeepError(RuntimeError):
    """Too many blocking steps are nested on one event loop at once."""


def _is_kernel_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` (running in this thread) is an IPython kernel's own loop."""
    if threading.current_thread() is not threading.main_thread():
        return False
    kernelapp = sys.modules.get("ipykernel.kernelapp")
    if kernelapp is None:
        return False
    try:
        return bool(kernelapp.IPKernelApp.initialized())
    except Exception:  # an ipykernel we do not know: not a kernel to nest in
        return False


def _may_nest(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether a blocking step may run nested on ``loop``, which runs in this thread."""
    if loop in _nested_loops:
        return True
    if loop not in _own_loops and not _is_kernel_loop(loop):
        return False
    return _can_reuse(loop)


def _run_nested(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion on ``loop``, which is running in this thread.

    This call is made from inside one callback of the loop's current iteration. If that
    iteration is asyncio's own ``_run_once`` (nest-asyncio2 was applied while the loop
    was already running), it took a count of the callbacks that were ready when it
    began and will pop exactly that many more once this call returns. The nested run
    may well run some of them (they are ready), and the outer iteration would then pop
    from an empty queue: ``IndexError: pop from an empty deque``, the fault of applying
    nest-asyncio to a loop already running several callbacks at once. So every ready
    callback that the nested run consumed is replaced, at the front of the queue, by a
    cancelled placeholder that the outer iteration pops and skips. Under nest-asyncio2's
    own iterations, which re-check the queue, the placeholders are skipped as well.
    """
    ready = loop._ready  # type: ignore[attr-defined]
    before = list(ready)
    depth = _nest_depth.get(loop, 0)
    _nest_depth[loop] = depth + 1
    try:
        return _run_until_complete(loop, coro)
    finally:
        _nest_depth[loop] = depth
        if before:
            still = {id(handle) for handle in ready}
            consumed = sum(1 for handle in before if id(handle) not in still)
            if consumed:
                placeholder = asyncio.Handle(_nothing, (), loop)
                placeholder.cancel()
                ready.extendleft([placeholder] * consumed)


def _nothing() -> None:
    """The callback of a placeholder (never called: placeholders are cancelled)."""


def _refuse(loop: asyncio.AbstractEventLoop, reason: object) -> bool:
    _unpatchable_types.add(type(loop))
    logger.info(
        "mesa_llm_parallel: the running event loop (%s) cannot be re-entered (%s); "
        "asyncio steps started from it run on a background loop thread instead",
        type(loop).__name__,
        reason,
    )
    return False


def _can_reuse(loop: asyncio.AbstractEventLoop) -> bool:
    if loop in _nested_loops:
        return True
    with _nest_lock:
        if loop in _nested_loops:
            return True
        if type(loop) in _unpatchable_types:
            return False
        if not isinstance(loop, asyncio.BaseEventLoop):
            # nest-asyncio2 only re-enters loops derived from asyncio's own (not uvloop).
            # Checked first: its apply() patches asyncio globally before refusing.
            return _refuse(loop, "not an asyncio.BaseEventLoop")
        import nest_asyncio2

        try:
            # run_close_loop: the patched asyncio.run keeps closing the loop it made,
            # as the standard one does (by default it would leave it open).
            nest_asyncio2.apply(loop, run_close_loop=True)
        except ValueError as exc:
            return _refuse(loop, exc)
        if not _nested_loops:
            logger.info(
                "mesa_llm_parallel: an event loop is already running in this thread; "
                "reusing it for parallel steps through nest-asyncio2 "
                "(set settings.loop = 'background' to use a separate loop thread instead)"
            )
        _nested_loops.add(loop)
        return True


# -- the background loop thread -----------------------------------------------------
class _LoopThread:
    """The library's background loop, run forever by a daemon thread of its own."""

    def __init__(self) -> None:
        self.loop = _new_loop()
        self.thread = threading.Thread(target=self._run, name="mesa-llm-parallel-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        if self.thread.is_alive():  # as asyncio.run ends: pending tasks are cancelled first
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_cancel_pending(), self.loop).result(
                    _UNWIND_TIMEOUT
                )
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=_UNWIND_TIMEOUT)
        if not self.thread.is_alive():
            self.loop.close()


async def _cancel_pending() -> None:
    """Cancel every other task of the running loop and wait (briefly) for them."""
    me = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not me and not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=_UNWIND_TIMEOUT)


#: The background loop thread, made on first use (``_background_loop_thread``).
_background: _LoopThread | None = None
_background_lock = threading.Lock()


def _background_loop_thread() -> _LoopThread:
    global _background  # noqa: PLW0603 - one lazily created loop thread per process
    background = _background
    if background is None or not background.thread.is_alive():
        with _background_lock:
            background = _background
            if background is None or not background.thread.is_alive():
                background = _background = _LoopThread()
                _close_at_exit()
    return background


# -- running ------------------------------------------------------------------------
#: How often a thread that waits for another thread's loop checks on it, in seconds.
#: Short: a Ctrl-C delivered to another thread is noticed only when this one runs
#: Python code again. It is also the interval of the probes that tell whether the loop
#: is held up by other work (``_SentStep.probe``).
_POLL: Final = 0.05

#: Set, in the context a sent step runs in, to that step's token: its own tasks (and
#: the tasks they create) carry it, so a probe can tell them from other work on the loop.
_STEP_TOKEN: contextvars.ContextVar[object] = contextvars.ContextVar("mesa_llm_parallel_step")


def _run_until_complete(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], *, shared: bool = False
) -> Any:
    """Run ``coro`` as a task on ``loop`` from this thread until it is done.

    ``shared``: other threads' steps may be running on the loop too (a home loop). A
    ``SystemExit`` or the like that one of their tasks raises escapes this thread's
    run; it belongs to their caller, who gets it from the task, so this run goes on.
    """
    task = loop.create_task(coro)
    try:
        while True:
            try:
                return loop.run_until_complete(task)
            except (Exception, KeyboardInterrupt):
                raise  # ours, or an interrupt of this thread
            except BaseException:
                if not shared or task.done():
                    raise
    except BaseException:
        if not task.done():
            task.cancel()
            # A second interrupt while unwinding is dropped: the first one is reported.
            with contextlib.suppress(BaseException):
                loop.run_until_complete(asyncio.wait([task], timeout=_UNWIND_TIMEOUT))
        raise


class _LoopGoneError(RuntimeError):
    """The loop a step was sent to was closed, or stopped, before the step was done."""


class _NotSentError(_LoopGoneError):
    """The loop a step was about to be sent to was closed: nothing of the step ran."""


class _SentStep:
    """A coroutine sent to a loop that another thread runs, and its completion.

    It also measures how long the step waited for that loop while the loop was busy
    with other work (:meth:`stalled_time`): the delay between sending the step and the
    loop starting it, and, while it runs, every poll interval at whose end the loop has
    still not run a probe sent at the interval's start and is running something other
    than the step's own work or a parallel step's agent (a notebook cell's code, a
    callback, other asyncio code).
    Blocks shorter than one poll interval are not seen. Probes are sent only by a
    waiting caller: nothing is measured on a loop that the calling thread runs itself.
    """

    __slots__ = (
        "blocked_by_other_work",
        "done",
        "last_poll",
        "loop",
        "probe_answered",
        "probe_sent",
        "sent_at",
        "stalled",
        "started_at",
        "task",
        "token",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, factory: Callable[[], Coroutine[Any, Any, Any]]
    ) -> None:
        self.loop = loop
        self.task: asyncio.Task[Any] | None = None
        self.done = threading.Event()
        self.token = object()  # refers to nothing: lingering tasks keep no step alive
        self.sent_at = self.last_poll = time.perf_counter()
        self.started_at: float | None = None
        self.probe_sent: float | None = None
        self.probe_answered: float | None = None
        self.blocked_by_other_work = False
        self.stalled = 0.0
        # The coroutine is made on the loop (none is left un-awaited if the loop is
        # closed already), and runs in a copy of the caller's context, as if it ran here.
        context = contextvars.copy_context()
        context.run(_STEP_TOKEN.set, self.token)
        try:
            loop.call_soon_threadsafe(self._start, factory, context=context)
        except RuntimeError as exc:  # "Event loop is closed"
            raise _NotSentError(str(exc)) from exc

    def _start(self, factory: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        self.started_at = time.perf_counter()
        self.task = self.loop.create_task(factory())
        self.task.add_done_callback(lambda _: self.done.set())

    def cancel(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs
            self.loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        if self.task is not None:  # it is: _start was scheduled first
            self.task.cancel()

    async def _finished(self) -> None:
        if self.task is None:  # _start is queued ahead of this coroutine's first step
            await asyncio.sleep(0)
        await asyncio.wait([self.task])  # type: ignore[list-item]

    # -- how long the loop kept the step waiting -------------------------------------
    def probe(self) -> None:
        """Called by the waiting caller every ``_POLL`` s: is the loop held up elsewhere?

        A probe still unanswered at the next call means the loop was busy over the whole
        interval; it counts if the loop is then running other work. Once the probe is
        answered, the part of the interval before the answer counts as the interval
        before it did, and a new probe is sent.
        """
        now = time.perf_counter()
        if self.started_at is not None:
            if self.probe_sent is not None and self.probe_answered is None:
                self.blocked_by_other_work = not self._running_own_task()
                if self.blocked_by_other_work:
                    self.stalled += now - self.last_poll
            else:
                self._count_tail()
                self.probe_sent, self.probe_answered = now, None
                with contextlib.suppress(RuntimeError):  # closed: the wait notices
                    self.loop.call_soon_threadsafe(self._answer)
        self.last_poll = now

    def _answer(self) -> None:
        self.probe_answered = time.perf_counter()

    def _count_tail(self) -> None:
        """Count the end of a block of other work: from the last call to the answer."""
        answered = self.probe_answered
        if self.blocked_by_other_work and answered is not None:
            self.stalled += max(0.0, answered - self.last_poll)
        self.blocked_by_other_work = False

    def _running_own_task(self) -> bool:
        """Whether the loop's thread is running this step's work right now.

        That is this step's own task (or one it made in its context), or any parallel
        step's agent: agents run in copies of their step's context, made before the
        step was sent, so they are known by the turnstile set in it, not by this token.
        """
        try:
            task = asyncio.current_task(self.loop)  # read from another thread: a lookup
        except Exception:  # a loop asyncio knows nothing about: assume the step's own
            return True
        if task is None:  # a plain callback (or nothing): not a step's
            return False
        context = task.get_context()
        return context.get(_STEP_TOKEN) is self.token or context.get(current_turnstile) is not None

    def stalled_time(self) -> float:
        """Seconds the step waited for the loop while the loop did other work."""
        started = self.started_at if self.started_at is not None else time.perf_counter()
        self._count_tail()
        return (started - self.sent_at) + self.stalled

    # -- waiting ----------------------------------------------------------------------
    def run_loop_while_idle(self, persistent: _PersistentLoop) -> None:
        """Run ``persistent``'s loop until the task is done, whenever no other thread does.

        The target of a helper thread, for a caller that runs another loop itself.
        """
        loop = self.loop
        while not self.done.is_set() and not loop.is_closed():
            if persistent.run_lock.acquire(timeout=_POLL):
                try:
                    self._run_loop_once()
                except BaseException:  # noqa: S110 - another caller's task ended this run
                    pass  # (its own caller gets that exception); keep running it for ours
                finally:
                    persistent.run_lock.release()

    def _run_loop_once(self) -> None:
        """Run the loop (whose ``run_lock`` this thread holds) until the task is done."""
        if not self.done.is_set() and not self.loop.is_closed():
            self.loop.run_until_complete(self._finished())

    def wait_running_loop_while_idle(self, persistent: _PersistentLoop) -> Any:
        """Block until the task is done, running ``persistent``'s loop when nobody does.

        While another thread runs the loop (a step's caller, another worker), this one
        only waits. Whenever nobody runs it, this thread (which runs no loop) does.
        """
        loop = self.loop
        try:
            while not self.done.is_set():
                if loop.is_closed():
                    raise _LoopGoneError("the model's home loop was closed before the step ended")
                if loop.is_running() or not persistent.run_lock.acquire(timeout=_POLL):
                    self.probe()  # another thread runs it
                    self.done.wait(_POLL)
                    continue
                try:
                    self.blocked_by_other_work = False  # this thread runs it from now on
                    self._run_loop_once()
                except (Exception, KeyboardInterrupt):
                    raise
                except BaseException:  # noqa: S110 - another caller's task ended this run
                    pass  # (its own caller gets that exception); keep running it for ours
                finally:
                    persistent.run_lock.release()
        except BaseException:
            self.cancel()
            if persistent.run_lock.acquire(blocking=False):  # nobody runs it: let it unwind
                try:
                    with contextlib.suppress(BaseException):
                        loop.run_until_complete(asyncio.wait_for(self._finished(), _UNWIND_TIMEOUT))
                finally:
                    persistent.run_lock.release()
            self.done.wait(_UNWIND_TIMEOUT)
            raise
        return self.task.result()  # type: ignore[union-attr]

    def wait_for_other_thread(self, persistent: _PersistentLoop | None) -> Any:
        """Block until the task is done; return its result or raise its exception.

        The loop is run by another thread: its own (``persistent`` None) or, for a
        persistent loop, whichever thread holds its ``run_lock``.
        """
        loop = self.loop
        try:
            # In short waits: a Ctrl-C delivered to another thread is noticed by this
            # one only when it runs Python code again.
            while not self.done.wait(_POLL):
                # A loop that its own thread runs has stopped once it ran this task
                # (a loop thread that has not started yet is not "stopped").
                stopped = persistent is None and self.task is not None and not loop.is_running()
                if loop.is_closed() or stopped:
                    raise _LoopGoneError(
                        "the event loop this step was sent to (the model's home loop) "
                        "was stopped before the step finished"
                    )
                self.probe()
        except BaseException:
            self.cancel()
            self.done.wait(_UNWIND_TIMEOUT)
            raise
        return self.task.result()  # type: ignore[union-attr]


# -- homes --------------------------------------------------------------------------
class _Home:
    """Where a model's asyncio steps run: one loop, and its keeper if the loop is ours.

    Kept in the model's own state (``_state``), not in a registry of this module: the
    home then lives exactly as long as the model, and a loop that refers back to the
    model (a task an agent left pending) is garbage the collector can free. Copies and
    unpickled models start without a home (a loop cannot be copied): their first asyncio
    step chooses their own. A home made before a fork is not used in the child.
    """

    __slots__ = ("generation", "loop", "persistent")

    def __init__(self, loop: asyncio.AbstractEventLoop, persistent: _PersistentLoop | None) -> None:
        self.loop = loop
        self.persistent = persistent  # keeps a persistent loop open while the model lives
        self.generation = _generation


#: Loops that are (or were) some model's home, for wait_event.
_home_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def _home_of(model: Any) -> _Home | None:
    state = state_of(model, create=False)
    home = None if state is None else state.home
    if home is None or home.generation != _generation or home.loop.is_closed():
        return None
    return home


def home_loop(model: Any) -> asyncio.AbstractEventLoop | None:
    """The loop ``model``'s asyncio steps run on, or None before its first one."""
    home = _home_of(model)
    return None if home is None else home.loop


def _set_home(
    model: Any, loop: asyncio.AbstractEventLoop, persistent: _PersistentLoop | None
) -> None:
    if model is None:
        return
    current = _home_of(model)
    if current is not None and current.loop is loop:
        return  # the home it has: nothing to change
    state = state_of(model)
    if state is not None:  # no __dict__: no home
        state.home = _Home(loop, persistent)
        _home_loops.add(loop)


def _check_depth(loop: asyncio.AbstractEventLoop) -> None:
    depth = _nest_depth.get(loop, 0)
    if depth >= MAX_NESTED_STEPS:
        raise NestingTooDeepError(
            f"{depth} blocking steps are already nested on this event loop (at most "
            f"{MAX_NESTED_STEPS}): many callers are waiting on it at once (agents whose "
            "astep calls a blocking shuffle_do, or tasks that each call model.step()). "
            "Await instead: 'await ashuffle_do(agents)' in async code."
        )


# -- choosing where a step runs -----------------------------------------------------
#: Which thread runs the chosen loop while the step runs there:
#: ``"caller_nested"``: the calling thread, inside the run of that loop already going on
#: in it (a nested run); ``"caller"``: the calling thread, which runs no loop, whenever
#: no other thread runs this persistent loop (else it waits for, and joins, their run);
#: ``"loop_thread"``: the loop's own thread (a kernel's, a UI server's, the background
#: loop thread), while the caller waits; ``"helper"``: a helper thread, whenever no
#: other thread runs this persistent loop, while the caller (which runs another loop)
#: waits.
RunBy = Literal["caller_nested", "caller", "loop_thread", "helper"]


class LoopChoice(NamedTuple):
    """Where one asyncio step runs: the answer of :func:`choose_loop`.

    A named tuple rather than a frozen dataclass: one is made for every step, and it is
    the cheaper of the two to make.

    Attributes:
        path: What :func:`last_loop_path` reports for the step.
        loop: The event loop the step's coroutine runs on.
        run_by: Which thread runs ``loop`` meanwhile (see ``RunBy``).
        persistent: The loop's keeper when it is one of the library's persistent loops
            (any thread may run it, one at a time), else None.
        at_home: Whether ``loop`` is the model's home already (else it becomes it).
    """

    path: LoopPath
    loop: asyncio.AbstractEventLoop
    run_by: RunBy
    persistent: _PersistentLoop | None = None
    at_home: bool = False


def _choice_at_home(home: _Home, running: asyncio.AbstractEventLoop | None) -> LoopChoice | None:
    """Where a step of a model with ``home`` runs; None if the home cannot be used."""
    loop, persistent = home.loop, home.persistent
    if loop is running:
        if not _may_nest(loop):
            return None
        return LoopChoice("running_loop", loop, "caller_nested", at_home=True)
    background = _background
    path: LoopPath
    if background is not None and loop is background.loop:
        path = "background"
    elif (
        running is None
        and persistent is not None
        and persistent is getattr(_local, "own_loop", None)
    ):
        path = "thread_loop"
    else:
        path = "home_loop"
    if persistent is None:  # a loop that its own thread runs: the step is sent there
        if not loop.is_running():
            return None  # stopped, and not ours to run
        return LoopChoice(path, loop, "loop_thread", at_home=True)
    # With another loop running in this thread (asyncio allows one per thread), a
    # helper thread runs the home loop while this one waits, as for a sequential step.
    run_by: RunBy = "caller" if running is None else "helper"
    return LoopChoice(path, loop, run_by, persistent, at_home=True)


def choose_loop(
    model: Any,
    loop_policy: Literal["auto", "background"] = "auto",
    running: asyncio.AbstractEventLoop | None = None,
    *,
    use_home: bool = True,
) -> LoopChoice:
    """Decide where an asyncio step of ``model`` started in this thread runs.

    Every blocking entry point (:func:`run_coroutine_sync`, :func:`run_on_thread_loop`,
    :func:`prepare_home`) asks this one function; the rules are the module's.

    Args:
        model: The model whose step it is, or None (no home is used or chosen).
        loop_policy: The ``loop`` setting: ``"auto"`` or ``"background"``.
        running: The loop running in the calling thread, or None.
        use_home: False to ignore the model's home (it was found unusable).

    Returns:
        The choice. It only decides: the caller records the home (``_set_home``).
    """
    if use_home and loop_policy == "auto" and model is not None:
        home = _home_of(model)
        if home is not None:
            choice = _choice_at_home(home, running)
            if choice is not None:
                return choice
            logger.info(
                "mesa_llm_parallel: the home event loop of %r has stopped and is not the "
                "library's to run; the model gets a new one",
                model,
            )
    too_deep = running is not None and _nest_depth.get(running, 0) >= MAX_NESTED_STEPS
    if loop_policy == "background" or (
        running is not None and (too_deep or not _may_nest(running))
    ):
        # Any running loop but a kernel's or the library's own is left alone: the step
        # runs on the background loop thread while this thread blocks, unless it is
        # started by an agent on that very loop (a blocking step of sub-agents).
        background = _background_loop_thread().loop
        run_by: RunBy = "caller_nested" if running is background else "loop_thread"
        return LoopChoice("background", background, run_by)
    if running is None:
        own = _loop_of_this_thread()
        return LoopChoice("thread_loop", own.loop, "caller", own)
    return LoopChoice("running_loop", running, "caller_nested")


def _run_choice(choice: LoopChoice, factory: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run the coroutine made by ``factory()`` where ``choice`` says, and block until done.

    The one place that records the calling thread's :func:`last_loop_path` (when the
    step starts) and :func:`last_stalled_time` (when it ends).
    """
    _local.last_path = choice.path
    loop, persistent = choice.loop, choice.persistent
    sent: _SentStep | None = None
    try:
        if choice.run_by == "caller_nested":
            _check_depth(loop)
            if not _may_nest(loop):
                raise RuntimeError(
                    "cannot run a blocking parallel step on the library's background loop "
                    "thread; use 'await ashuffle_do(...)' from async code"
                )
            return _run_nested(loop, factory())
        if choice.run_by == "caller" and persistent is not None:
            if persistent.run_lock.acquire(blocking=False):
                try:
                    return _run_until_complete(loop, factory(), shared=True)
                finally:
                    persistent.run_lock.release()
            # Another thread runs it right now: the coroutine joins that run.
            sent = _SentStep(loop, factory)
            return sent.wait_running_loop_while_idle(persistent)
        sent = _SentStep(loop, factory)
        if choice.run_by == "helper" and persistent is not None:
            threading.Thread(
                target=sent.run_loop_while_idle,
                args=(persistent,),
                name="mesa-llm-parallel-loop",
                daemon=True,
            ).start()
        return sent.wait_for_other_thread(persistent)
    finally:
        _local.last_stalled = 0.0 if sent is None else sent.stalled_time()


def last_stalled_time() -> float:
    """Seconds the calling thread's most recent asyncio step was held up by its loop.

    That is the time the step waited for an event loop run by another thread while
    that loop was busy with other work (see :class:`_SentStep` for how it is measured);
    0.0 when the step ran on a loop this thread ran, or before any step.
    """
    return getattr(_local, "last_stalled", 0.0)


def run_on_thread_loop(factory: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine on the calling thread's persistent loop (no loop runs here)."""
    return _run_choice(choose_loop(None, "auto", None), factory)


def wait_event(event: threading.Event, timeout: float | None = None) -> bool:
    """``event.wait(timeout)`` that keeps this thread's running loop going meanwhile.

    A notebook cell that waits for a background run (a panel's) blocks the kernel's
    loop; when that loop is the home of the model the run steps, the run would wait for
    the cell and the cell for the run. Here the loop keeps running, as it does during a
    step started in a cell.
    """
    if event.is_set() or (timeout is not None and timeout <= 0):
        return event.is_set()  # no waiting: never runs the loop (safe from __del__)
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return event.wait(timeout)
    if running not in _home_loops or not _may_nest(running):
        return event.wait(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout

    async def waiting() -> bool:
        while not event.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL / 5)
        return True

    return _run_nested(running, waiting())


def prepare_home(model: Any, loop_policy: Literal["auto", "background"] = "auto") -> bool:
    """Give ``model`` the home loop an asyncio step from this thread would give it.

    Used by threading-mode steps, whose async-only agents run on the model's home loop
    (from the pool's threads) so that what they create there keeps working in either
    mode. Returns True when the calling thread must run that loop while it waits for
    the step: the loop running in this thread (a notebook cell), or a persistent loop of
    the library's that nobody runs right now. Otherwise another thread runs it.
    """
    choice = choose_loop(model, loop_policy, asyncio._get_running_loop())
    if not choice.at_home:
        _set_home(model, choice.loop, choice.persistent)
    if choice.run_by == "caller_nested":
        return _may_nest(choice.loop)
    return choice.run_by == "caller" and not choice.loop.is_running()


def run_coroutine_sync(
    factory: Callable[[], Coroutine[Any, Any, Any]],
    *,
    loop_policy: Literal["auto", "background"] = "auto",
    model: Any = None,
) -> Any:
    """Run the coroutine made by ``factory()`` to completion and return its result.

    With ``model``, the coroutine runs on the model's home loop, which the first call
    for that model chooses (see the module's documentation and :func:`choose_loop`).
    The coroutine is created only once the loop that runs it has been chosen, so no
    "coroutine was never awaited" warning can arise on any path.
    """
    running = asyncio._get_running_loop()
    choice = choose_loop(model, loop_policy, running)
    if not choice.at_home:
        _set_home(model, choice.loop, choice.persistent)
    try:
        return _run_choice(choice, factory)
    except _NotSentError:
        if not choice.at_home:
            raise
    # The home loop was closed between the choice and the sending: choose anew.
    choice = choose_loop(model, loop_policy, running, use_home=False)
    _set_home(model, choice.loop, choice.persistent)
    return _run_choice(choice, factory)


def close_loops() -> None:
    """Stop the background loop thread and close every idle persistent loop."""
    global _background
    with _background_lock:
        background, _background = _background, None
    if background is not None:
        background.stop()
    with _persistent_loops_lock:
        persistent_loops = list(_persistent_loops)
    for persistent in persistent_loops:
        persistent.close()


def _reset_after_fork() -> None:
    """In a forked child: forget every loop and thread of the parent.

    Only the thread that forked exists in the child; the background loop thread, the
    persistent loops' owners and any thread that was running a loop do not, and locks
    they held stay held. Everything is made anew on first use; models' homes from before
    the fork are ignored (``_Home.generation``), so their next step chooses a new one.
    """
    global _local, _generation, _persistent_loops, _persistent_loops_lock  # noqa: PLW0603
    global _nest_lock, _nested_loops, _background, _background_lock, _home_loops  # noqa: PLW0603
    _generation += 1
    _local = threading.local()
    _persistent_loops = weakref.WeakSet()
    _persistent_loops_lock = threading.Lock()
    _nest_lock = threading.Lock()
    _nested_loops = weakref.WeakSet()
    _background = None
    _background_lock = threading.Lock()
    _home_loops = weakref.WeakSet()


os.register_at_fork(after_in_child=_reset_after_fork)
