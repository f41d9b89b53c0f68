"""Run a coroutine to completion from synchronous code, wherever that code runs.

A Mesa ``model.step()`` is synchronous, but in asyncio mode it must await many agent
coroutines. Three situations need three answers:

* No event loop runs in the calling thread (a script, a test, a Solara play thread, a
  pool worker): the thread gets ONE persistent loop, created on first use and reused
  for every later step, so async clients and asyncio primitives that agents create in
  one step still work in the next. ``asyncio.run`` is never used: it would create and
  close a loop each time.
* A loop is running in the calling thread (a Jupyter cell, a Solara button handler):
  that loop is reused through ``nest_asyncio2``, which is applied lazily, once, only
  when this situation first occurs, and logged.
* The running loop cannot be patched (uvloop), or the ``loop`` setting is
  ``"background"``: the coroutine runs on a library-owned loop in a daemon thread, and
  the caller blocks until it is done.

If the caller is interrupted (``KeyboardInterrupt``) or fails while waiting, the
coroutine is cancelled and given the chance to unwind before the exception propagates,
so no task is left pending on a loop that will be reused.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Final, Literal

__all__ = ["close_loops", "last_loop_path", "run_coroutine_sync", "thread_loop"]

logger = logging.getLogger("mesa_llm_parallel")

LoopPath = Literal["thread_loop", "running_loop", "background"]

#: How long a cancelled coroutine may take to unwind after an interrupt, in seconds.
_UNWIND_TIMEOUT: Final = 5.0

_local = threading.local()


def _new_loop() -> asyncio.AbstractEventLoop:
    """A new event loop, made in an empty context.

    A loop registers its wake-up reader when it is made, and that callback keeps a copy
    of the context it was made in for the loop's whole life. Loops are often first
    needed inside an agent's step, whose context refers to the agent (and so to its
    model): made there, the persistent loop would keep the model alive forever.
    """
    return contextvars.Context().run(asyncio.new_event_loop)


class _LoopHolder:
    """Owns one thread's persistent loop and closes it when the thread is gone."""

    __slots__ = ("__weakref__", "loop")

    def __init__(self) -> None:
        self.loop = _new_loop()

    def close(self) -> None:
        loop = self.loop
        if loop.is_closed() or loop.is_running():
            return
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def __del__(self) -> None:  # the thread ended and dropped its thread-local holder
        loop = self.loop
        if not loop.is_closed() and not loop.is_running():
            loop.close()


_holders: weakref.WeakSet[_LoopHolder] = weakref.WeakSet()
_holders_lock = threading.Lock()


def thread_loop() -> asyncio.AbstractEventLoop:
    """Return the calling thread's persistent event loop, creating it on first use."""
    holder: _LoopHolder | None = getattr(_local, "holder", None)
    if holder is None or holder.loop.is_closed():
        holder = _LoopHolder()
        _local.holder = holder
        with _holders_lock:
            _holders.add(holder)
    return holder.loop


def last_loop_path() -> LoopPath | None:
    """Which way the calling thread's most recent asyncio step ran, or None.

    ``"thread_loop"``: the thread's own persistent loop; ``"running_loop"``: the loop
    already running in the thread (reused through nest-asyncio2); ``"background"``: the
    library's background loop thread.
    """
    return getattr(_local, "last_path", None)


# -- reusing a running loop ---------------------------------------------------------
_nest_lock = threading.Lock()
_nested_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
_unpatchable_types: set[type] = set()


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
            nest_asyncio2.apply(loop)
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

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            # In short waits: a Ctrl-C delivered to another thread is noticed by this
            # one only when it runs Python code again.
            while True:
                try:
                    return future.result(timeout=0.1)
                except concurrent.futures.TimeoutError:
                    continue
        except BaseException:
            if not future.done():
                future.cancel()
                concurrent.futures.wait([future], timeout=_UNWIND_TIMEOUT)
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=_UNWIND_TIMEOUT)
        if not self.thread.is_alive():
            self.loop.close()


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
    return bg


# -- running ------------------------------------------------------------------------
def _run_until_complete(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> Any:
    task = loop.create_task(coro)
    try:
        return loop.run_until_complete(task)
    except BaseException:
        if not task.done():
            task.cancel()
            # A second interrupt while unwinding is dropped: the first one is reported.
            with contextlib.suppress(BaseException):
                loop.run_until_complete(asyncio.wait([task], timeout=_UNWIND_TIMEOUT))
        raise


def run_coroutine_sync(
    factory: Callable[[], Coroutine[Any, Any, Any]],
    *,
    loop_policy: Literal["auto", "background"] = "auto",
) -> Any:
    """Run the coroutine made by ``factory()`` to completion and return its result.

    The coroutine is created only once the loop that runs it has been chosen, so no
    "coroutine was never awaited" warning can arise on any path.
    """
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None

    if loop_policy == "background" or (running is not None and not _can_reuse(running)):
        if _background is not None and threading.current_thread() is _background.thread:
            raise RuntimeError(
                "cannot run a blocking parallel step on the library's own background loop "
                "thread; use 'await ashuffle_do(...)' or 'await step_agents_parallel(...)' "
                "from async code"
            )
        _local.last_path = "background"
        return _background_loop().run(factory())
    if running is None:
        _local.last_path = "thread_loop"
        return _run_until_complete(thread_loop(), factory())
    _local.last_path = "running_loop"
    return _run_until_complete(running, factory())


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
