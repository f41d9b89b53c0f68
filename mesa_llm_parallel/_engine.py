"""Stepping many agents at once, in asyncio mode or in threading mode.

Both modes share one shape. The agents of a step are a list in start order (the
shuffled order for ``shuffle_do``); K runners pull the next index from a shared counter
until the list is exhausted, where K is the number of agents allowed in flight at once
(``max_concurrency``, and the pool size in threading mode). Agents therefore start in
list order, the cap is exact, and the cost per agent is one pull and one call.

* asyncio mode: the runners are coroutines on one event loop. An agent whose class
  defines ``async def a<method>`` is awaited; any other agent's sync method runs in
  the library's thread pool (or inline, with ``run_sync_inline``), so it never blocks
  the loop.
* threading mode: the runners are jobs in the thread pool and call the sync method.
  An agent that only has ``a<method>`` runs it on its worker thread's persistent loop.

An agent's exception does not cancel its siblings: every agent already started
finishes, no new agent starts, and the first failure in start order is raised.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import itertools
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from mesa_llm_parallel._loops import _run_until_complete, run_coroutine_sync, thread_loop
from mesa_llm_parallel._pool import ResizablePool, is_pool_thread
from mesa_llm_parallel._settings import SettingsSnapshot

__all__ = ["pool", "run_step_async", "run_step_sync"]

#: The library's one thread pool.
pool: Final = ResizablePool()

Resolve = Callable[[Any], Any]

# How an agent is called. Kinds are small ints: they are compared once per agent.
_AWAIT: Final = 0  # await getattr(agent, name)(...) on the step's loop
_POOL: Final = 1  # run getattr(agent, name)(...) in the thread pool
_INLINE: Final = 2  # call getattr(agent, name)(...) right here
_ON_THREAD_LOOP: Final = 3  # run the coroutine on this thread's persistent loop


def _base_method(name: str) -> Any:
    from mesa import Agent

    return getattr(Agent, name, None)


def _identity(entry: Any) -> Any:
    return entry


class _Dispatch:
    """Decides, once per agent class and step, which method runs and where."""

    __slots__ = ("_cache", "_method", "_sync_kind", "_threading")

    def __init__(self, method: str | Callable[..., Any], *, threading_mode: bool, sync_kind: int):
        self._method = method
        self._threading = threading_mode
        self._sync_kind = sync_kind
        self._cache: dict[type, tuple[int, str | None]] = {}

    def __call__(self, agent: Any) -> tuple[int, str | None]:
        cls = type(agent)
        found = self._cache.get(cls)
        if found is None:
            found = self._cache[cls] = self._decide(cls)
        return found

    def _decide(self, cls: type) -> tuple[int, str | None]:
        method = self._method
        async_kind = _ON_THREAD_LOOP if self._threading else _AWAIT
        if not isinstance(method, str):
            return (async_kind if inspect.iscoroutinefunction(method) else self._sync_kind), None
        sync = getattr(cls, method, None)
        async_name = "a" + method
        has_async = inspect.iscoroutinefunction(getattr(cls, async_name, None))
        if sync is None and not has_async:
            raise AttributeError(f"{cls.__name__!r} object has no attribute {method!r}")
        if inspect.iscoroutinefunction(sync):
            return async_kind, method
        base = _base_method(method)
        overridden = sync is not None and sync is not base
        if has_async and (not self._threading or not overridden):
            return async_kind, async_name
        if not overridden:
            return _INLINE, method  # Mesa's own no-op: nothing worth a thread hop
        return self._sync_kind, method


class StepOutcome:
    """What happened in one parallel step (counts only; no references to agents)."""

    __slots__ = ("completed", "failures", "in_flight", "peak_in_flight", "skipped", "started")

    def __init__(self) -> None:
        self.started = 0
        self.completed = 0
        self.skipped = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.failures: list[tuple[int, BaseException]] = []

    def raise_first_failure(self) -> None:
        """Raise the failure of the earliest-started failing agent, as its own type."""
        if not self.failures:
            return
        self.failures.sort(key=lambda item: item[0])
        first = self.failures[0][1]
        others = len(self.failures) - 1
        if others:
            first.add_note(
                f"mesa_llm_parallel: {others} more agent(s) failed in the same parallel step; "
                "every agent that had started was allowed to finish"
            )
        self.failures = []
        raise first


def _make_call(
    method: str | Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Callable[[Any, str | None], Any]:
    """How to call one agent: ``name`` is the method to use, None for a callable."""

    def call(agent: Any, name: str | None) -> Any:
        if name is None:
            return method(agent, *args, **kwargs)  # type: ignore[operator]
        return getattr(agent, name)(*args, **kwargs)

    return call


def _runner_count(n: int, cap: int | None, *more_caps: int) -> int:
    return min(n, cap or n, *more_caps)


# -- asyncio mode -------------------------------------------------------------------
async def run_step_async(
    entries: Sequence[Any],
    resolve: Resolve | None,
    method: str | Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    cfg: SettingsSnapshot,
    *,
    nested: bool | None = None,
) -> StepOutcome:
    """Step ``entries`` concurrently on the running loop; return what happened.

    ``nested`` says whether the step was started from one of the library's pool
    workers (default: whether the current thread is one). Sync agents of a nested step
    run inline, in that worker: sending them to the pool could wait forever for a
    worker that is itself waiting for them.
    """
    outcome = StepOutcome()
    n = len(entries)
    if n == 0:
        return outcome
    resolve = resolve or _identity
    if nested is None:
        nested = is_pool_thread()
    sync_kind = _INLINE if (cfg.run_sync_inline or nested) else _POOL
    dispatch = _Dispatch(method, threading_mode=False, sync_kind=sync_kind)
    next_index = itertools.count().__next__
    loop = asyncio.get_running_loop()
    lease = None
    executor: concurrent.futures.Executor | None = None
    stop = False

    call = _make_call(method, args, kwargs)

    async def runner() -> None:
        nonlocal stop, executor, lease
        while not stop:
            index = next_index()
            if index >= n:
                return
            agent = resolve(entries[index])
            if agent is None:
                outcome.skipped += 1
                continue
            outcome.started += 1
            outcome.in_flight += 1
            if outcome.in_flight > outcome.peak_in_flight:
                outcome.peak_in_flight = outcome.in_flight
            try:
                kind, name = dispatch(agent)
                if kind == _AWAIT:
                    await call(agent, name)
                elif kind == _POOL:
                    if executor is None:
                        lease = pool.lease(cfg.max_workers)
                        executor = lease.__enter__()
                    await loop.run_in_executor(
                        executor, _OneShot(functools.partial(call, agent, name))
                    )
                else:
                    call(agent, name)
                outcome.completed += 1
            except Exception as exc:
                outcome.failures.append((index, exc))
                stop = True
            finally:
                outcome.in_flight -= 1

    try:
        k = _runner_count(n, cfg.max_concurrency)
        if k == 1:
            await runner()
        else:
            await asyncio.gather(*[runner() for _ in range(k)])
    except BaseException:
        stop = True
        raise
    finally:
        if lease is not None:
            lease.__exit__(None, None, None)
    return outcome


class _OneShot:
    """A pool job that lets go of what it runs before the pool learns it is done.

    A ``ThreadPoolExecutor`` worker still holds its work item for a moment after the
    caller has been told the result; a job holding an agent would keep the model alive
    past ``del model`` until then. This one drops its references first, and returns
    nothing, so the work item never refers to an agent or a model.
    """

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn: Callable[[], Any] | None = fn

    def __call__(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


# -- threading mode -----------------------------------------------------------------
def run_step_threaded(
    entries: Sequence[Any],
    resolve: Resolve | None,
    method: str | Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    cfg: SettingsSnapshot,
) -> StepOutcome:
    """Step ``entries`` in the thread pool; return what happened."""
    outcome = StepOutcome()
    n = len(entries)
    if n == 0:
        return outcome
    resolve = resolve or _identity
    dispatch = _Dispatch(method, threading_mode=True, sync_kind=_INLINE)
    call = _make_call(method, args, kwargs)
    next_index = itertools.count().__next__
    lock = threading.Lock()
    stop = False

    def runner() -> None:
        nonlocal stop
        while not stop:
            index = next_index()
            if index >= n:
                return
            agent = resolve(entries[index])
            if agent is None:
                with lock:
                    outcome.skipped += 1
                continue
            with lock:
                outcome.started += 1
                outcome.in_flight += 1
                if outcome.in_flight > outcome.peak_in_flight:
                    outcome.peak_in_flight = outcome.in_flight
            try:
                kind, name = dispatch(agent)
                result = call(agent, name)
                if kind == _ON_THREAD_LOOP:
                    _run_on_thread_loop(result)
                with lock:
                    outcome.completed += 1
            except Exception as exc:
                with lock:
                    outcome.failures.append((index, exc))
                stop = True
            finally:
                with lock:
                    outcome.in_flight -= 1
            del agent

    if is_pool_thread():
        # A step started from inside one of our own workers (an agent stepping its
        # sub-agents) runs in that worker: waiting for free workers could deadlock.
        runner()
        return outcome

    k = _runner_count(n, cfg.max_concurrency, cfg.max_workers)
    with pool.lease(cfg.max_workers) as executor:
        futures = [executor.submit(_OneShot(runner)) for _ in range(k)]
        try:
            done, _ = concurrent.futures.wait(futures)
        except BaseException:
            stop = True
            raise
    for future in done:
        future.result()  # only a BaseException escaping a runner can land here
    return outcome


def _run_on_thread_loop(coro: Any) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        _run_until_complete(thread_loop(), coro)
    else:  # an async-only agent in a worker that already runs a loop
        run_coroutine_sync(lambda: coro)


# -- from synchronous code ----------------------------------------------------------
def run_step_sync(
    entries: Sequence[Any],
    resolve: Resolve | None,
    method: str | Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    cfg: SettingsSnapshot,
    *,
    mode: str | None = None,
) -> StepOutcome:
    """Run one parallel step from synchronous code in ``mode`` (default: the setting)."""
    if (mode or cfg.mode) == "threading":
        outcome = run_step_threaded(entries, resolve, method, args, kwargs, cfg)
    else:
        # Decided here, in the calling thread: the step itself may run on another
        # thread's loop (the background loop), where the answer would be wrong.
        nested = is_pool_thread()
        outcome = run_coroutine_sync(
            lambda: run_step_async(entries, resolve, method, args, kwargs, cfg, nested=nested),
            loop_policy=cfg.loop,
        )
    outcome.raise_first_failure()
    return outcome


def as_entries(agents: Iterable[Any]) -> list[Any]:
    """A list of the agents of any iterable, in its own order."""
    return list(agents)
