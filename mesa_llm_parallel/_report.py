"""What happened in a parallel step: the step report and the step-end callbacks.

Core objects: :class:`StepReport` (one per parallel step, frozen), :class:`AgentFailure`,
:func:`last_step_report`, :func:`add_step_callback` / :func:`remove_step_callback`.

A model's latest report is kept in the model's own library state (``_state``), never in
module state: a report refers to failing agents and their exceptions, and a module-level
table would keep the model alive after ``del model``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, Final

from mesa_llm_parallel._placement import Placement
from mesa_llm_parallel._state import state_of

__all__ = [
    "AgentFailure",
    "StepReport",
    "add_step_callback",
    "last_step_report",
    "remove_step_callback",
]

logger = logging.getLogger("mesa_llm_parallel")


@dataclasses.dataclass(frozen=True, slots=True)
class AgentFailure:
    """One agent's failure in a parallel step.

    Attributes:
        agent: The agent that failed.
        exception: What it raised; a :class:`TimeoutError` when it ran out of time.
        position: Its place in the step's start order (0 = started first).
        timed_out: Whether it was stopped (or, in a thread, abandoned) by ``timeout``.
    """

    agent: Any
    exception: BaseException
    position: int
    timed_out: bool = False


#: A step is :attr:`StepReport.stalled` when its ``stalled_time`` exceeds this share of
#: its ``wall_time`` ...
STALL_SHARE: Final = 0.25
#: ... and this many seconds.
STALL_MIN_SECONDS: Final = 0.1


@dataclasses.dataclass(frozen=True, slots=True)
class StepReport:
    """The figures of one parallel step.

    Attributes:
        mode: ``"asyncio"`` or ``"threading"``.
        agents: How many agents the step was asked to run.
        started: How many of them started.
        completed: How many finished without an exception.
        skipped: How many were skipped (removed from the set before their turn).
        failures: Every failure, in start order (timeouts included).
        wall_time: Seconds from the start of the step to its end.
        busy_time: Seconds spent inside agents, summed over all agents.
        peak_in_flight: The most agents in flight at once.
        pool_size: The thread-pool size the step used (``max_workers``).
        max_concurrency: The concurrency cap the step used, or None.
        interrupted: Whether the step was interrupted or cancelled before it finished.
        stuck_threads: Threads of the process still running a call that overran its
            ``timeout`` (in this step or an earlier one) when the step ended. They no
            longer count as pool workers; at most ``max_workers`` may be stuck at once
            (see :class:`~mesa_llm_parallel.StuckThreadsError`).
        placement: Where the agents of each class ran and why, one
            :class:`~mesa_llm_parallel.Placement` per class and place, in the order
            the classes first started. In asyncio mode a class of sync agents may
            appear twice: observed in the thread pool, then inline (see
            ``run_sync_inline``).
        stalled_time: Seconds of ``wall_time`` during which the step waited for its
            event loop while that loop, run by another thread, was busy with other
            work: typically a panel's step sent to a notebook kernel's loop while a
            cell runs synchronous code. It counts the delay between sending the step
            to the loop and the loop starting it, plus, while the step runs there,
            every 50 ms poll interval over which the loop did not answer a probe and
            was running something other than the step itself or a parallel step's
            agents (a loop kept busy by agents does not count; blocks shorter than
            one interval are not seen). As far as the library can tell: other
            asyncio code on that loop that keeps it busy counts too. 0.0 when the
            calling thread runs the step's loop itself (a script, ``asyncio.run``, a
            cell's own step), in threading mode, and for the awaitable entry points.
            See :attr:`stalled`.
    """

    mode: str
    agents: int
    started: int
    completed: int
    skipped: int
    failures: tuple[AgentFailure, ...]
    wall_time: float
    busy_time: float
    peak_in_flight: int
    pool_size: int
    max_concurrency: int | None
    interrupted: bool = False
    stuck_threads: int = 0
    placement: tuple[Placement, ...] = ()
    stalled_time: float = 0.0

    @property
    def timed_out(self) -> tuple[AgentFailure, ...]:
        """The failures that were timeouts."""
        return tuple(f for f in self.failures if f.timed_out)

    @property
    def not_started(self) -> int:
        """Agents that never started: after a failure with ``on_error="raise"``, or an interrupt."""
        return self.agents - self.started - self.skipped

    @property
    def speedup(self) -> float:
        """Summed agent time over wall time: how many agents' worth of work overlapped."""
        return self.busy_time / self.wall_time if self.wall_time > 0 else 0.0

    @property
    def stalled(self) -> bool:
        """Whether a busy event loop, not the agents, made this step slow.

        True when :attr:`stalled_time` is more than a quarter of ``wall_time`` and more
        than 0.1 s (``STALL_SHARE`` and ``STALL_MIN_SECONDS``): long enough to notice,
        and too large a share for the step's figures (its ``speedup``) to describe the
        agents. The thresholds are this library's choice, not measured constants.
        """
        return self.stalled_time > STALL_MIN_SECONDS and (
            self.stalled_time > STALL_SHARE * self.wall_time
        )

    def summary(self) -> str:
        """One line for logs and status displays."""
        parts = [
            f"{self.completed}/{self.agents} agents completed",
            f"{len(self.failures)} failed"
            + (f" ({len(self.timed_out)} timed out)" if self.timed_out else ""),
            f"{self.wall_time * 1000:.1f} ms",
            f"speedup {self.speedup:.1f}x",
            f"peak {self.peak_in_flight} in flight",
            f"{self.mode}, pool {self.pool_size}",
        ]
        if self.stuck_threads:
            parts.append(f"{self.stuck_threads} stuck thread(s)")
        if self.stalled:
            parts.append(f"stalled {self.stalled_time:.1f} s by a busy event loop")
        if self.interrupted:
            parts.append("interrupted")
        return ", ".join(parts)


def step_number(model: Any) -> int | None:
    """How many steps ``model`` has taken: Mesa 3's ``model.steps``, or Mesa 4's ``time``.

    Mesa 4 removed ``model.steps``; its ``model.time`` advances by one per step of the
    default schedule. None for a model with neither.
    """
    steps = getattr(model, "steps", None)
    if isinstance(steps, int):
        return steps
    time = getattr(model, "time", None)
    return int(time) if isinstance(time, int | float) else None


def last_step_report(model: Any) -> StepReport | None:
    """The report of ``model``'s most recent parallel step, or None before any."""
    state = state_of(model, create=False)
    return None if state is None else state.last_report


def last_report_step(model: Any) -> int | None:
    """The model's step number when its latest report was stored (for the front ends)."""
    state = state_of(model, create=False)
    return None if state is None else state.last_report_step


_last_model: weakref.ref[Any] | None = None


def store_report(model: Any, report: StepReport) -> None:
    """Keep ``report`` as ``model``'s latest (in the model's own state)."""
    global _last_model  # noqa: PLW0603 - a weak reference: never keeps a model alive
    state = state_of(model)
    if state is not None:  # a model with __slots__: no report, no error
        state.last_report = report
        state.last_report_step = step_number(model)
    with contextlib.suppress(TypeError):
        _last_model = weakref.ref(model)


def last_stepped_model() -> Any:
    """The model of the most recent parallel step in the process, if it still exists."""
    ref = _last_model
    return None if ref is None else ref()


StepCallback = Callable[[Any, StepReport], object]

_callbacks_lock = threading.Lock()
_callbacks: tuple[StepCallback, ...] = ()


def add_step_callback(callback: StepCallback) -> StepCallback:
    """Call ``callback(model, report)`` after every parallel step; return it.

    Callbacks run in the thread that ran the step, right after it, in the order they
    were added. An exception in a callback is logged and does not affect the step.
    The library keeps a strong reference to the callback until
    :func:`remove_step_callback`: a bound method keeps its object alive until then.
    """
    global _callbacks  # noqa: PLW0603 - replaced as a whole: readers never lock
    if not callable(callback):
        raise TypeError(f"step callback must be callable, got {callback!r}")
    with _callbacks_lock:
        _callbacks = (*_callbacks, callback)
    return callback


def remove_step_callback(callback: StepCallback) -> None:
    """Stop calling ``callback``; does nothing if it was not added."""
    global _callbacks  # noqa: PLW0603
    with _callbacks_lock:
        _callbacks = tuple(c for c in _callbacks if c != callback)


def run_callbacks(model: Any, report: StepReport) -> None:
    """Call every step callback; log, never raise, their exceptions."""
    for callback in _callbacks:
        try:
            callback(model, report)
        except Exception:
            logger.exception("mesa_llm_parallel: step callback %r failed", callback)


def _reset_after_fork() -> None:
    """In a forked child: the callbacks stay, with a lock no parent thread can hold."""
    global _callbacks_lock  # noqa: PLW0603
    _callbacks_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)
