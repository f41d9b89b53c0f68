"""Stepping many agents at once, in asyncio mode or in threading mode.

Both modes share one shape. The agents of a step are a list in start order (the
shuffled order for ``shuffle_do``); K runners pull the next position from a shared
counter until the list is exhausted, where K is the number of agents allowed in flight
at once (``max_concurrency``, and the pool size in threading mode). Agents therefore
start in list order, the cap is exact, and the cost per agent is one pull and one call.

* asyncio mode: the runners are coroutines on one event loop. An agent whose class
  defines ``async def a<method>`` is awaited; any other agent's sync method runs in
  the library's thread pool (or inline, with ``run_sync_inline``), so it never blocks
  the loop.
* threading mode: the runners are jobs in the thread pool and call the sync method.
  An agent that only has ``a<method>`` runs it on its worker thread's persistent loop.

Failures never cancel siblings. With ``on_error="raise"`` no new agent starts after a
failure, every started agent finishes, and the first failure in start order is raised;
with ``"collect"`` every agent runs. Each step ends with a :class:`StepReport`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, Final

from mesa_llm_parallel import _recovery as recovery
from mesa_llm_parallel._loops import (
    NestingTooDeepError,
    prepare_home,
    run_coroutine_sync,
    run_on_thread_loop,
)
from mesa_llm_parallel._ordering import Turnstile, current_turn
from mesa_llm_parallel._pool import (
    ResizablePool,
    StuckThreadsError,
    WorkerPool,
    check_stuck_threads,
    is_pool_thread,
    stuck_threads,
)
from mesa_llm_parallel._ratelimit import limiter
from mesa_llm_parallel._report import (
    AgentFailure,
    StepReport,
    run_callbacks,
    store_report,
)
from mesa_llm_parallel._settings import SettingsSnapshot

__all__ = ["Step", "pool", "run_step_async", "run_step_sync"]

logger = logging.getLogger("mesa_llm_parallel")

#: The library's one thread pool.
pool: Final = ResizablePool()

Resolve = Callable[[Any], Any]

# How an agent is called. Kinds are small ints: they are compared once per agent.
_AWAIT: Final = 0  # await getattr(agent, name)(...) on the step's loop
_POOL: Final = 1  # run getattr(agent, name)(...) in the thread pool
_INLINE: Final = 2  # call getattr(agent, name)(...) right here
_ON_THREAD_LOOP: Final = 3  # run the coroutine on the model's home loop (threading mode)
_NOOP: Final = 4  # Mesa's own no-op method: called right here, no user code runs


def _base_method(name: str) -> Any:
    from mesa import Agent

    return getattr(Agent, name, None)


def _identity(entry: Any) -> Any:
    return entry


class _Dispatch:
    """Decides, once per agent class and step, which method runs and where."""

    __slots__ = ("_method", "_sync_kind", "_threading", "decisions")

    def __init__(
        self, method: str | Callable[..., Any], *, threading_mode: bool, sync_kind: int
    ) -> None:
        self._method = method
        self._threading = threading_mode
        self._sync_kind = sync_kind
        #: agent class -> (kind, method name or None for a callable); read directly by
        #: the asyncio runners on their hot path.
        self.decisions: dict[type, tuple[int, str | None]] = {}

    def __call__(self, agent: Any) -> tuple[int, str | None]:
        cls = type(agent)
        found = self.decisions.get(cls)
        if found is None:
            found = self.decisions[cls] = self._decide(cls)
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
            return _NOOP, method  # Mesa's own no-op: nothing worth a thread hop
        return self._sync_kind, method


def _make_call(
    method: str | Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Callable[[Any, str | None], Any]:
    """How to call one agent: ``name`` is the method to use, None for a callable."""

    def call(agent: Any, name: str | None) -> Any:
        if name is None:
            return method(agent, *args, **kwargs)  # type: ignore[operator]
        return getattr(agent, name)(*args, **kwargs)

    return call


def _timeout_error(agent: Any, seconds: float, *, in_thread: bool) -> TimeoutError:
    error = TimeoutError(f"agent {agent!r} did not finish within the {seconds:g} s timeout")
    if in_thread:
        error.add_note(
            "mesa_llm_parallel: its thread cannot be stopped and may still be running; "
            "its turn has passed, so a late 'in_turn' from it raises RuntimeError"
        )
    return error


class Step:
    """The shared state of one parallel step: positions, counters, failures, turns.

    Threading-mode runners call :meth:`claim`, :meth:`lookup`, :meth:`start` and
    :meth:`finish`, which update the counters under :attr:`lock`. The asyncio runners
    all run on one thread and update the counters directly (see
    :func:`run_step_async`), except for failures, which go through :meth:`finish`.
    """

    def __init__(
        self,
        entries: Sequence[Any],
        resolve: Resolve | None,
        method: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        cfg: SettingsSnapshot,
        mode: str,
    ) -> None:
        self.entries = entries
        self.n = len(entries)
        self.resolve = resolve or _identity
        self.method = method
        self.args = args
        self.kwargs = kwargs
        self.call = _make_call(method, args, kwargs)
        self.cfg = cfg
        self.mode = mode
        self.lock = threading.Lock()
        self.turns = Turnstile(self.n)
        self._next = itertools.count().__next__
        self.stop = False
        #: Set with ``stop`` (see :meth:`halt`): wakes runners waiting for a start slot.
        self.halted = threading.Event()
        self._halt_waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        #: The caller's context: every agent runs in a copy of it, in every mode.
        self.context = contextvars.copy_context()
        #: The model whose step this is (None for agents without one).
        self.model: Any = None
        #: An error that ends the whole step once its agents are done (not an agent's).
        self.fatal: BaseException | None = None
        self.started = 0
        self.completed = 0
        self.skipped = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.busy_time = 0.0
        self.failures: list[AgentFailure] = []
        self.started_at = time.perf_counter()
        self.ended_at: float | None = None
        self.interrupted = False
        self.progress = _progress_bar(self.n, mode) if cfg.progress and self.n else None

    # -- stopping -------------------------------------------------------------------
    def halt(self) -> None:
        """Start no more agents; wake every runner that waits for a start slot."""
        self.stop = True
        self.halted.set()
        waiter = self._halt_waiter
        if waiter is not None:
            loop, future = waiter
            if asyncio._get_running_loop() is loop:
                _set_done(future)
            else:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(_set_done, future)

    async def wait_halted(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the step halts meanwhile (on the step's loop)."""
        waiter = self._halt_waiter
        if waiter is None:
            loop = asyncio.get_running_loop()
            waiter = self._halt_waiter = (loop, loop.create_future())
            if self.stop:
                _set_done(waiter[1])
        if not waiter[1].done():
            await asyncio.wait([waiter[1]], timeout=seconds)

    # -- runners ----------------------------------------------------------------------
    def claim(self) -> int | None:
        """The next position to start, or None when no more agents may start.

        With a rate limit, the runner first reserves a start slot and waits for it; only
        then is it decided whether an agent may start. A slot that is not used (the step
        halted meanwhile, or has no agents left) is given back to the limiter.
        """
        rate = self.cfg.rate_limit
        slot = None
        if rate:
            if self.stop:
                return None
            slot, delay = limiter.reserve(rate)
            if delay:
                self.halted.wait(delay)
        with self.lock:
            position = None if self.stop else self._next()
            if position is not None and position >= self.n:
                position = None
        if position is None and slot is not None:
            limiter.give_back(slot, rate)  # type: ignore[arg-type]
        return position

    def lookup(self, position: int) -> Any:
        """The agent at ``position`` if it is still a member; else record the skip, None."""
        agent = self.resolve(self.entries[position])
        if agent is None:
            with self.lock:
                self.skipped += 1
            self.turns.pass_turn(position)
        return agent

    def start(self) -> float:
        """Count one more agent as started and in flight; return its start time."""
        with self.lock:
            self.started += 1
            self.in_flight += 1
            if self.in_flight > self.peak_in_flight:
                self.peak_in_flight = self.in_flight
        return time.perf_counter()

    def finish(
        self,
        position: int,
        agent: Any,
        started: float,
        error: BaseException | None = None,
        *,
        timed_out: bool = False,
    ) -> None:
        """Record the end of the agent at ``position`` and give up its turn.

        An agent that timed out in a thread may still be running: its turn passes all
        the same, so a late ``in_turn`` from it is refused instead of applied late.
        """
        elapsed = time.perf_counter() - started
        halt = False
        with self.lock:
            self.in_flight -= 1
            self.busy_time += elapsed
            if error is None:
                self.completed += 1
            else:
                self.failures.append(AgentFailure(agent, error, position, timed_out))
                halt = self.cfg.on_error == "raise"
            if self.progress is not None:
                self.progress.update(1)
        if halt:
            self.halt()
        self.turns.pass_turn(position)

    # -- the end ----------------------------------------------------------------------
    def report(self) -> StepReport:
        """The step's report (the step must have ended)."""
        end = self.ended_at if self.ended_at is not None else time.perf_counter()
        with self.lock:
            failures = tuple(sorted(self.failures, key=lambda f: f.position))
            return StepReport(
                mode=self.mode,
                agents=self.n,
                started=self.started,
                completed=self.completed,
                skipped=self.skipped,
                failures=failures,
                wall_time=end - self.started_at,
                busy_time=self.busy_time,
                peak_in_flight=self.peak_in_flight,
                pool_size=self.cfg.max_workers,
                max_concurrency=self.cfg.max_concurrency,
                interrupted=self.interrupted,
                stuck_threads=stuck_threads(),
            )

    def close(self, model: Any, *, interrupted: bool = False) -> StepReport:
        """End the step: stop new starts, build and store the report, run callbacks."""
        self.halt()
        with self.lock:
            self.ended_at = time.perf_counter()
            self.interrupted = interrupted
        if self.progress is not None:
            self.progress.close()
        report = self.report()
        if model is not None:
            store_report(model, report)
            run_callbacks(model, report)
        if report.failures and self.cfg.on_error == "collect":
            first = report.failures[0]
            logger.warning(
                "mesa_llm_parallel: %d agent(s) failed in a parallel step (first: %r: %s); "
                "see last_step_report(model).failures",
                len(report.failures),
                first.agent,
                first.exception,
            )
        return report


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _progress_bar(total: int, mode: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"parallel step ({mode})", unit="agent", leave=False)


def raise_failures(report: StepReport) -> None:
    """With ``on_error="raise"``: raise the first failure in start order, as its own type.

    The other failures are attached as ``exception.mesa_llm_parallel_failures`` (all of
    them, first included) and summarised in the exception's notes.
    """
    if not report.failures:
        return
    first = report.failures[0].exception
    if not hasattr(first, "mesa_llm_parallel_failures"):
        first.mesa_llm_parallel_failures = report.failures  # type: ignore[attr-defined]
        others = report.failures[1:]
        if others:
            listed = "; ".join(
                f"{f.agent!r}: {type(f.exception).__name__}: {f.exception}" for f in others[:5]
            )
            more = f"; and {len(others) - 5} more" if len(others) > 5 else ""
            first.add_note(
                f"mesa_llm_parallel: {len(others)} more agent(s) failed in the same parallel "
                f"step: {listed}{more}. All are in exception.mesa_llm_parallel_failures and "
                "last_step_report(model)."
            )
    raise first


# -- asyncio mode -------------------------------------------------------------------
async def run_step_async(step: Step, *, nested: bool | None = None) -> None:
    """Run ``step`` concurrently on the running loop.

    ``nested`` says whether the step was started from one of the library's pool
    workers (default: whether the current thread is one). Sync agents of a nested step
    run inline, in that worker: sending them to the pool could wait forever for a
    worker that is itself waiting for them.
    """
    if step.n == 0:
        return
    if nested is None:
        nested = in_nested_step()
    cfg = step.cfg
    sync_kind = _INLINE if (cfg.run_sync_inline or nested) else _POOL
    dispatch = _Dispatch(step.method, threading_mode=False, sync_kind=sync_kind)
    loop = asyncio.get_running_loop()
    timeout = cfg.timeout
    call = step.call
    lease: Any = None
    executor: WorkerPool | None = None
    # Sync agents start only when a pool worker is free for them: waiting in the pool's
    # queue would count as running (for timeouts and the report) and would skip the
    # membership check that Mesa makes right before stepping an agent.
    workers: asyncio.Semaphore | None = None

    # The runners share this thread, so they update the step's counters directly,
    # without the lock and the method calls that threading mode needs: this loop is
    # the hot path of a step of many fast agents.
    next_position = step._next
    entries, resolve, n = step.entries, step.resolve, step.n
    pass_turn = step.turns.pass_turn
    turns = step.turns
    rate = cfg.rate_limit
    progress = step.progress
    perf_counter = time.perf_counter
    set_turn, reset_turn = current_turn.set, current_turn.reset
    decisions = dispatch.decisions
    args, kwargs = step.args, step.kwargs

    async def runner() -> None:
        nonlocal lease, executor, workers
        while not step.stop:
            if rate:
                # The slot first, then the decision: an agent starts only if the step
                # still runs once its slot has come; an unused slot is given back.
                slot, delay = limiter.reserve(rate)
                try:
                    if delay:
                        await step.wait_halted(delay)
                except BaseException:
                    limiter.give_back(slot, rate)
                    raise
                position = n if step.stop else next_position()
                if position >= n:
                    limiter.give_back(slot, rate)
                    return
            else:
                position = next_position()
                if position >= n:
                    return
            agent = resolve(entries[position])
            if agent is None:
                step.skipped += 1
                pass_turn(position)
                continue
            decided = decisions.get(type(agent))
            if decided is None:
                try:
                    decided = dispatch(agent)
                except Exception as exc:  # no such method on this agent
                    step.finish(position, agent, step.start(), exc)
                    continue
            kind, name = decided
            if kind == _POOL:
                if workers is None:
                    try:
                        check_stuck_threads(cfg.max_workers)
                    except StuckThreadsError as stuck:  # no thread for it: nothing more starts
                        step.fatal = stuck
                        step.halt()
                        pass_turn(position)
                        return
                    workers = asyncio.Semaphore(cfg.max_workers)
                    lease = pool.lease(cfg.max_workers)
                    executor = lease.__enter__()
                await workers.acquire()
                if step.stop:  # the step stopped while this agent waited for a worker
                    workers.release()
                    pass_turn(position)
                    return
                agent = resolve(entries[position])  # removed while waiting for a worker?
                if agent is None:
                    workers.release()
                    step.skipped += 1
                    pass_turn(position)
                    continue
            step.started += 1
            step.in_flight += 1
            if step.in_flight > step.peak_in_flight:
                step.peak_in_flight = step.in_flight
            turn = set_turn((turns, position, agent))
            deadline = None
            worker: _WorkerSlot | None = None
            job: concurrent.futures.Future[None] | None = None
            started = perf_counter()
            try:
                if kind == _AWAIT:
                    awaitable: Any = (
                        getattr(agent, name)(*args, **kwargs) if name else call(agent, name)
                    )
                elif kind == _POOL:
                    worker = _WorkerSlot(workers, loop)  # type: ignore[arg-type]
                    # The job runs in a copy of this context: the caller's context
                    # variables, and in_turn, work there too.
                    job = executor.submit(  # type: ignore[union-attr]
                        functools.partial(contextvars.copy_context().run, call, agent, name)
                    )
                    awaitable = asyncio.wrap_future(job)
                    # If this step stops waiting (timeout, interrupt), the worker is
                    # released when its thread really returns.
                    job.add_done_callback(worker.release_from_thread)
                elif kind == _NOOP:
                    awaitable = None
                    call(agent, name)
                else:  # inline user code, in its own copy of the context, as in a thread
                    awaitable = None
                    contextvars.copy_context().run(call, agent, name)
                if awaitable is None:
                    pass
                elif timeout is None:
                    await awaitable
                else:
                    async with asyncio.timeout(timeout) as deadline:
                        await awaitable
            except Exception as exc:
                if deadline is not None and deadline.expired():
                    in_thread = kind == _POOL
                    error = _timeout_error(agent, timeout, in_thread=in_thread)  # type: ignore[arg-type]
                    error.__cause__ = exc
                    if in_thread and job.cancel():  # type: ignore[union-attr]
                        # Still queued (another step held the pool's threads): it never
                        # runs now, and its worker slot is free again.
                        worker.release()  # type: ignore[union-attr]
                    elif in_thread and not job.done():  # type: ignore[union-attr]
                        # Its thread cannot be stopped: the pool gives up on it and the
                        # step gets its worker back at once (a spare thread takes over).
                        try:
                            abandoned = executor.abandon(job, repr(agent), cfg.max_workers)  # type: ignore[union-attr, arg-type]
                        except StuckThreadsError as stuck:
                            abandoned = True
                            step.fatal = stuck
                            step.halt()
                        if abandoned:
                            worker.release()  # type: ignore[union-attr]
                    step.finish(position, agent, started, error, timed_out=True)
                else:
                    step.finish(position, agent, started, exc)
            else:  # Step.finish for a success, inlined
                step.in_flight -= 1
                step.busy_time += perf_counter() - started
                step.completed += 1
                if progress is not None:
                    progress.update(1)
                pass_turn(position)
            finally:
                try:  # noqa: SIM105 - the hot path: no context manager
                    reset_turn(turn)
                except ValueError:  # closed outside its task (destroyed while pending)
                    pass
                if worker is not None and job is not None and job.done():
                    worker.release()  # after finish(): the count of agents in flight is exact

    heartbeat = None
    if threading.current_thread() is threading.main_thread():
        heartbeat = loop.create_task(_heartbeat())
    try:
        k = min(step.n, cfg.max_concurrency or step.n)
        if k == 1:
            await runner()
        else:
            await _run_all(loop, runner, k)
    except BaseException:
        if workers is not None and step.in_flight:
            pool.replace()  # sync agents still running keep their workers; do not wait on them
        raise
    finally:
        if heartbeat is not None:
            heartbeat.cancel()
        step.halt()
        if lease is not None:
            lease.__exit__(None, None, None)


async def _run_all(
    loop: asyncio.AbstractEventLoop, runner: Callable[[], Coroutine[Any, Any, None]], k: int
) -> None:
    """Run ``k`` runners as tasks and wait for all of them.

    What ``asyncio.gather`` does, minus its per-task bookkeeping (the runners catch
    their agents' exceptions and return nothing): one shared counter and one future.
    If the wait is cancelled or a runner raises (an interrupt), every runner is
    cancelled and awaited before the exception propagates.
    """
    remaining = k
    all_done = loop.create_future()

    def one_done(task: asyncio.Task[None]) -> None:
        nonlocal remaining
        remaining -= 1
        if all_done.done():
            return
        if not task.cancelled() and task.exception() is not None:
            all_done.set_exception(task.exception())  # type: ignore[arg-type]
        elif remaining == 0:
            all_done.set_result(None)

    tasks = [loop.create_task(runner()) for _ in range(k)]
    for task in tasks:
        task.add_done_callback(one_done)
    try:
        await all_done
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        raise


async def _heartbeat() -> None:
    """Wake the main thread's loop now and then, so that it notices Ctrl-C promptly.

    A process-directed SIGINT may land on a pool worker; the main thread's loop, asleep
    in ``select`` until its next timer, would raise KeyboardInterrupt only then.
    """
    while True:  # noqa: ASYNC110 - a timer, not a wait for a condition
        await asyncio.sleep(_SIGNAL_CHECK_INTERVAL)


class _WorkerSlot:
    """One sync agent's claim on a pool worker in asyncio mode, released exactly once."""

    __slots__ = ("_loop", "_semaphore")

    def __init__(self, semaphore: asyncio.Semaphore, loop: asyncio.AbstractEventLoop) -> None:
        self._semaphore: asyncio.Semaphore | None = semaphore
        self._loop = loop

    def release(self) -> None:
        semaphore, self._semaphore = self._semaphore, None
        if semaphore is not None:
            semaphore.release()

    def release_from_thread(self, _: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop may be closed by then
            self._loop.call_soon_threadsafe(self.release)


# -- threading mode -----------------------------------------------------------------
class _Runner:
    """One threading-mode runner: which agent it runs now, and whether it was abandoned."""

    __slots__ = ("abandoned", "agent", "on_loop", "position", "started")

    def __init__(self) -> None:
        self.abandoned = False
        self.agent: Any = None
        self.on_loop = False  # the agent runs on the home loop, which enforces its timeout
        self.position = -1
        self.started = 0.0


#: How long after an async agent's own timeout (enforced on its loop) the step gives
#: up on the thread that waits for it, in seconds: only if that loop is blocked.
_LOOP_TIMEOUT_GRACE: Final = 1.0


def _run_threaded_runner(step: Step, me: _Runner, dispatch: _Dispatch) -> None:
    context = step.context
    while not me.abandoned and (position := step.claim()) is not None:
        agent = step.lookup(position)
        if agent is None:
            continue
        started = step.start()
        # Each agent in a fresh copy of the caller's context, as asyncio.to_thread does:
        # what one agent sets there is not seen by the next one of this runner.
        error, timed_out = context.copy().run(
            _run_threaded_agent, step, me, dispatch, position, agent, started
        )
        with step.lock:
            abandoned = me.abandoned
            me.agent = None
        if abandoned:  # the caller already reported it as timed out and moved on
            return
        step.finish(position, agent, started, error, timed_out=timed_out)
        del agent


def _run_threaded_agent(
    step: Step, me: _Runner, dispatch: _Dispatch, position: int, agent: Any, started: float
) -> tuple[BaseException | None, bool]:
    """Run one agent in a threading-mode runner; return (its error or None, timed out)."""
    timeout = step.cfg.timeout
    current_turn.set((step.turns, position, agent))  # in this agent's own context
    try:
        kind, name = dispatch(agent)
        with step.lock:
            me.agent, me.position, me.started = agent, position, started
            me.on_loop = kind == _ON_THREAD_LOOP
        result = step.call(agent, name)
        if kind == _ON_THREAD_LOOP and _run_on_home_loop(step, result, timeout):
            return _timeout_error(agent, timeout, in_thread=False), True  # type: ignore[arg-type]
    except Exception as exc:
        return exc, False
    return None, False


#: Set while an async-only agent of a threading-mode step runs on the home loop: its
#: pool thread waits for it, so a step it starts must not wait for pool threads.
holding_worker: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "mesa_llm_parallel_holding_worker", default=False
)


def in_nested_step() -> bool:
    """Whether a step started here runs inside an agent that holds a pool thread.

    A pool worker itself, or an async-only agent of a threading-mode step (its worker
    waits for it). Such a step must not wait for pool threads: they may all be held by
    agents waiting for it.
    """
    return is_pool_thread() or holding_worker.get()


def _run_on_home_loop(step: Step, coro: Any, timeout: float | None) -> bool:
    """Run an async-only agent's coroutine on its model's home loop; True if it timed out.

    The home loop is the one the model's asyncio-mode steps use, so what the agent
    creates there (an async HTTP client's connections, locks) works in both modes. An
    agent without a model runs on this worker thread's own persistent loop.
    """

    async def bounded() -> bool:
        holding_worker.set(True)  # in this coroutine's own task context
        if timeout is None:
            await coro
            return False
        try:
            async with asyncio.timeout(timeout) as deadline:
                await coro
        except TimeoutError:
            if deadline.expired():  # ours, not the agent's own TimeoutError
                return True
            raise
        return False

    try:
        if step.model is not None:
            return run_coroutine_sync(bounded, loop_policy=step.cfg.loop, model=step.model)
        if asyncio._get_running_loop() is None:
            return run_on_thread_loop(bounded)
        return run_coroutine_sync(bounded)  # an async-only agent in a worker running a loop
    finally:
        if inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
            coro.close()  # refused before it ran: no "coroutine was never awaited"


def run_step_threaded(step: Step) -> None:
    """Run ``step`` in the thread pool.

    The calling thread waits for the runners. When the model's home loop is one this
    thread must keep running (see ``_loops.prepare_home``), it waits by running that
    loop, so that async-only agents sent there from the pool's threads can run.
    """
    if step.n == 0:
        return
    cfg = step.cfg
    dispatch = _Dispatch(step.method, threading_mode=True, sync_kind=_INLINE)
    if in_nested_step():
        # A step started from inside an agent that holds a pool thread (an agent
        # stepping its sub-agents) runs right here: waiting for free workers could
        # deadlock once such agents hold them all.
        _run_threaded_runner(step, _Runner(), dispatch)
        return

    try:
        check_stuck_threads(cfg.max_workers)
    except StuckThreadsError as stuck:  # raised once the step is closed: no agent starts
        step.fatal = stuck
        return
    drive_home = step.model is not None and prepare_home(step.model, cfg.loop)
    k = min(step.n, cfg.max_concurrency or step.n, cfg.max_workers)
    with pool.lease(cfg.max_workers) as executor:
        running: dict[concurrent.futures.Future[None], _Runner] = {}

        def start_runner() -> concurrent.futures.Future[None]:
            runner = _Runner()
            # Each agent runs in its own copy of the caller's context (see the runner).
            job = functools.partial(_run_threaded_runner, step, runner, dispatch)
            future = executor.submit(job)
            running[future] = runner
            return future

        waiting = _Waiting(step, running, executor, start_runner, k)
        try:
            if drive_home:
                run_coroutine_sync(waiting.wait_async, loop_policy=cfg.loop, model=step.model)
            else:
                waiting.wait()
        except BaseException:
            step.halt()
            if any(not future.done() for future in running):
                pool.replace()  # agents still running keep their workers; do not wait on them
            raise
        finally:
            waiting.release()
    for future, runner in running.items():
        if future.done() and not runner.abandoned:
            future.result()  # only a BaseException escaping a runner can land here


#: Longest uninterrupted block of a waiting thread, in seconds. A process-directed
#: SIGINT (Ctrl-C, a Jupyter interrupt) may be delivered to any thread; the waiting
#: thread notices it only when it next runs Python code.
_SIGNAL_CHECK_INTERVAL: Final = 0.1


class _Waiting:
    """The caller's wait for a threading-mode step's runners, with timeouts.

    A runner whose agent overruns ``timeout`` is abandoned: the agent is reported as
    timed out, the pool gives up its thread (which no longer counts as a worker and
    exits when the call returns) and a new runner takes over, so the step and later
    steps never wait for a stuck call.

    The runners' completions are counted as they happen (in the workers' threads); the
    waiting side is woken once, when none is left, or when the next deadline is due.
    """

    def __init__(
        self,
        step: Step,
        running: dict[concurrent.futures.Future[None], _Runner],
        executor: WorkerPool,
        start_runner: Callable[[], concurrent.futures.Future[None]],
        k: int,
    ) -> None:
        self.step = step
        self.running = running
        self.executor = executor
        self.start_runner = start_runner
        self.k = k
        self.timeout = step.cfg.timeout
        self._lock = threading.Lock()
        self.pending: set[Any] = set()
        self.all_done = threading.Event()
        self._wake: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    def release(self) -> None:
        """Let go of the step (a runner's future keeps this object a little longer)."""
        self.step = None  # type: ignore[assignment]
        self.running = {}
        self.executor = None  # type: ignore[assignment]
        self.start_runner = None  # type: ignore[assignment]

    def _add_runner(self) -> None:
        future = self.start_runner()
        with self._lock:
            self.pending.add(future)
        future.add_done_callback(self._runner_done)

    def _runner_done(self, future: concurrent.futures.Future[None]) -> None:
        self._drop(future)

    def _drop(self, future: object) -> None:
        with self._lock:
            self.pending.discard(future)
            if self.pending:
                return
            self.all_done.set()
            wake = self._wake
        if wake is not None:
            loop, waiter = wake
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_set_done, waiter)

    def _start(self) -> None:
        # Started by the waiting side itself: when it waits on a loop, only once that
        # loop runs (what the runners send there must not be queued before the wait).
        # The token keeps the count above zero until every runner has been added.
        token = object()
        with self._lock:
            self.pending.add(token)
        for _ in range(self.k):
            self._add_runner()
        self._drop(token)

    def _next_wait(self) -> float:
        wait_for = _SIGNAL_CHECK_INTERVAL
        if self.timeout is not None:
            with self.step.lock:
                deadlines = [
                    self._deadline(r) for r in self.running.values() if r.agent is not None
                ]
            if deadlines:
                wait_for = min(wait_for, max(0.0, min(deadlines) - time.perf_counter()))
        return wait_for

    def _deadline(self, runner: _Runner) -> float:
        grace = _LOOP_TIMEOUT_GRACE if runner.on_loop else 0.0
        return runner.started + self.timeout + grace  # type: ignore[operator]

    def _check(self) -> None:
        """Abandon runners whose agent is overdue and start their replacements."""
        if self.timeout is None:
            return
        step = self.step
        now = time.perf_counter()
        overdue: list[tuple[concurrent.futures.Future[None], Any, int, float]] = []
        with step.lock:
            for future, runner in list(self.running.items()):
                agent = runner.agent
                if agent is not None and not runner.abandoned and now >= self._deadline(runner):
                    runner.abandoned = True
                    runner.agent = None
                    overdue.append((future, agent, runner.position, runner.started))
        for future, agent, position, started in overdue:
            error = _timeout_error(agent, self.timeout, in_thread=True)
            try:
                self.executor.abandon(future, repr(agent), step.cfg.max_workers)
            except StuckThreadsError as stuck:
                step.fatal = stuck
                step.halt()
            step.finish(position, agent, started, error, timed_out=True)
            if not step.stop:
                self._add_runner()  # before the drop: the step is never "all done" between
            self._drop(future)

    def wait(self) -> None:
        """Wait here, in short slices (a Ctrl-C is noticed between them)."""
        self._start()
        while not self.all_done.wait(self._next_wait()):
            self._check()

    async def wait_async(self) -> None:
        """Wait on the running loop, which meanwhile runs whatever is sent to it."""
        loop = asyncio.get_running_loop()
        heartbeat = None
        if threading.current_thread() is threading.main_thread():
            heartbeat = loop.create_task(_heartbeat())  # keeps Ctrl-C prompt meanwhile
        waiter = loop.create_future()
        self._wake = (loop, waiter)
        try:
            self._start()
            if self.all_done.is_set():
                return
            while not waiter.done():
                if self.timeout is None:
                    await waiter
                else:
                    await asyncio.wait([waiter], timeout=self._next_wait())
                    self._check()
        finally:
            if heartbeat is not None:
                heartbeat.cancel()


# -- from synchronous code ----------------------------------------------------------
@contextlib.contextmanager
def _step_scope(step: Step, model: Any) -> Iterator[None]:
    """Close ``step`` however it ends, and keep ``model`` stepping if anything escapes.

    On normal exit the report is stored and, with ``on_error="raise"``, the first
    failure is raised; on an exception (an interrupt, a cancellation) the report is
    marked interrupted. Either way an escaping exception prepares the model to step
    again (see :mod:`mesa_llm_parallel._recovery`).
    """
    # Armed before the step, not only when it raises: a copy of the model taken while
    # the step runs (in another thread) then carries the resume event too, and resumes.
    recovery.arm(model)
    try:
        try:
            yield
        except BaseException:
            step.close(model, interrupted=True)
            raise
        report = step.close(model)
        if step.fatal is not None:
            raise step.fatal
        if step.cfg.on_error == "raise":
            raise_failures(report)
    except BaseException:
        recovery.arm(model)  # (already armed unless the model changed its schedule)
        raise


def run_step_sync(step: Step, model: Any) -> None:
    """Run ``step`` from synchronous code in its mode, then close it (see _step_scope)."""
    step.model = model
    with _step_scope(step, model):
        if step.mode == "threading":
            run_step_threaded(step)
        else:
            # Decided here, in the calling thread: the step itself may run on another
            # thread's loop (the background loop), where the answer would be wrong.
            nested = in_nested_step()
            try:
                run_coroutine_sync(
                    lambda: run_step_async(step, nested=nested),
                    loop_policy=step.cfg.loop,
                    model=model,
                )
            except NestingTooDeepError:
                if step.started or step.skipped:
                    raise
                # Refused before anything ran: too many blocking steps already wait on
                # this loop. Run this one right here, without a loop: sync methods one
                # after another; an async-only agent here fails with that error.
                dispatch = _Dispatch(step.method, threading_mode=True, sync_kind=_INLINE)
                _run_threaded_runner(step, _Runner(), dispatch)


async def run_step_in_loop(step: Step, model: Any) -> None:
    """Run ``step`` on the running loop (nothing nested), then close it."""
    step.model = model
    with _step_scope(step, model):
        await run_step_async(step)


def model_of(agents: Sequence[Any]) -> Any:
    """The model of the first agent that has one, or None."""
    for agent in agents:
        model = getattr(agent, "model", None)
        if model is not None:
            return model
    return None
