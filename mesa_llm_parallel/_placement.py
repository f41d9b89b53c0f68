"""Where a sync agent runs in asyncio mode: in the thread pool, or inline on the loop.

Core objects: :class:`ClassRecord` (what the steps have measured about one agent class),
:func:`record_for`, :class:`Placement` (one row of a step report).

A sync method sent to the thread pool costs a round trip between the event loop and a
worker thread: about 45 us per agent on the 2-core machines the benchmarks run on
(docs/benchmarks.md), against about 0.3 us for a trivial ``step`` called directly. For
an agent that waits on the network the hop is what lets the waits overlap; for a
rule-based agent it is pure overhead. With ``run_sync_inline="auto"`` (the default) each
agent class is decided from what the steps measure:

1. A class starts in the pool. Each call there is timed in its worker thread.
2. After :data:`OBSERVED_CALLS` calls, a class whose calls took under
   :data:`CHEAP_CALL` (20 us, well under the hop) in at least 15 of 16 calls runs inline from then
   on; otherwise it stays in the pool and the next 16 calls are judged again.
3. Never inline: a class whose agents call :func:`~mesa_llm_parallel.in_turn` (their
   source mentions it, or a call was seen), and every class while a per-agent
   ``timeout`` is set (an inline call cannot be timed out).
4. The safety valve: an inline call that blocks the loop for longer than
   :data:`STALL_BOUND` (whether it returns or raises) sends its class back to the pool
   at once and for good (so a class stalls the loop at most once); a full garbage
   collection during the batch is not blamed on the agent. So does an inline call that
   fails because it runs an event loop of its own (``asyncio.run``), which cannot work
   on the loop's thread: that agent fails, once per class.

The records are kept per class and method name (``step``, ``think``, or a callable's
qualified name): one method of a class may be cheap and another block.

The records are kept per class in a weak dictionary: a class defined in a notebook is
freed with it, and no model or agent is ever referenced.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import os
import threading
import types
import weakref
from typing import Any, Final

__all__ = [
    "CHEAP_CALL",
    "OBSERVED_CALLS",
    "STALL_BOUND",
    "ClassRecord",
    "Placement",
    "full_collections",
    "note_in_turn",
    "record_for",
]

#: A call this short (seconds, measured in the worker thread) is far cheaper than the
#: round trip to the thread pool (~45 us on 2 cores, docs/benchmarks.md "machinery").
CHEAP_CALL: Final = 20e-6

#: Calls observed in the pool before a class is judged (and per later judgement).
OBSERVED_CALLS: Final = 16

#: Cheap calls out of :data:`OBSERVED_CALLS` needed to run a class inline. One slow call
#: is tolerated: a worker thread can be kept from the interpreter lock mid-call.
CHEAP_NEEDED: Final = 15

#: An inline call longer than this (seconds) blocked the loop: its class goes back to
#: the pool. It is above CPython's thread switch interval (5 ms, ``sys.getswitchinterval``)
#: so that a call interrupted once by another thread is not taken for a blocking one.
STALL_BOUND: Final = 0.010

# Where an agent ran, as shown in reports.
INLINE: Final = "inline"
POOL: Final = "thread pool"
EVENT_LOOP: Final = "event loop"
HOME_LOOP: Final = "home loop"


@dataclasses.dataclass(frozen=True, slots=True)
class Placement:
    """Where the agents of one class ran in a step, and why.

    Attributes:
        agent_class: The class's qualified name.
        where: ``"inline"`` (called on the event loop's thread, or in the calling
            thread), ``"thread pool"``, ``"event loop"`` (awaited there) or
            ``"home loop"`` (threading mode: an async-only agent on its model's loop).
        agents: How many of the class's agents started there in this step.
        reason: Why, in a few words (the rule or the measurement that decided it).
    """

    agent_class: str
    where: str
    agents: int
    reason: str


class ClassRecord:
    """What parallel steps have measured about one agent class's sync method.

    Read and written from the loop thread and from worker threads without a lock: a
    lost update only delays a decision by a few calls.
    """

    __slots__ = (
        "__weakref__",
        "cheap",
        "inline",
        "name",
        "observed",
        "reason",
        "stalled",
        "uses_turns",
    )

    def __init__(self, cls: type) -> None:
        self.name = cls.__qualname__
        self.observed = 0  # calls timed in the pool since the last judgement
        self.cheap = 0  # of which under CHEAP_CALL
        self.inline = False
        self.stalled = False
        self.uses_turns = _mentions_in_turn(cls)
        self.reason = (
            "its methods call in_turn" if self.uses_turns else "being observed in the pool"
        )

    def observe(self, seconds: float) -> None:
        """Count one call timed in a worker thread; judge the class every 16 calls."""
        self.observed += 1
        if seconds < CHEAP_CALL:
            self.cheap += 1
        if self.observed < OBSERVED_CALLS:
            return
        cheap, observed = self.cheap, self.observed
        self.observed = self.cheap = 0
        if self.uses_turns or self.stalled:
            return
        if cheap >= CHEAP_NEEDED:
            self.inline = True
            self.reason = (
                f"{cheap} of {observed} calls in the pool took < {CHEAP_CALL * 1e6:.0f} us, "
                "less than the hop to a thread"
            )
        else:
            self.reason = (
                f"{observed - cheap} of {observed} calls took >= {CHEAP_CALL * 1e6:.0f} us"
            )

    def stall(self, seconds: float) -> None:
        """An inline call blocked the loop for ``seconds``: back to the pool for good."""
        self.inline = False
        self.stalled = True
        self.reason = (
            f"an inline call blocked the event loop for {seconds * 1000:.1f} ms "
            f"(> {STALL_BOUND * 1000:.0f} ms)"
        )

    def loop_refused(self) -> None:
        """An inline call failed because it runs an event loop itself: back to the pool."""
        self.inline = False
        self.stalled = True
        self.reason = (
            "an inline call failed: it runs an event loop itself (asyncio.run, "
            "run_until_complete), which needs a thread without a running loop"
        )

    def turns_seen(self) -> None:
        """An agent of the class called ``in_turn``: never inline again."""
        if not self.uses_turns:
            self.uses_turns = True
            self.inline = False
            self.reason = "its agents call in_turn"


_records: weakref.WeakKeyDictionary[type, dict[str, ClassRecord]] = weakref.WeakKeyDictionary()
_turn_users: weakref.WeakSet[type] = weakref.WeakSet()  # classes seen calling in_turn
_records_lock = threading.Lock()


def record_for(cls: type, method: str = "step") -> ClassRecord:
    """The record of method ``method`` of agent class ``cls``, made on first use."""
    per_class = _records.get(cls)
    record = per_class.get(method) if per_class is not None else None
    if record is None:
        with _records_lock:
            per_class = _records.setdefault(cls, {})
            record = per_class.get(method)
            if record is None:
                record = per_class[method] = ClassRecord(cls)
                if cls in _turn_users:
                    record.turns_seen()
    return record


def known_record(cls: type, method: str = "step") -> ClassRecord | None:
    """The record of ``cls``'s ``method`` if a step has made one."""
    per_class = _records.get(cls)
    return per_class.get(method) if per_class is not None else None


def note_in_turn(agent: Any) -> None:
    """Called by ``in_turn``: the agent's class is kept off the loop from now on."""
    cls = type(agent)
    with _records_lock:
        _turn_users.add(cls)
        records = list(_records.get(cls, {}).values())
    for record in records:
        record.turns_seen()


def forget() -> None:
    """Drop every class's measurements (each class starts in the pool again)."""
    with _records_lock:
        _records.clear()
        _turn_users.clear()


#: What asyncio raises when a loop is started in a thread that already runs one.
_OWN_LOOP_ERRORS = (
    "cannot be called from a running event loop",  # asyncio.run
    "Cannot run the event loop while another loop is running",  # run_until_complete
)


def needs_own_loop(error: BaseException) -> bool:
    """Whether ``error`` says the call tried to run an event loop of its own."""
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _OWN_LOOP_ERRORS)


def full_collections() -> int:
    """How many full (oldest-generation) garbage collections the process has run."""
    return gc.get_stats()[-1]["collections"]


def _mentions_in_turn(cls: type) -> bool:
    """Whether a function defined on ``cls`` (or a base below Mesa's) names ``in_turn``."""
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] in ("mesa", "builtins"):
            continue
        for value in vars(klass).values():
            function = inspect.unwrap(value) if callable(value) else value
            if isinstance(function, staticmethod | classmethod):
                function = function.__func__
            code = getattr(function, "__code__", None)
            if isinstance(code, types.CodeType) and _code_names(code, "in_turn"):
                return True
    return False


def _code_names(code: types.CodeType, name: str) -> bool:
    if name in code.co_names:
        return True
    return any(
        isinstance(const, types.CodeType) and _code_names(const, name) for const in code.co_consts
    )


def _reset_after_fork() -> None:
    global _records_lock  # noqa: PLW0603 - a lock no thread of the child holds
    _records_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)
