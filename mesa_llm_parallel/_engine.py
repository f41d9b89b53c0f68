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

import array
import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, Final

from mesa_llm_parallel import _placement as placement
from mesa_llm_parallel import _recovery as recovery
from mesa_llm_parallel._collector import scaled_collector
from mesa_llm_parallel._loops import (
    NestingTooDeepError,
    last_stalled_time,
    prepare_home,
    run_coroutine_sync,
    run_on_thread_loop,
)
from mesa_llm_parallel._ordering import (
    INLINE_POSITION,
    Turnstile,
    current_position,
    current_turnstile,
)
from mesa_llm_parallel._permits import holds_permit, permits
from mesa_llm_parallel._pool import (
    StuckThreadsError,
    WorkerPool,
    check_stuck_threads,
    is_pool_thread,
    pool,
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

__all__ = ["Step", "run_step_async", "run_step_sync"]


class StopScope:
    """The parallel steps started in one context, to be halted from another thread.

    Set in a context with :data:`stop_scope` (``batch_run`` does, for each run): every
    step started there registers itself while it runs. :meth:`halt` makes each of them
    start no more agents at once (agents in flight go on); the caller then interrupts
    the runs. Halting every run first means that a permit freed by one run's cancelled
    agents never starts an agent of a run not yet interrupted.
    """

    __slots__ = ("_lock", "halted", "steps")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.steps: set[Step] = set()
        self.halted = False

    def add(self, step: Step) -> None:
        with self._lock:
            self.steps.add(step)
            halted = self.halted
        if halted:
            step.halt_from_outside()

    def discard(self, step: Step) -> None:
        with self._lock:
            self.steps.discard(step)

    def halt(self) -> None:
        """Start no more agents in any step of this scope, now or later (any thread)."""
        with self._lock:
            self.halted = True
            steps = list(self.steps)
        for step in steps:
            step.halt_from_outside()


#: The :class:`StopScope` of the steps started in this context, or None.
stop_scope: contextvars.ContextVar[StopScope | None] = contextvars.ContextVar(
    "mesa_llm_parallel_stop_scope", default=None
)

logger = logging.getLogger("mesa_llm_parallel")

Resolve = Callable[[Any], Any]

# How an agent is called. Kinds are small ints: they are compared once per agent.
_AWAIT: Final = 0  # await getattr(agent, name)(...) on the step's loop
_POOL: Final = 1  # run getattr(agent, name)(...) in the thread pool
_INLINE: Final = 2  # call getattr(agent, name)(...) right here
_ON_THREAD_LOOP: Final = 3  # run the coroutine on the model's home loop (threading mode)
_NOOP: Final = 4  # Mesa's own no-op method: called right here, no user code runs
_AUTO: Final = 5  # asyncio mode: inline or pool, as the class's record says (_placement)


def _base_method(name: str) -> Any:
    from mesa import Agent

    return getattr(Agent, name, None)


def _identity(entry: Any) -> Any:
    return entry


class _Decision:
    """How one agent class runs in one step, and how many of its agents ran where."""

    __slots__ = (
        "agent_class",
        "inline",
        "kind",
        "name",
        "ran",
        "ran_inline",
        "reason",
        "record",
        "where",
    )

    def __init__(
        self,
        agent_class: type,
        kind: int,
        name: str | None,
        where: str,
        reason: str,
        record: placement.ClassRecord | None = None,
    ) -> None:
        self.agent_class = agent_class
        self.kind = kind
        self.name = name  # the method to call, or None for a callable passed to the step
        self.where = where  # for a fixed kind
        self.reason = reason
        self.record = record  # for _AUTO: decides, per agent, inline or the pool
        self.inline = kind == _INLINE or kind == _NOOP  # always called right here
        self.ran = 0  # agents started at ``where``
        self.ran_inline = 0  # _AUTO: agents started inline (``ran``: in the pool)

    def runs_inline(self) -> bool:
        """Whether the next agent of this class is called right here."""
        return self.inline or (self.record is not None and self.record.inline)


class _Dispatch:
    """Decides, once per agent class and step, which method runs and where.

    Counts the agents of each class by where they ran, for the step report.
    """

    __slots__ = ("_cfg", "_method", "_nested", "_threading", "decisions")

    def __init__(
        self,
        method: str | Callable[..., Any],
        *,
        threading_mode: bool,
        cfg: SettingsSnapshot,
        nested: bool = False,
    ) -> None:
        self._method = method
        self._threading = threading_mode
        self._cfg = cfg
        self._nested = nested
        #: agent class -> its decision; read directly by the hot paths.
        self.decisions: dict[type, _Decision] = {}

    def __call__(self, agent: Any) -> _Decision:
        cls = type(agent)
        found = self.decisions.get(cls)
        if found is None:
            found = self.decisions[cls] = self._decide(cls)
        return found

    def placements(self) -> tuple[placement.Placement, ...]:
        """What the step report shows: one row per class and place, in first-seen order."""
        rows = []
        for cls, decision in list(self.decisions.items()):
            name, record = cls.__qualname__, decision.record
            if record is None:
                if decision.ran:
                    rows.append(
                        placement.Placement(name, decision.where, decision.ran, decision.reason)
                    )
                continue
            if decision.ran:
                reason = record.reason
                if record.inline:  # it moved inline later in the step (or stays there)
                    reason = "observed there first, then moved inline"
                rows.append(placement.Placement(name, placement.POOL, decision.ran, reason))
            if decision.ran_inline:
                reason = record.reason if record.inline else "until: " + record.reason
                rows.append(
                    placement.Placement(name, placement.INLINE, decision.ran_inline, reason)
                )
        return tuple(rows)

    def _decide(self, cls: type) -> _Decision:
        method = self._method
        async_kind = _ON_THREAD_LOOP if self._threading else _AWAIT
        async_where = placement.HOME_LOOP if self._threading else placement.EVENT_LOOP
        if not isinstance(method, str):
            label = getattr(method, "__name__", repr(method))
            if inspect.iscoroutinefunction(method):
                return _Decision(cls, async_kind, None, async_where, f"{label} is async")
            return self._sync(cls, None, f"{label} is sync")
        sync = getattr(cls, method, None)
        async_name = "a" + method
        has_async = inspect.iscoroutinefunction(getattr(cls, async_name, None))
        if sync is None and not has_async:
            raise AttributeError(f"{cls.__name__!r} object has no attribute {method!r}")
        if inspect.iscoroutinefunction(sync):
            return _Decision(cls, async_kind, method, async_where, f"async def {method}")
        base = _base_method(method)
        overridden = sync is not None and sync is not base
        if has_async and (not self._threading or not overridden):
            reason = f"async def {async_name}" + ("" if self._threading else " is preferred")
            return _Decision(cls, async_kind, async_name, async_where, reason)
        if not overridden:
            # Mesa's own no-op: nothing worth a thread hop
            return _Decision(cls, _NOOP, method, placement.INLINE, f"Mesa's own no-op {method}")
        return self._sync(cls, method, f"sync def {method}")

    def _sync(self, cls: type, name: str | None, what: str) -> _Decision:
        """Where a sync method runs: the runner's thread, the pool, inline, or measured."""
        if self._threading:
            return _Decision(cls, _INLINE, name, placement.POOL, f"{what}, threading mode")
        if self._nested:
            reason = (
                "a step started inside an agent holding a pool thread runs its sync agents there"
            )
            return _Decision(cls, _INLINE, name, placement.INLINE, reason)
        choice = vars_get(cls, "run_sync_inline")
        source = f"{cls.__qualname__}.run_sync_inline = {choice!r}"
        if choice is None:
            choice, source = (
                self._cfg.run_sync_inline,
                f"run_sync_inline={self._cfg.run_sync_inline!r}",
            )
        if choice is True:
            return _Decision(cls, _INLINE, name, placement.INLINE, source)
        if choice is False:
            return _Decision(cls, _POOL, name, placement.POOL, source)
        if self._cfg.timeout is not None:
            reason = "a timeout is set, and an inline call cannot be timed out"
            return _Decision(cls, _POOL, name, placement.POOL, reason)
        method = self._method
        key = method if isinstance(method, str) else getattr(method, "__qualname__", repr(method))
        record = placement.record_for(cls, key)
        return _Decision(cls, _AUTO, name, placement.POOL, record.reason, record)


def vars_get(cls: type, name: str) -> Any:
    """A class attribute from ``cls`` or its bases (user classes only), else None."""
    for klass in cls.__mro__:
        if name in vars(klass):
            value = vars(klass)[name]
            if value is not None and value is not True and value is not False and value != "auto":
                raise TypeError(
                    f"{klass.__qualname__}.{name} must be True, False, 'auto' or None, "
                    f"got {value!r}"
                )
            return value
    return None


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

    The counters (started, completed, skipped, in flight, busy time, failures) change
    only in its counting methods. Threading-mode runners call :meth:`claim`,
    :meth:`lookup`, :meth:`start` and :meth:`finish`, which take :attr:`lock`. The
    asyncio driver (``_AsyncStep``) runs every agent's bookkeeping on its loop's thread
    and calls the unlocked ``count_*`` methods, except for failures and skips, which
    go through :meth:`finish` and :meth:`skip`.
    """

    def __init__(
        self,
        *,
        entries: Sequence[Any],
        resolve: Resolve | None = None,
        method: str | Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        cfg: SettingsSnapshot,
        mode: str,
    ) -> None:
        """Prepare a step; nothing runs until a ``run_step_*`` function gets it.

        Args:
            entries: The agents in start order, or entries that ``resolve`` turns into
                agents (a weak reference, for a set that holds its agents weakly).
            resolve: Maps an entry to its agent, or to None when the agent is no longer
                a member and is skipped; None for a list of agents.
            method: The name of the method to call on every agent, or a callable called
                with the agent first.
            args: Positional arguments for every call.
            kwargs: Keyword arguments for every call (None: none).
            cfg: The settings the step runs with, read once when it starts.
            mode: ``"asyncio"`` or ``"threading"``.
        """
        if kwargs is None:
            kwargs = {}
        self.entries = entries
        self.n = len(entries)
        self.resolve = resolve or _identity
        self.method = method
        self.args = args
        self.kwargs = kwargs
        self.call = _make_call(method, args, kwargs)
        self.plain = not args and not kwargs  # the method is called without arguments
        self.cfg = cfg
        self.mode = mode
        self.lock = threading.Lock()
        self.turns = Turnstile(self.n, self.agent_at)
        self._next = itertools.count().__next__
        #: Positions handed out by :meth:`claim`, and start slots reserved and not yet
        #: turned into positions (with a rate limit).
        self.claimed = 0
        self.reserved = 0
        self.stop = False
        #: Set with ``stop`` (see :meth:`halt`): wakes runners waiting for a start slot.
        self.halted = threading.Event()
        #: The asyncio-mode driver of this step (an ``_AsyncStep``), once it runs.
        self.driver: Any = None
        #: The process-wide cap on agents in flight this step obeys (None: no cap).
        self.cap = cfg.max_concurrency
        #: Permits lent by the agent that started this step (it holds one while it waits
        #: for this nested step): 1 or 0. See :mod:`mesa_llm_parallel._permits`.
        self.lent = 1 if self.cap is not None and holds_permit.get() else 0
        #: The caller's context: every agent runs in a copy of it, in every mode. The
        #: step's turnstile is set in it once; each copy gets the agent's position.
        self.context = contextvars.copy_context()
        self.context.run(current_turnstile.set, self.turns)
        self.context.run(holds_permit.set, self.cap is not None)
        #: What inline agents' copies are made from: their position is on the turnstile.
        self.inline_context = self.context.copy()
        self.inline_context.run(current_position.set, INLINE_POSITION)
        #: The model whose step this is (None for agents without one).
        self.model: Any = None
        #: How the step decides where each class runs (set when the step starts).
        self.dispatch: _Dispatch | None = None
        #: An error that ends the whole step once its agents are done (not an agent's).
        self.fatal: BaseException | None = None
        self.started = 0
        self.completed = 0
        self.skipped = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.busy_time = 0.0
        #: Seconds a busy loop of another thread kept the step waiting (see _loops).
        self.stalled_time = 0.0
        self.failures: list[AgentFailure] = []
        self.started_at = time.perf_counter()
        self.ended_at: float | None = None
        self.interrupted = False
        #: The report made when the step closed (None before).
        self.final_report: StepReport | None = None
        self.progress = _progress_bar(self.n, mode) if cfg.progress and self.n else None

    def agent_at(self, position: int) -> Any:
        """The agent at ``position``, whether or not it is still a member of its set."""
        entry = self.entries[position]
        return entry() if isinstance(entry, weakref.ref) else entry

    def call_inline(self, position: int, agent: Any, name: str | None) -> None:
        """Call one agent right here, in its own copy of the caller's context.

        Its position is on the turnstile for the duration of the call (one agent runs
        inline at a time per step), not in a context variable: setting one per agent
        would cost more than the call of a cheap agent. ``_AsyncStep._fill`` does the
        same with the steps spelled out, on its hot path.
        """
        turns = self.turns
        turns.inline_position = position
        try:
            if self.plain and name is not None:
                self.inline_context.copy().run(getattr(agent, name))
            else:
                self.inline_context.copy().run(self.call, agent, name)
        finally:
            turns.inline_position = -1

    # -- stopping -------------------------------------------------------------------
    def halt(self) -> None:
        """Start no more agents; wake every threading-mode runner that waits for a slot.

        (An asyncio step drops its own waiting starts when it next settles.)
        """
        self.stop = True
        self.halted.set()

    def halt_from_outside(self) -> None:
        """:meth:`halt`, from any thread: an asyncio step settles on its own loop."""
        self.halt()
        driver = self.driver
        if driver is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nothing to settle
                driver.loop.call_soon_threadsafe(driver._settle)

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
            with self.lock:
                # Never more slots reserved than agents left to start: a slot reserved
                # for nobody would hold the step open until its time comes.
                if self.stop or self.claimed + self.reserved >= self.n:
                    return None
                self.reserved += 1
            slot, delay = limiter.reserve(rate)
            if delay:
                self.halted.wait(delay)
        with self.lock:
            if slot is not None:
                self.reserved -= 1
            position = None if self.stop else self._next()
            if position is not None and position >= self.n:
                position = None
            if position is not None:
                self.claimed += 1
        if position is None and slot is not None:
            limiter.give_back(slot, rate)  # type: ignore[arg-type]
        return position

    def lookup(self, position: int) -> Any:
        """The agent at ``position`` if it is still a member; else record the skip, None."""
        agent = self.resolve(self.entries[position])
        if agent is None:
            self.skip(position)
        return agent

    # -- counting ---------------------------------------------------------------------
    # The counters change only in this section, in two forms. The asyncio driver runs
    # all of a step's bookkeeping on its loop's thread and calls the unlocked
    # ``count_*`` methods (failures and skips, rare, take the lock). Threading-mode
    # runners call :meth:`start` and :meth:`finish`, which spell the same updates out
    # under the lock: a Python call made while holding it lets the interpreter hand the
    # GIL to another runner there, and the runners then queue behind the lock
    # (``./dev bench --only machinery``: about 1.5 times the threading step time with
    # 10,000 agents). Taking the lock in asyncio mode instead costs that mode about a
    # tenth. Times are taken outside the lock.
    def count_start(self) -> None:
        """Count one more agent as started and in flight."""
        self.started += 1
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight

    def count_success(self, elapsed: float) -> None:
        """Count an agent that ran ``elapsed`` seconds as completed."""
        self.in_flight -= 1
        self.busy_time += elapsed
        self.completed += 1
        if self.progress is not None:
            self.progress.update(1)

    def count_inline_run(self, ran: int, done: int, busy: float) -> None:
        """Count ``ran`` agents called inline one after another, ``done`` of them completed.

        They took ``busy`` seconds in all and were in flight one at a time, so the peak
        is at least one more than what was in flight around them. The asyncio driver
        counts a run of cheap inline agents in one go.
        """
        self.started += ran
        self.completed += done
        self.busy_time += busy
        if self.in_flight >= self.peak_in_flight:
            self.peak_in_flight = self.in_flight + 1

    def start(self) -> float:
        """:meth:`count_start` under the lock (any thread); return the start time."""
        with self.lock:
            self.started += 1
            self.in_flight += 1
            if self.in_flight > self.peak_in_flight:
                self.peak_in_flight = self.in_flight
        return time.perf_counter()

    def skip(self, position: int) -> None:
        """The agent at ``position`` left its set before its turn: count it, pass its turn."""
        with self.lock:
            self.skipped += 1
        self.turns.pass_turn(position)

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
        with self.lock:  # count_success, or a failure, spelled out (see above)
            self.in_flight -= 1
            self.busy_time += elapsed
            if error is None:
                self.completed += 1
            else:
                self.failures.append(AgentFailure(agent, error, position, timed_out))
            if self.progress is not None:
                self.progress.update(1)
        if error is not None and self.cfg.on_error == "raise":
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
                placement=self.dispatch.placements() if self.dispatch is not None else (),
                stalled_time=self.stalled_time,
            )

    def close(self, model: Any, *, interrupted: bool = False) -> StepReport:
        """End the step: stop new starts, build and store the report, run callbacks."""
        self.halt()
        with self.lock:
            self.ended_at = time.perf_counter()
            self.interrupted = interrupted
        if self.progress is not None:
            self.progress.close()
        report = self.final_report = self.report()
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
    return progress_bar(total=total, desc=f"parallel step ({mode})", unit="agent", leave=False)


def progress_bar(**options: Any) -> Any:
    """``tqdm.auto.tqdm(**options)``, leaving the program's multiprocessing start method alone.

    tqdm's first bar makes a ``multiprocessing.RLock`` for its write lock, which fixes
    the default start method for good: a later ``multiprocessing.set_start_method``
    of the program would then fail. If the method was not chosen before, it is left
    unchosen after.
    """
    import multiprocessing

    from tqdm.auto import tqdm

    unchosen = multiprocessing.get_start_method(allow_none=True) is None
    bar = tqdm(**options)
    if unchosen and multiprocessing.get_start_method(allow_none=True) is not None:
        multiprocessing.set_start_method(None, force=True)  # back to "not chosen"
    return bar


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

    ``nested`` says whether the step was started from inside an agent that holds a pool
    thread (default: :func:`in_nested_step`). Sync agents of a nested step run inline,
    right there: sending them to the pool could wait forever for a worker that is
    itself waiting for them.
    """
    if step.n == 0:
        return
    if nested is None:
        nested = in_nested_step()
    await _AsyncStep(step, asyncio.get_running_loop(), nested=nested).run()


#: Longest run of inline agents (seconds) before the loop gets a turn: completions of
#: agents in flight, Ctrl-C and the heartbeat are handled between slices.
_INLINE_SLICE: Final = 0.005


class _ExpiredError(Exception):
    """An async agent overran its timeout (raised by :func:`_bounded`, never seen outside)."""


async def _bounded(coro: Coroutine[Any, Any, Any], seconds: float) -> None:
    """Await ``coro`` with a timeout, telling its expiry apart from the agent's own errors."""
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            await coro
    except Exception as exc:
        if deadline.expired():
            raise _ExpiredError from exc
        raise


def _pool_job(
    position: int,
    call: Callable[..., Any],
    agent: Any,
    name: str | None,
    record: placement.ClassRecord | None,
) -> None:
    """A sync agent in a worker thread; its duration feeds the class's record."""
    current_position.set(position)
    if record is None:
        call(agent, name)
        return
    started = time.perf_counter()
    try:
        call(agent, name)
    finally:
        record.observe(time.perf_counter() - started)


class _SlotWait:
    """A start waiting for its rate slot (see ``rate_limit``)."""

    __slots__ = ("slot", "timer")

    def __init__(self, slot: float) -> None:
        self.slot = slot
        self.timer: asyncio.TimerHandle | None = None


class _PoolCall:
    """A sync agent sent to the thread pool in asyncio mode; the pool's job itself.

    The job reports back to the loop by itself and then drops what it ran: a worker
    thread may hold its last job (and its future) a moment after the call returned,
    and by then neither may lead to the step, its agents or the model.
    """

    __slots__ = (
        "agent",
        "ended",
        "error",
        "global_permit",
        "holds_worker",
        "job",
        "owner",
        "position",
        "timer",
        "work",
    )

    def __init__(self, position: int, agent: Any, owner: _AsyncStep, work: tuple[Any, ...]) -> None:
        self.position = position
        self.agent = agent
        #: The step that waits for it; cleared on the loop when the result is taken.
        self.owner: _AsyncStep | None = owner
        #: (context, call, method name, class record, loop)
        self.work: tuple[Any, ...] | None = work
        self.job: concurrent.futures.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.error: BaseException | None = None
        self.ended = False  # its result (or timeout) has been recorded
        self.holds_worker = True  # its worker is given back when the thread returns
        #: It holds a permit of the process's quota, given back when the call returns.
        self.global_permit = False

    def __call__(self) -> None:
        """In a worker thread: run the agent, then hand this call back to the loop."""
        work, self.work = self.work, None
        context, call, name, record, loop = work  # type: ignore[misc]
        try:
            context.run(_pool_job, self.position, call, self.agent, name, record)
        except BaseException as exc:
            self.error = exc
        finally:
            del work, context, call, record
            if self.global_permit:
                # Only now: a call that outlived its timeout was in flight until here.
                self.global_permit = False
                permits.release()
            with contextlib.suppress(RuntimeError):  # the loop may be closed by then
                loop.call_soon_threadsafe(_pool_call_returned, self)


def _pool_call_returned(call: _PoolCall) -> None:
    """On the loop: hand a returned pool call to its step (once)."""
    owner, call.owner = call.owner, None
    if owner is not None:
        owner._pool_done(call)


class _AsyncStep:
    """One asyncio-mode step on its loop.

    Agents start in list order while fewer than ``k`` are active (in flight, or about
    to start: waiting for a rate slot or a free pool worker). There is no task per
    runner: an async agent is one task, created in its own copy of the caller's
    context, whose done callback records it and starts the next agent; a sync agent in
    the pool is one job whose completion comes back to the loop the same way; an
    inline agent is called right in the start loop, one after another, so a run of
    cheap agents costs a call each and a few counter updates (the loop gets a turn
    every :data:`_INLINE_SLICE`).
    """

    def __init__(self, step: Step, loop: asyncio.AbstractEventLoop, *, nested: bool) -> None:
        cfg = step.cfg
        self.step = step
        self.loop = loop
        self.dispatch = step.dispatch = _Dispatch(
            step.method, threading_mode=False, cfg=cfg, nested=nested
        )
        self.k = min(step.n, cfg.max_concurrency or step.n)
        self.rate = cfg.rate_limit
        self.timeout = cfg.timeout
        #: Agents in flight plus starts waiting for a rate slot or for a pool worker.
        self.active = 0
        self.exhausted = False  # every position has been claimed
        self.fill_pending = False  # a slice of the start loop is scheduled
        self.stopping = False  # the step is being abandoned (interrupt, cancellation)
        self.slot_waits: set[_SlotWait] = set()
        self.rated_claims = 0  # positions taken in a rate slot (with a rate limit)
        #: The process-wide cap (see _permits); permits lent by the starting agent.
        self.cap = step.cap
        self.lent_free = step.lent
        self.lent_user = -1  # the position that holds the lent permit now
        #: The position waiting for a permit, and its waiter (one at a time).
        self.permit_wait: tuple[int, Any] | None = None
        self._permit_granted_cb = self._permit_granted
        self.pool_calls: set[_PoolCall] = set()
        self.waiting_for_worker: collections.deque[int] = collections.deque()
        self.free_workers = 0
        #: What the step holds until it ends: the pool's lease, once it has one.
        self.holds = contextlib.ExitStack()
        self.executor: WorkerPool | None = None
        #: Full garbage collections counted at the start of the current slice.
        self.collections_seen = -1
        self.done = loop.create_future()
        self.starts = array.array("d", bytes(8 * step.n))  # start time by position
        self._task_done_cb = self._task_done
        step.driver = self
        #: The agents' unfinished tasks. The loop keeps only weak references to tasks:
        #: a task awaiting something held weakly (an asyncio stream's reader, which its
        #: protocol references weakly) would otherwise be collected mid-await, and its
        #: agent would never end.
        self.tasks: set[asyncio.Task[Any]] = set()

    # -- the driver -------------------------------------------------------------------
    async def run(self) -> None:
        step = self.step
        heartbeat = None
        if threading.current_thread() is threading.main_thread():
            heartbeat = self.loop.create_task(_heartbeat())
        try:
            self._fill()
            await self.done
        except BaseException:
            self.stopping = True
            step.halt()
            self._drop_waiting()
            tasks = self._own_tasks()
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            if self.pool_calls:
                pool.replace()  # sync agents still running keep their workers; do not wait
            raise
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
            step.halt()
            for call in self.pool_calls:
                if call.timer is not None:
                    call.timer.cancel()
            self.holds.close()

    def running_in_threads(self) -> int:
        """Sync agents started in the pool whose call has not come back (any thread).

        Agents already reported as timed out are not counted: they are failures.
        """
        return sum(1 for call in list(self.pool_calls) if not call.ended)

    def _settle(self) -> None:
        """After any change: start more agents, drop waiting starts, or end the step."""
        if self.stopping:
            return
        if self.step.stop:
            self._drop_waiting()
        elif self.permit_wait is not None:
            if self.lent_free:  # the lent permit came back first: no need to wait on
                position, waiter = self.permit_wait
                self.permit_wait = None
                permits.withdraw(waiter)  # a permit granted meanwhile goes back
                self.active -= 1
                self.lent_free, self.lent_user = 0, position
                self._start_with_permit(position)
                self._settle()
            return
        elif (
            not self.exhausted
            and self.active < self.k
            and not self.fill_pending
            and (not self.rate or self.rated_claims + len(self.slot_waits) < self.step.n)
        ):
            self._fill()
            return
        if self.active == 0 and not self.fill_pending and not self.done.done():
            self.done.set_result(None)

    def _drop_waiting(self) -> None:
        """The step stopped: starts waiting for a slot or a worker will not happen."""
        rate = self.rate
        for wait in self.slot_waits:
            wait.timer.cancel()  # type: ignore[union-attr]
            limiter.give_back(wait.slot, rate)  # type: ignore[arg-type]
        self.active -= len(self.slot_waits) + len(self.waiting_for_worker)
        self.slot_waits.clear()
        while self.waiting_for_worker:
            position = self.waiting_for_worker.popleft()
            if self.cap is not None:
                self._release(position)  # it held a permit while it waited for a worker
            self.step.turns.pass_turn(position)
        if self.permit_wait is not None:
            position, waiter = self.permit_wait
            self.permit_wait = None
            permits.withdraw(waiter)
            self.active -= 1
            self.step.turns.pass_turn(position)

    # -- permits (a process-wide max_concurrency) -------------------------------------
    def _acquire(self, position: int) -> bool:
        """Take a permit for the agent at ``position``, or queue for one (False)."""
        if self.lent_free:
            self.lent_free, self.lent_user = 0, position
            return True
        waiter = permits.acquire_soon(self.cap, self.loop, self._permit_granted_cb)  # type: ignore[arg-type]
        if waiter is None:
            return True
        self.permit_wait = (position, waiter)
        self.active += 1
        return False

    def _release(self, position: int) -> None:
        """The agent at ``position`` has ended: its permit goes back."""
        if position == self.lent_user:
            self.lent_user, self.lent_free = -1, 1
        else:
            permits.release()

    def _permit_granted(self) -> None:
        """On the loop: the permit this step waited for is its own now."""
        wait = self.permit_wait
        if wait is None or not wait[1].granted:
            return  # withdrawn meanwhile (the permit went back with the withdrawal)
        position = wait[0]
        self.permit_wait = None
        self.active -= 1
        if self.stopping or self.step.stop:
            permits.release()
            self.step.turns.pass_turn(position)
        else:
            self._start_with_permit(position)
        self._settle()

    def _start_with_permit(self, position: int) -> None:
        step = self.step
        agent = step.resolve(step.entries[position])
        if agent is None:  # removed while it waited: skipped, as Mesa's loop would
            self._release(position)
            step.skip(position)
            return
        self._start_agent(position, agent, self.dispatch.decisions.get(type(agent)))

    # -- starting agents --------------------------------------------------------------
    def _fill(self) -> None:
        """Start agents in order while fewer than ``k`` are active (a slice at a time).

        Inline agents are called right in this loop: this is the hot path of a step of
        many cheap agents, so it reads everything from locals and does per agent only
        what the report and the turns need.
        """
        self.fill_pending = False
        step = self.step
        if self.rate:
            self._fill_rated()
            return
        next_position, n, k = step._next, step.n, self.k
        entries, resolve, decisions = step.entries, step.resolve, self.dispatch.decisions
        owner = getattr(resolve, "agentset", None)  # a set of strong members: checked here
        turns = step.turns
        pass_turn, call, copy = turns.pass_turn, step.call, step.inline_context.copy
        passed = turns.passed_marks()
        plain = step.plain
        task_context, set_position = step.context.copy, current_position.set
        create_task, task_done = self.loop.create_task, self._task_done_cb
        keep = self.tasks.add
        starts, timeout, args, kwargs = self.starts, self.timeout, step.args, step.kwargs
        progress, perf_counter = step.progress, time.perf_counter
        count_start, count_run = step.count_start, step.count_inline_run
        stall_bound = placement.STALL_BOUND
        now = perf_counter()
        sliced_at = now + _INLINE_SLICE
        self.collections_seen = placement.full_collections()
        # A run of inline agents is counted in one go (count_run), when it ends.
        ran = done = 0
        busy = 0.0
        cap = self.cap
        try:
            while self.active < k and not step.stop and self.permit_wait is None:
                position = next_position()
                if position >= n:
                    self.exhausted = True
                    break
                entry = entries[position]
                if owner is not None:
                    agent = entry if entry in owner._agents else None
                else:
                    agent = resolve(entry)
                if agent is None:  # removed earlier in the step: Mesa's loop skips it
                    step.skip(position)
                    continue
                if cap is not None and not self._acquire(position):
                    break  # the process's quota is full: this agent starts when a permit frees
                decision = decisions.get(type(agent))
                if decision is None or not (
                    decision.inline or (decision.record is not None and decision.record.inline)
                ):
                    if ran:
                        count_run(ran, done, busy)
                        ran = done = 0
                        busy = 0.0
                    if decision is not None and decision.kind == _AWAIT and timeout is None:
                        # An async agent: one task, in its own copy of the caller's context.
                        name = decision.name
                        decision.ran += 1
                        context = task_context()
                        context.run(set_position, position)
                        count_start()
                        starts[position] = now = perf_counter()
                        try:
                            if name:
                                coro = getattr(agent, name)(*args, **kwargs)
                            else:
                                coro = call(agent, None)
                            task = create_task(coro, context=context)
                        except Exception as exc:
                            if cap is not None:
                                self._release(position)
                            step.finish(position, agent, now, exc)
                            continue
                        self.active += 1
                        keep(task)
                        task.add_done_callback(task_done, context=context)
                        continue
                    self._start_agent(position, agent, decision)
                    now = perf_counter()
                    continue
                # An inline agent: Step.call_inline, spelled out (this loop is the hot path).
                started = now
                ran += 1
                name = decision.name
                try:
                    if decision.kind == _NOOP:
                        call(agent, name)
                    else:
                        turns.inline_position = position
                        if plain and name is not None:
                            copy().run(getattr(agent, name))
                        else:
                            copy().run(call, agent, name)
                        turns.inline_position = -1
                except Exception as exc:
                    turns.inline_position = -1
                    if cap is not None:
                        self._release(position)
                    count_run(ran - 1, done, busy)  # the failed agent is counted on its own
                    ran = done = 0
                    busy = 0.0
                    count_start()
                    step.finish(position, agent, started, exc)
                    now = perf_counter()
                    self._inline_ended(decision, now - started, exc)
                    continue
                now = perf_counter()
                if cap is not None:
                    self._release(position)
                took = now - started
                busy += took
                done += 1
                passed[position] = 1  # the turn passes: the write, then the check (see Turnstile)
                if turns.tracking:
                    pass_turn(position)
                if progress is not None:
                    progress.update(1)
                if decision.inline:
                    decision.ran += 1
                else:
                    decision.ran_inline += 1
                    if took > stall_bound:
                        self._stalled(decision, took)
                if now > sliced_at:
                    # A long run of inline agents: let the loop breathe, then go on.
                    count_run(ran, done, busy)
                    self.fill_pending = True
                    self.loop.call_soon(self._fill)
                    return
        except BaseException:
            count_run(ran, done, busy)  # interrupted inside an inline agent: count the run
            raise
        if ran:
            count_run(ran, done, busy)
        self._settle()

    def _inline_ended(
        self, decision: _Decision, took: float, error: BaseException | None = None
    ) -> None:
        """Count an inline agent where it ran; let a measured class's record judge it."""
        if decision.inline:
            decision.ran += 1
            return
        decision.ran_inline += 1
        if took > placement.STALL_BOUND:
            self._stalled(decision, took)
        if error is not None and placement.needs_own_loop(error):
            decision.record.loop_refused()  # type: ignore[union-attr]

    def _stalled(self, decision: _Decision, took: float) -> None:
        """An inline call of a measured class blocked the loop: back to the pool."""
        collections_now = placement.full_collections()
        if collections_now == self.collections_seen:  # not a full collection's pause
            decision.record.stall(took)  # type: ignore[union-attr]
        self.collections_seen = collections_now

    def _fill_rated(self) -> None:
        """:meth:`_fill` with a rate limit: every start waits for its slot."""
        step = self.step
        rate = self.rate
        while self.active < self.k and not step.stop and self.permit_wait is None:
            if self.rated_claims + len(self.slot_waits) >= step.n:
                break  # a slot is reserved for every agent left: reserve none for nobody
            # The slot first, then the position: an agent starts only if the step
            # still runs once its slot has come; an unused slot is given back.
            slot, delay = limiter.reserve(rate)  # type: ignore[arg-type]
            if delay:
                self.active += 1
                wait = _SlotWait(slot)
                wait.timer = self.loop.call_later(delay, self._slot_due, wait)
                self.slot_waits.add(wait)
                continue
            position = step._next()
            if position >= step.n:
                limiter.give_back(slot, rate)  # type: ignore[arg-type]
                self.exhausted = True
                break
            self.rated_claims += 1
            self._start(position)
        self._settle()

    def _slot_due(self, wait: _SlotWait) -> None:
        """A rate slot has come: start the next agent in it (if the step still runs)."""
        if wait not in self.slot_waits:
            return  # dropped meanwhile (the step stopped) and given back already
        self.slot_waits.discard(wait)
        self.active -= 1
        step = self.step
        if self.permit_wait is not None:
            # An earlier agent still waits for a permit of the process's quota: this slot
            # goes unused (no burst follows: spacing only ever grows), and new slots are
            # reserved once that agent has started.
            limiter.give_back(wait.slot, self.rate)  # type: ignore[arg-type]
            self._settle()
            return
        position = step.n if step.stop else step._next()
        if position >= step.n:
            limiter.give_back(wait.slot, self.rate)  # type: ignore[arg-type]
            self.exhausted = True
        else:
            self.rated_claims += 1
            if self.rated_claims == step.n:
                self.exhausted = True
            self._start(position)
        self._settle()

    def _start(self, position: int) -> None:
        """Start the agent at ``position`` (outside the hot loop of :meth:`_fill`)."""
        step = self.step
        agent = step.resolve(step.entries[position])
        if agent is None:  # removed earlier in the step: Mesa's loop skips it
            step.skip(position)
            return
        if self.cap is not None and not self._acquire(position):
            return  # started when a permit frees
        self._start_agent(position, agent, self.dispatch.decisions.get(type(agent)))

    def _start_agent(self, position: int, agent: Any, decision: _Decision | None) -> None:
        """Start one agent where its class runs."""
        step = self.step
        if decision is None:
            try:
                decision = self.dispatch(agent)
            except Exception as exc:  # no such method on this agent
                if self.cap is not None:
                    self._release(position)
                step.finish(position, agent, step.start(), exc)
                return
        kind = decision.kind
        if kind == _AWAIT:
            self._start_task(position, agent, decision)
        elif kind == _POOL or (kind == _AUTO and not decision.record.inline):  # type: ignore[union-attr]
            self._start_in_pool(position, agent, decision)
        else:
            self._run_inline(position, agent, decision)

    def _begin(self, position: int) -> float:
        """Count the agent at ``position`` as started and in flight; its start time."""
        self.step.count_start()
        started = self.starts[position] = time.perf_counter()
        return started

    def _succeeded(self, position: int, started: float) -> None:
        """:meth:`Step.finish` for a success, without the lock: the runners share one thread."""
        step = self.step
        step.count_success(time.perf_counter() - started)
        step.turns.pass_turn(position)

    def _run_inline(self, position: int, agent: Any, decision: _Decision) -> None:
        """Call a sync agent right here, in its own copy of the caller's context."""
        step = self.step
        started = self._begin(position)
        try:
            if decision.kind == _NOOP:
                step.call(agent, decision.name)
            else:
                step.call_inline(position, agent, decision.name)
        except Exception as exc:
            if self.cap is not None:
                self._release(position)
            step.finish(position, agent, started, exc)
            self._inline_ended(decision, time.perf_counter() - started, exc)
        else:
            if self.cap is not None:
                self._release(position)
            self._succeeded(position, started)
            self._inline_ended(decision, time.perf_counter() - started)

    def _start_task(self, position: int, agent: Any, decision: _Decision) -> None:
        """Start an async agent as a task of its own."""
        step = self.step
        decision.ran += 1
        context = step.context.copy()
        context.run(current_position.set, position)
        started = self._begin(position)
        try:
            name = decision.name
            coro = (
                getattr(agent, name)(*step.args, **step.kwargs) if name else step.call(agent, None)
            )
            if self.timeout is not None:
                coro = _bounded(coro, self.timeout)
            task = self.loop.create_task(coro, context=context)
        except Exception as exc:
            if self.cap is not None:
                self._release(position)
            step.finish(position, agent, started, exc)
            return
        self.active += 1
        self.tasks.add(task)
        task.add_done_callback(self._task_done_cb, context=context)

    def _own_tasks(self) -> list[asyncio.Task[Any]]:
        """The unfinished tasks of this step's agents (and the tasks they made).

        Found when needed (an interrupt) rather than tracked per agent: a task runs in a
        copy of the step's context, which holds the step's turnstile.
        """
        turns = self.step.turns
        return [
            task
            for task in asyncio.all_tasks(self.loop)
            if task.get_context().get(current_turnstile) is turns
        ]

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        position = task.get_context()[current_position]
        if self.cap is not None:
            self._release(position)
        if self.stopping:
            return
        step = self.step
        self.active -= 1
        if not task.cancelled() and task.exception() is None:  # the common case first
            step.count_success(time.perf_counter() - self.starts[position])
            turns = step.turns
            turns.passed_marks()[position] = 1  # the write, then the check (see Turnstile)
            if turns.tracking:
                turns.pass_turn(position)
            if self.exhausted and not step.stop:  # nothing more to start: maybe the end
                if self.active == 0 and not self.fill_pending and not self.done.done():
                    self.done.set_result(None)
                return
            self._settle()
            return
        if task.cancelled():
            error: BaseException | None = RuntimeError(
                "the agent's step was cancelled (not by mesa_llm_parallel)"
            )
        else:
            error = task.exception()
        if error is None:
            self._succeeded(position, self.starts[position])
        elif isinstance(error, Exception):
            agent = step.agent_at(position)
            if isinstance(error, _ExpiredError):
                expired = _timeout_error(agent, self.timeout, in_thread=False)  # type: ignore[arg-type]
                expired.__cause__ = error.__cause__
                step.finish(position, agent, self.starts[position], expired, timed_out=True)
            else:
                step.finish(position, agent, self.starts[position], error)
        else:  # KeyboardInterrupt, SystemExit: the whole step ends with it
            if not self.done.done():
                self.done.set_exception(error)
            return
        self._settle()

    def _start_in_pool(self, position: int, agent: Any, decision: _Decision) -> None:
        """Send a sync agent to the pool when a worker is free for it (else queue it).

        Waiting in the pool's own queue would count as running (for timeouts and the
        report) and would skip the membership check Mesa makes right before each agent.
        """
        if self.executor is None and not self._lease_pool(position):
            if self.cap is not None:
                self._release(position)  # no thread for it: it never starts
            return
        if not self.free_workers:
            self.active += 1
            self.waiting_for_worker.append(position)
            return
        step = self.step
        self.free_workers -= 1
        decision.ran += 1
        work = (step.context.copy(), step.call, decision.name, decision.record, self.loop)
        call = _PoolCall(position, agent, self, work)
        call.global_permit = self.cap is not None and self.lent_user != position
        self._begin(position)
        self.active += 1
        self.pool_calls.add(call)
        call.job = self.executor.submit(call)  # type: ignore[union-attr]
        if self.timeout is not None:
            call.timer = self.loop.call_later(self.timeout, self._pool_expired, call)

    def _lease_pool(self, position: int) -> bool:
        cfg = self.step.cfg
        try:
            check_stuck_threads(cfg.max_workers)
        except StuckThreadsError as stuck:  # no thread for it: nothing more starts
            self.step.fatal = stuck
            self.step.halt()
            self.step.turns.pass_turn(position)
            return False
        self.executor = self.holds.enter_context(pool.lease(cfg.max_workers))
        self.free_workers = cfg.max_workers
        return True

    def _pool_done(self, call: _PoolCall) -> None:
        """On the loop: record a pool agent's result and give its worker back."""
        self.pool_calls.discard(call)
        if call.timer is not None:
            call.timer.cancel()
        error, call.error = call.error, None
        if self.cap is not None and call.position == self.lent_user:
            self._release(call.position)  # the lent permit comes back here, on the loop
        if not call.ended and not self.stopping:
            call.ended = True
            self.active -= 1
            if error is None:
                self._succeeded(call.position, self.starts[call.position])
            elif isinstance(error, Exception):
                self.step.finish(call.position, call.agent, self.starts[call.position], error)
            elif not self.done.done():  # KeyboardInterrupt, SystemExit in the thread
                self.done.set_exception(error)
        call.agent = call.job = None
        if call.holds_worker:
            call.holds_worker = False
            self._worker_free()
        else:
            self._settle()

    def _pool_expired(self, call: _PoolCall) -> None:
        """A pool agent overran its timeout: record it; free its worker if possible."""
        if call.ended or self.stopping:
            return
        step = self.step
        call.ended = True
        self.active -= 1
        job = call.job
        error = _timeout_error(call.agent, self.timeout, in_thread=True)  # type: ignore[arg-type]
        release = False
        if job.cancel():  # type: ignore[union-attr]
            release = True  # still queued (another step held the threads): never runs
            self.pool_calls.discard(call)
            call.work = call.owner = None
            if self.cap is not None:
                call.global_permit = False
                self._release(call.position)
        elif not job.done():  # type: ignore[union-attr]
            # Its thread cannot be stopped: the pool gives up on it and the step gets
            # its worker back at once (a spare thread takes over).
            try:
                release = self.executor.abandon(job, repr(call.agent), step.cfg.max_workers)  # type: ignore[union-attr, arg-type]
            except StuckThreadsError as stuck:
                release = True
                step.fatal = stuck
                step.halt()
        step.finish(call.position, call.agent, self.starts[call.position], error, timed_out=True)
        if release and call.holds_worker:
            call.holds_worker = False
            self._worker_free()
        else:
            self._settle()

    def _worker_free(self) -> None:
        """A pool worker is free: give it to the first agent waiting for one."""
        self.free_workers += 1
        self._drain()

    def _drain(self) -> None:
        """Start the agents waiting for a worker, in order, as far as possible.

        A waiting agent whose class has meanwhile been measured cheap runs inline
        instead (a class is observed in the pool first: in a step of many such agents,
        most of them are queued here by the time it is judged).
        """
        step = self.step
        queue = self.waiting_for_worker
        decisions = self.dispatch.decisions
        sliced_at = time.perf_counter() + _INLINE_SLICE
        while queue and not step.stop:
            position = queue[0]
            agent = step.resolve(step.entries[position])  # removed while it waited?
            if agent is None:
                queue.popleft()
                self.active -= 1
                if self.cap is not None:
                    self._release(position)
                step.skip(position)
                continue
            decision = decisions[type(agent)]
            if decision.runs_inline():
                queue.popleft()
                self.active -= 1
                self._run_inline(position, agent, decision)
                if time.perf_counter() > sliced_at and queue:
                    self.loop.call_soon(self._drain)
                    return
            elif self.free_workers:
                queue.popleft()
                self.active -= 1
                self._start_in_pool(position, agent, decision)
            else:
                break
        self._settle()


async def _heartbeat() -> None:
    """Wake the main thread's loop now and then, so that it notices Ctrl-C promptly.

    A process-directed SIGINT may land on a pool worker; the main thread's loop, asleep
    in ``select`` until its next timer, would raise KeyboardInterrupt only then.
    """
    while True:  # noqa: ASYNC110 - a timer, not a wait for a condition
        await asyncio.sleep(_SIGNAL_CHECK_INTERVAL)


# -- threading mode -----------------------------------------------------------------
class _Runner:
    """One threading-mode runner: it runs agents one after another until none is left.

    Its attributes say which agent it runs now (read by the waiting side, under the
    step's lock, to enforce timeouts) and whether it was abandoned. The step is passed
    to :meth:`run`, never kept: the waiting side holds runners a little longer.
    """

    __slots__ = ("abandoned", "agent", "on_loop", "position", "started")

    def __init__(self) -> None:
        self.abandoned = False
        self.agent: Any = None
        self.on_loop = False  # the agent runs on the home loop, which enforces its timeout
        self.position = -1
        self.started = 0.0

    def run(self, step: Step, dispatch: _Dispatch, *, nested: bool = False) -> None:
        """Claim the next position and run its agent, until the step has none to give.

        ``nested``: the step runs right here, in the worker of the agent that started
        it, one agent at a time on that agent's permit.
        """
        context = step.context
        cap = None if nested else step.cap
        while not self.abandoned and (position := step.claim()) is not None:
            agent = step.lookup(position)
            if agent is None:
                continue
            if cap is not None and not permits.acquire(cap, step.halted):
                step.turns.pass_turn(position)  # the step stopped while it waited
                return
            if cap is not None and step.stop:  # halted as the permit came: it goes back
                permits.release()
                step.turns.pass_turn(position)
                return
            started = step.start()
            # Each agent in a fresh copy of the caller's context, as asyncio.to_thread
            # does: what one agent sets there is not seen by the next one of this runner.
            try:
                error, timed_out = context.copy().run(
                    self._run_agent, step, dispatch, position, agent, started
                )
            finally:
                if cap is not None:
                    permits.release()  # when the call has really returned, even if abandoned
            with step.lock:
                abandoned = self.abandoned
                self.agent = None
            if abandoned:  # the caller already reported it as timed out and moved on
                return
            step.finish(position, agent, started, error, timed_out=timed_out)
            del agent

    def _run_agent(
        self, step: Step, dispatch: _Dispatch, position: int, agent: Any, started: float
    ) -> tuple[BaseException | None, bool]:
        """Run one agent in its own context; return (its error or None, timed out)."""
        timeout = step.cfg.timeout
        current_position.set(position)
        try:
            decision = dispatch(agent)
            kind = decision.kind
            with step.lock:
                self.agent, self.position, self.started = agent, position, started
                self.on_loop = kind == _ON_THREAD_LOOP
                decision.ran += 1
            result = step.call(agent, decision.name)
            if kind == _ON_THREAD_LOOP and _run_on_home_loop(step, result, timeout):
                return _timeout_error(agent, timeout, in_thread=False), True  # type: ignore[arg-type]
        except Exception as exc:
            return exc, False
        return None, False


#: How long after an async agent's own timeout (enforced on its loop) the step gives
#: up on the thread that waits for it, in seconds: only if that loop is blocked.
_LOOP_TIMEOUT_GRACE: Final = 1.0


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
    dispatch = step.dispatch = _Dispatch(step.method, threading_mode=True, cfg=cfg)
    if in_nested_step():
        # A step started from inside an agent that holds a pool thread (an agent
        # stepping its sub-agents) runs right here: waiting for free workers could
        # deadlock once such agents hold them all.
        _Runner().run(step, dispatch, nested=step.lent > 0)
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
        waiting = _Waiting(step, dispatch, running, executor, k)
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
        dispatch: _Dispatch,
        running: dict[concurrent.futures.Future[None], _Runner],
        executor: WorkerPool,
        k: int,
    ) -> None:
        self.step = step
        self.dispatch = dispatch
        #: Every runner started, by its job's future (filled in here; read by the caller).
        self.running = running
        self.executor = executor
        self.k = k
        self.timeout = step.cfg.timeout
        self._lock = threading.Lock()
        self.pending: set[Any] = set()
        self.all_done = threading.Event()
        self._wake: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    def release(self) -> None:
        """Let go of the step (a runner's future keeps this object a little longer)."""
        self.step = None  # type: ignore[assignment]
        self.dispatch = None  # type: ignore[assignment]
        self.running = {}
        self.executor = None  # type: ignore[assignment]

    def _add_runner(self) -> None:
        runner = _Runner()
        future = self.executor.submit(functools.partial(runner.run, self.step, self.dispatch))
        self.running[future] = runner
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
    scope = stop_scope.get()
    if scope is not None:
        scope.add(step)
    try:
        try:
            with scaled_collector(step.n):
                yield
        except BaseException:
            step.close(model, interrupted=True)
            raise
        finally:
            if scope is not None:
                scope.discard(step)
        report = step.close(model)
        if step.fatal is not None:
            raise step.fatal
        if step.cfg.on_error == "raise":
            raise_failures(report)
    except BaseException:
        recovery.arm(model)  # (already armed unless the model changed its schedule)
        raise


def _interruption(step: Step, report: StepReport, what: str) -> str:
    """What became of ``step``'s agents after an interrupt, and how to go on (one line)."""
    failed = len(report.failures)
    ended = report.completed + failed
    unfinished = report.started - ended
    if step.mode == "threading":
        # Nothing started can be stopped: a thread cannot, and an async-only agent's
        # coroutine was handed to the model's loop, which finishes it when it runs.
        in_background = unfinished
        where = "in threads (or on the model's event loop)"
    else:
        driver = step.driver
        in_background = min(unfinished, driver.running_in_threads() if driver is not None else 0)
        where = "in threads"
    cancelled = unfinished - in_background
    not_started = report.agents - report.started - report.skipped
    counts = f"{ended} of {report.agents} agents finished"
    if failed:
        counts += f" ({failed} failed)"
    if cancelled:
        counts += f", {cancelled} cancelled"
    if not_started:
        counts += f", {not_started} never started"
    if report.skipped:
        counts += f", {report.skipped} skipped (removed from their set)"
    if in_background:
        counts += (
            f"; {in_background} started {where} cannot be stopped and may still finish "
            "in the background"
        )
    if step.model is not None:
        go_on = "the next model.step() runs normally. Details: mlp.last_step_report(model)."
    else:
        go_on = "the next one runs normally. Details: exception.mesa_llm_parallel_report."
    return (
        f"parallel step {what} ({report.mode} mode): {counts}. The model is left "
        "part-way through the step (an unfinished agent may have done part of its own); "
        f"the step is not re-run, and {go_on}"
    )


def interrupted_error(step: Step, report: StepReport) -> KeyboardInterrupt:
    """The ``KeyboardInterrupt`` raised in place of a Ctrl-C that ended ``step``.

    Its message says what became of the step's agents and how to go on, instead of the
    frames of the event loop or the wait that the interrupt landed in. ``report`` is the
    step's final report; it is attached as ``exception.mesa_llm_parallel_report``.
    """
    error = KeyboardInterrupt(_interruption(step, report, "interrupted"))
    error.mesa_llm_parallel_report = report  # type: ignore[attr-defined]
    return error


def cancelled_error(step: Step, report: StepReport) -> asyncio.CancelledError:
    """The ``CancelledError`` raised in place of the one that cancelled an awaited ``step``.

    An awaited step (``await ashuffle_do(...)``, ``await step_agents_parallel(...)``) is
    ended by the cancellation of the task that awaits it: a notebook's interrupt button
    during an ``await`` cell, or ``task.cancel()``. The task still ends cancelled; the
    message says what became of the agents, and the report is attached as
    ``exception.mesa_llm_parallel_report``.
    """
    error = asyncio.CancelledError(_interruption(step, report, "cancelled"))
    error.mesa_llm_parallel_report = report  # type: ignore[attr-defined]
    return error


def run_step_sync(step: Step, model: Any) -> None:
    """Run ``step`` from synchronous code in its mode, then close it (see _step_scope).

    A Ctrl-C (a plain ``KeyboardInterrupt``) is raised again as a short one that says
    what became of the step (:func:`interrupted_error`): interrupts of other kinds
    (``batch_run`` stopping a run, subclasses) pass unchanged.
    """
    __tracebackhide__ = True  # IPython and pytest show the caller's frames, not this one
    step.model = model
    try:
        _run_step_sync(step, model)
    except KeyboardInterrupt as interrupt:
        report = step.final_report
        if type(interrupt) is not KeyboardInterrupt or report is None:
            raise  # batch_run stopping a run, or not an interrupt of this step
        # What became of the step's agents, instead of the frames the interrupt landed in:
        raise interrupted_error(step, report) from None


def _run_step_sync(step: Step, model: Any) -> None:
    with _step_scope(step, model):
        if step.mode == "threading":
            run_step_threaded(step)
        else:
            # Decided here, in the calling thread: the step itself may run on another
            # thread's loop (the background loop), where the answer would be wrong.
            nested = in_nested_step()
            try:
                try:
                    run_coroutine_sync(
                        lambda: run_step_async(step, nested=nested),
                        loop_policy=step.cfg.loop,
                        model=model,
                    )
                finally:
                    step.stalled_time = last_stalled_time()
            except NestingTooDeepError:
                if step.started or step.skipped:
                    raise
                # Refused before anything ran: too many blocking steps already wait on
                # this loop. Run this one right here, without a loop: sync methods one
                # after another; an async-only agent here fails with that error.
                dispatch = step.dispatch = _Dispatch(step.method, threading_mode=True, cfg=step.cfg)
                _Runner().run(step, dispatch)


async def run_step_in_loop(step: Step, model: Any) -> None:
    """Run ``step`` on the running loop (nothing nested), then close it.

    A cancellation of the awaiting task is raised again as a ``CancelledError`` that
    says what became of the step (:func:`cancelled_error`).
    """
    __tracebackhide__ = True  # IPython and pytest show the caller's frames, not this one
    step.model = model
    try:
        with _step_scope(step, model):
            await run_step_async(step)
    except asyncio.CancelledError:
        report = step.final_report
        if report is None or not report.interrupted:
            raise
        raise cancelled_error(step, report) from None


def model_of(agents: Sequence[Any]) -> Any:
    """The model of the first agent that has one, or None."""
    for agent in agents:
        model = getattr(agent, "model", None)
        if model is not None:
            return model
    return None
