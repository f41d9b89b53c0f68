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
from typing import Any, Final, Literal

from mesa_llm_parallel._state import state_of

__all__ = [
    "close_loops",
    "home_loop",
    "last_loop_path",
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


class _LoopHolder:
    """Owns one persistent loop and closes it when nothing needs it any more.

    That is when its thread is gone and no living model has the loop as its home. The
    loop may be run by any thread, one at a time: whoever holds ``lock`` runs it.
    """

    __slots__ = ("__weakref__", "lock", "loop")

    def __init__(self) -> None:
        self.loop = _new_loop()
        self.lock = threading.Lock()

    def close(self) -> None:
        """Close the loop unless some thread is running it (or about to).

        As ``asyncio.run`` does at its end: tasks still pending there (a client's
        background worker that an agent started) are cancelled and given up to
        ``_UNWIND_TIMEOUT`` seconds to finish, then async generators are closed.
        """
        if not self.lock.acquire(blocking=False):
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
            self.lock.release()

    def __del__(self) -> None:  # its thread has ended, and no living model calls it home
        loop = self.loop
        if not loop.is_closed() and not loop.is_running():
            loop.close()


_holders: weakref.WeakSet[_LoopHolder] = weakref.WeakSet()
_holders_lock = threading.Lock()


def _thread_holder() -> _LoopHolder:
    holder: _LoopHolder | None = getattr(_local, "holder", None)
    if holder is None or holder.loop.is_closed():
        holder = _LoopHolder()
        _local.holder = holder
        with _holders_lock:
            _holders.add(holder)
            _close_at_exit()
    return holder


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
    return _thread_holder().loop


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
class _BackgroundLoop:
    def __init__(self) -> None:
        self.loop = _new_loop()
        self.thread = threading.Thread(target=self._run, name="mesa-llm-parallel-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, factory: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        return _send(self.loop, factory)

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


_background: _BackgroundLoop | None = None
_background_lock = threading.Lock()


def _background_loop() -> _BackgroundLoop:
    global _background  # noqa: PLW0603 - one lazily created loop thread per process
    bg = _background
    if bg is None or not bg.thread.is_alive():
        with _background_lock:
            bg = _background
            if bg is None or not bg.thread.is_alive():
                bg = _background = _BackgroundLoop()
                _close_at_exit()
    return bg


# -- running ------------------------------------------------------------------------
#: How often a thread that waits for another thread's loop checks on it, in seconds.
#: Short: a Ctrl-C delivered to another thread is noticed only when this one runs
#: Python code again.
_POLL: Final = 0.05


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


class _Remote:
    """A coroutine running on a loop that another thread runs, and its completion."""

    __slots__ = ("done", "loop", "task")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, factory: Callable[[], Coroutine[Any, Any, Any]]
    ) -> None:
        self.loop = loop
        self.task: asyncio.Task[Any] | None = None
        self.done = threading.Event()
        # The coroutine is made on the loop (none is left un-awaited if the loop is
        # closed already), and runs in a copy of the caller's context, as if it ran here.
        try:
            loop.call_soon_threadsafe(self._start, factory, context=contextvars.copy_context())
        except RuntimeError as exc:  # "Event loop is closed"
            raise _LoopGoneError(str(exc)) from exc

    def _start(self, factory: Callable[[], Coroutine[Any, Any, Any]]) -> None:
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

    def pump(self, holder: _LoopHolder) -> None:
        """Run ``holder``'s loop until the task is done, whenever no other thread runs it."""
        loop = self.loop
        while not self.done.is_set() and not loop.is_closed():
            if holder.lock.acquire(timeout=_POLL):
                try:
                    self._drive_once()
                except BaseException:  # noqa: S110 - another caller's task ended this run
                    pass  # (its own caller gets that exception); keep driving for ours
                finally:
                    holder.lock.release()

    def _drive_once(self) -> None:
        """Run the loop (whose holder's lock this thread holds) until the task is done."""
        if not self.done.is_set() and not self.loop.is_closed():
            self.loop.run_until_complete(self._finished())

    def wait_owned(self, holder: _LoopHolder) -> Any:
        """Block until the task on ``holder``'s loop is done, running the loop when idle.

        While another thread runs the loop (a step's caller, another worker), this one
        only waits. Whenever nobody runs it, this thread (which runs no loop) does.
        """
        loop = self.loop
        try:
            while not self.done.is_set():
                if loop.is_closed():
                    raise _LoopGoneError("the model's home loop was closed before the step ended")
                if loop.is_running() or not holder.lock.acquire(timeout=_POLL):
                    self.done.wait(_POLL)
                    continue
                try:
                    self._drive_once()
                except (Exception, KeyboardInterrupt):
                    raise
                except BaseException:  # noqa: S110 - another caller's task ended this run
                    pass  # (its own caller gets that exception); keep driving for ours
                finally:
                    holder.lock.release()
        except BaseException:
            self.cancel()
            if holder.lock.acquire(blocking=False):  # nobody runs it: let the task unwind
                try:
                    with contextlib.suppress(BaseException):
                        loop.run_until_complete(asyncio.wait_for(self._finished(), _UNWIND_TIMEOUT))
                finally:
                    holder.lock.release()
            self.done.wait(_UNWIND_TIMEOUT)
            raise
        return self.task.result()  # type: ignore[union-attr]

    def wait(self, holder: _LoopHolder | None) -> Any:
        """Block until the task is done; return its result or raise its exception."""
        loop = self.loop
        try:
            # In short waits: a Ctrl-C delivered to another thread is noticed by this
            # one only when it runs Python code again.
            while not self.done.wait(_POLL):
                # A loop that its own thread runs has stopped once it ran this task
                # (a loop thread that has not started yet is not "stopped").
                stopped = holder is None and self.task is not None and not loop.is_running()
                if loop.is_closed() or stopped:
                    raise _LoopGoneError(
                        "the event loop this step was sent to (the model's home loop) "
                        "was stopped before the step finished"
                    )
        except BaseException:
            self.cancel()
            self.done.wait(_UNWIND_TIMEOUT)
            raise
        return self.task.result()  # type: ignore[union-attr]


def _send(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], Coroutine[Any, Any, Any]],
    holder: _LoopHolder | None = None,
) -> Any:
    """Run the coroutine on ``loop`` and block this thread until it is done.

    Without ``holder`` the loop is running in its own thread (the background loop, a
    kernel's, a UI server's). With one it is a persistent loop of ours: whenever no
    other thread runs it, this thread runs it if it runs no loop itself, or else a
    helper thread does.
    """
    remote = _Remote(loop, factory)
    if holder is None:
        return remote.wait(None)
    if asyncio._get_running_loop() is None:
        return remote.wait_owned(holder)
    threading.Thread(
        target=remote.pump, args=(holder,), name="mesa-llm-parallel-loop", daemon=True
    ).start()
    return remote.wait(holder)


def _drive(holder: _LoopHolder, factory: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run the coroutine on ``holder``'s loop from this thread, which runs no loop.

    If another thread is running that loop right now, the coroutine joins its run.
    """
    if holder.lock.acquire(blocking=False):
        try:
            return _run_until_complete(holder.loop, factory(), shared=True)
        finally:
            holder.lock.release()
    return _send(holder.loop, factory, holder)


def run_on_thread_loop(factory: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine on the calling thread's persistent loop (no loop runs here)."""
    return _drive(_thread_holder(), factory)


# -- homes --------------------------------------------------------------------------
class _Home:
    """Where a model's asyncio steps run: one loop, and its holder if the loop is ours.

    Kept in the model's own state (``_state``), not in a registry of this module: the
    home then lives exactly as long as the model, and a loop that refers back to the
    model (a task an agent left pending) is garbage the collector can free. Copies and
    unpickled models start without a home (a loop cannot be copied): their first asyncio
    step chooses their own. A home made before a fork is not used in the child.
    """

    __slots__ = ("generation", "holder", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, holder: _LoopHolder | None) -> None:
        self.loop = loop
        self.holder = holder  # keeps a persistent loop open while the model lives
        self.generation = _generation


_HOMELESS: Final = object()

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


def _set_home(model: Any, loop: asyncio.AbstractEventLoop, holder: _LoopHolder | None) -> None:
    if model is None:
        return
    current = _home_of(model)
    if current is not None and current.loop is loop:
        return  # with loop="background", every step: nothing to change
    state = state_of(model)
    if state is not None:  # no __dict__: no home
        state.home = _Home(loop, holder)
        _home_loops.add(loop)


def _run_at_home(
    home: _Home,
    running: asyncio.AbstractEventLoop | None,
    factory: Callable[[], Coroutine[Any, Any, Any]],
) -> Any:
    """Run the step on the model's home loop; ``_HOMELESS`` if that cannot be done."""
    loop = home.loop
    if loop is running:
        if not _may_nest(loop):
            return _HOMELESS
        _check_depth(loop)
        _local.last_path = "running_loop"
        return _run_nested(loop, factory())
    bg = _background
    holder = home.holder
    if bg is not None and loop is bg.loop:
        _local.last_path = "background"
    elif running is None and holder is not None and holder is getattr(_local, "holder", None):
        _local.last_path = "thread_loop"
    else:
        _local.last_path = "home_loop"
    if holder is None:  # a loop that its own thread runs: send the step there
        if not loop.is_running():
            return _HOMELESS  # stopped, and not ours to run
        try:
            remote = _Remote(loop, factory)
        except _LoopGoneError:
            return _HOMELESS
        return remote.wait(None)
    if running is None:
        return _drive(holder, factory)
    # A different loop runs in this thread, and asyncio allows one per thread: a helper
    # thread runs the home loop while this one waits (as it would for a sequential step).
    return _send(loop, factory, holder)


def _check_depth(loop: asyncio.AbstractEventLoop) -> None:
    depth = _nest_depth.get(loop, 0)
    if depth >= MAX_NESTED_STEPS:
        raise NestingTooDeepError(
            f"{depth} blocking steps are already nested on this event loop (at most "
            f"{MAX_NESTED_STEPS}): many callers are waiting on it at once (agents whose "
            "astep calls a blocking shuffle_do, or tasks that each call model.step()). "
            "Await instead: 'await ashuffle_do(agents)' in async code."
        )


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
    running = asyncio._get_running_loop()
    if loop_policy == "auto":
        home = _home_of(model)
        if home is not None:
            loop = home.loop
            if loop is running:
                if _may_nest(loop):
                    return True
            elif home.holder is not None:
                return running is None and not loop.is_running()
            elif loop.is_running():
                return False  # its own thread runs it
    if loop_policy == "background" or (running is not None and not _may_nest(running)):
        bg = _background_loop()
        _set_home(model, bg.loop, None)
        return running is bg.loop and _may_nest(running)
    if running is None:
        holder = _thread_holder()
        _set_home(model, holder.loop, holder)
        return not holder.loop.is_running()
    _set_home(model, running, None)
    return True


def run_coroutine_sync(
    factory: Callable[[], Coroutine[Any, Any, Any]],
    *,
    loop_policy: Literal["auto", "background"] = "auto",
    model: Any = None,
) -> Any:
    """Run the coroutine made by ``factory()`` to completion and return its result.

    With ``model``, the coroutine runs on the model's home loop, which the first call
    for that model chooses (see the module's documentation). The coroutine is created
    only once the loop that runs it has been chosen, so no "coroutine was never
    awaited" warning can arise on any path.
    """
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None

    if loop_policy == "auto" and model is not None:
        home = _home_of(model)
        if home is not None:
            result = _run_at_home(home, running, factory)
            if result is not _HOMELESS:
                return result
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
        # runs on the background loop thread while this thread blocks.
        _local.last_path = "background"
        bg = _background_loop()
        _set_home(model, bg.loop, None)
        if running is bg.loop:  # a blocking step inside an agent on that very loop
            _check_depth(running)
            if not _may_nest(running):
                raise RuntimeError(
                    "cannot run a blocking parallel step on the library's background loop "
                    "thread; use 'await ashuffle_do(...)' from async code"
                )
            return _run_nested(running, factory())
        return bg.run(factory)
    if running is None:
        _local.last_path = "thread_loop"
        holder = _thread_holder()
        _set_home(model, holder.loop, holder)
        return _drive(holder, factory)
    _local.last_path = "running_loop"
    _set_home(model, running, None)
    return _run_nested(running, factory())


def close_loops() -> None:
    """Stop the background loop thread and close every idle persistent loop."""
    global _background
    with _background_lock:
        bg, _background = _background, None
    if bg is not None:
        bg.stop()
    with _holders_lock:
        holders = list(_holders)
    for holder in holders:
        holder.close()


def _reset_after_fork() -> None:
    """In a forked child: forget every loop and thread of the parent.

    Only the thread that forked exists in the child; the background loop thread, the
    persistent loops' owners and any thread that was running a loop do not, and locks
    they held stay held. Everything is made anew on first use; models' homes from before
    the fork are ignored (``_Home.generation``), so their next step chooses a new one.
    """
    global _local, _generation, _holders, _holders_lock, _nest_lock, _nested_loops  # noqa: PLW0603
    global _background, _background_lock, _home_loops  # noqa: PLW0603
    _generation += 1
    _local = threading.local()
    _holders = weakref.WeakSet()
    _holders_lock = threading.Lock()
    _nest_lock = threading.Lock()
    _nested_loops = weakref.WeakSet()
    _background = None
    _background_lock = threading.Lock()
    _home_loops = weakref.WeakSet()


os.register_at_fork(after_in_child=_reset_after_fork)
