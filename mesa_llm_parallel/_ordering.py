"""Ordered commits: agents think concurrently and apply their effects one at a time.

Core objects: :func:`in_turn` (public), :class:`Turnstile` (one per parallel step), and
:func:`shared_lock` for state shared between threads.

Every agent of a parallel step has a position: its place in the step's start order
(the shuffled order of ``shuffle_do``). ``in_turn(agent)`` waits until every agent
before it has either left its own ``in_turn`` block or ended its step (finished,
failed, timed out or was skipped), then lets the agent in. Effects applied inside the
block therefore happen in start order, exactly as in a sequential run, whatever the
latencies and the concurrency.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

from mesa_llm_parallel._placement import note_in_turn

__all__ = [
    "INLINE_POSITION",
    "Turnstile",
    "current_position",
    "current_turnstile",
    "in_turn",
    "shared_lock",
]

#: The turnstile of the parallel step whose agents run in this context, or None outside
#: a parallel step. Set once per step, in the context every agent's own copy is made from.
current_turnstile: contextvars.ContextVar[Turnstile | None] = contextvars.ContextVar(
    "mesa_llm_parallel_turnstile", default=None
)

#: The position of the agent whose step runs in this context (-1 outside an agent). Set
#: by the engine in each agent's own copy of the context; tasks the agent creates
#: inherit it. A plain int: nothing per agent for the garbage collector to scan.
current_position: contextvars.ContextVar[int] = contextvars.ContextVar(
    "mesa_llm_parallel_position", default=-1
)


#: ``current_position`` of an agent called inline by the engine: its position is then
#: the turnstile's ``inline_position`` (one agent runs inline at a time per step, and
#: setting a context variable per agent would cost more than the call of a cheap agent).
INLINE_POSITION = -2


def _no_agent(position: int) -> Any:
    return None


class Turnstile:
    """Lets the positions 0..n-1 through one at a time, in order.

    Thread-safe. Waiters may be threads (blocking) or coroutines on any event loop.

    It costs almost nothing until the first agent of the step asks for its turn:
    before that, giving up a turn is a single write, and the order of passes is
    worked out only once it is needed.
    """

    __slots__ = (
        "_async_waiters",
        "_cond",
        "_frontier",
        "_lock",
        "_passed",
        "agent_at",
        "inline_position",
        "tracking",
    )

    def __init__(self, n: int, agent_at: Callable[[int], Any] = _no_agent) -> None:
        self._passed = bytearray(n)
        #: The agent at a position (removed from its set or not), for ``in_turn``.
        self.agent_at = agent_at
        #: The position of the agent being called inline right now, or -1.
        self.inline_position = -1
        self._frontier = 0  # while tracking: every position below it has passed
        #: Whether an agent has asked for its turn (passing one then wakes waiters).
        self.tracking = False
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._async_waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def passed_marks(self) -> bytearray:
        """The pass marks by position.

        A turn may be passed by writing 1 at its position and then, if :attr:`tracking`,
        calling :meth:`pass_turn` (in that order).
        """
        return self._passed

    def is_passed(self, position: int) -> bool:
        """Whether ``position`` has had its turn (or ended its step)."""
        return bool(self._passed[position])

    def _activate(self) -> None:
        """Start tracking the frontier (called with the lock held)."""
        if not self.tracking:
            self.tracking = True
            self._advance()

    def _advance(self) -> list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]]:
        """Move the frontier past every passed position; return the async waiters to wake."""
        passed, frontier, n = self._passed, self._frontier, len(self._passed)
        while frontier < n and passed[frontier]:
            frontier += 1
        if frontier == self._frontier:
            return []
        self._frontier = frontier
        self._cond.notify_all()
        waking = [w for w in self._async_waiters if w[0] <= frontier]
        if waking:
            self._async_waiters = [w for w in self._async_waiters if w[0] > frontier]
        return waking

    def pass_turn(self, position: int) -> None:
        """Mark ``position`` as done; wake whoever may now go. Idempotent."""
        self._passed[position] = 1
        # Checked after the write: either the activating thread saw the write, or this
        # thread sees the activation and advances the frontier itself.
        if not self.tracking:
            return
        with self._lock:
            waking = self._advance()
        for _, loop, future in waking:
            if asyncio._get_running_loop() is loop:
                _resolve(future)
            else:
                loop.call_soon_threadsafe(_resolve, future)

    def ready(self, position: int) -> bool:
        """Whether every position before ``position`` has passed."""
        with self._lock:
            self._activate()
            return self._frontier >= position

    def wait(self, position: int) -> None:
        """Block the calling thread until ``position`` may go."""
        with self._cond:
            self._activate()
            self._cond.wait_for(lambda: self._frontier >= position)

    async def wait_async(self, position: int) -> None:
        """Wait, without blocking the event loop, until ``position`` may go."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._activate()
            if self._frontier >= position:
                return
            future: asyncio.Future[None] = loop.create_future()
            self._async_waiters.append((position, loop, future))
        try:
            await future
        except BaseException:
            with self._lock:
                self._async_waiters = [w for w in self._async_waiters if w[2] is not future]
            raise


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Turn:
    """The context manager returned by :func:`in_turn`, for ``with`` and ``async with``."""

    __slots__ = ("_agent", "_slot")

    def __init__(self, agent: Any) -> None:
        self._agent = agent
        self._slot: tuple[Turnstile, int] | None = None

    def _claim(self) -> tuple[Turnstile, int] | None:
        turnstile = current_turnstile.get()
        position = current_position.get()
        if turnstile is None or position == -1:
            return None  # not in a parallel step: Mesa steps agents one at a time anyway
        if position == INLINE_POSITION:
            position = turnstile.inline_position
            if position < 0:  # e.g. a task made by an inline agent, run after its call
                raise RuntimeError(
                    f"the turn of agent {self._agent!r} in this step is over: it was "
                    "called inline and has returned"
                )
        agent = turnstile.agent_at(position)
        if agent is not self._agent:
            raise RuntimeError(
                f"in_turn({self._agent!r}) was called from the step of {agent!r}; "
                "an agent can only wait for its own turn"
            )
        note_in_turn(agent)  # its class is never run inline on the event loop
        slot = (turnstile, position)
        if turnstile.is_passed(position):
            raise RuntimeError(
                f"the turn of agent {self._agent!r} in this step is over: it already took "
                "its turn, or it ran out of time and later agents have gone ahead"
            )
        self._slot = slot
        return slot

    def __enter__(self) -> None:
        slot = self._claim()
        if slot is None:
            return
        turnstile, position = slot
        if not turnstile.ready(position):
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                pass
            else:
                self._slot = None
                raise RuntimeError(
                    f"'with in_turn(agent)' from {self._agent!r} would block the event loop "
                    "that earlier agents need: use 'async with in_turn(agent)' inside async "
                    "code. A sync agent runs on the loop's thread only when it is run inline: "
                    "with run_sync_inline='auto' (measured cheap before it called in_turn), "
                    "its class stays in the thread pool from now on; where run_sync_inline=True "
                    "forces it inline (the setting, or the class attribute), set "
                    "run_sync_inline = False on the class"
                )
        turnstile.wait(position)

    async def __aenter__(self) -> None:
        slot = self._claim()
        if slot is not None:
            await slot[0].wait_async(slot[1])

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            slot[0].pass_turn(slot[1])

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def in_turn(agent: Any) -> _Turn:
    """Wait for ``agent``'s turn in the current parallel step, then hold it.

    Use it around the part of a step that changes shared state, after the slow part
    (the language-model call) has run concurrently::

        async def astep(self):
            plan = await self.reasoning.aplan(obs)   # concurrent
            async with in_turn(self):                  # one at a time, in start order
                self.apply_plan(plan)

        def step(self):                                # threading mode
            plan = self.reasoning.plan(obs)
            with in_turn(self):
                self.apply_plan(plan)

    Turns follow the step's start order (the shuffled order), so a seeded model with a
    deterministic language model reaches the same state in every run, in both modes,
    at any concurrency. An agent that fails, times out or never calls ``in_turn`` gives
    up its turn when its step ends, so it never blocks the agents after it. Outside a
    parallel step (sequential Mesa) it does nothing.

    Each agent takes its turn at most once per step: a second ``in_turn`` in the same
    step, or one from an agent that already ran out of time, raises RuntimeError.
    Read the state your effects depend on inside the block: outside it, other agents'
    effects may or may not have been applied yet.
    """
    return _Turn(agent)


_shared_locks: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_shared_locks_guard = threading.Lock()


def shared_lock(obj: Any) -> threading.RLock:
    """A re-entrant lock that belongs to ``obj`` (a grid, a network, the model).

    Every call with the same object returns the same lock, so agents in threads can
    guard a structure Mesa does not protect::

        with shared_lock(self.model.grid):
            self.model.grid.move_agent(self, target)

    The lock lives as long as ``obj`` does (it is held through a weak reference). Hold
    it briefly and never across an ``await``: in asyncio mode the agents share one
    thread and need no lock among themselves.
    """
    with _shared_locks_guard:
        try:
            lock = _shared_locks.get(obj)
            if lock is None:
                lock = _shared_locks[obj] = threading.RLock()
        except TypeError:
            raise TypeError(
                f"shared_lock needs an object that supports weak references, got "
                f"{type(obj).__name__}"
            ) from None
        return lock


def _reset_after_fork() -> None:
    """In a forked child: shared locks that the parent's threads held would stay held."""
    global _shared_locks, _shared_locks_guard  # noqa: PLW0603
    _shared_locks = weakref.WeakKeyDictionary()
    _shared_locks_guard = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)
