"""The cyclic garbage collector during large parallel steps.

A parallel step of ``n`` agents allocates a few container objects per agent in flight
(its task, coroutine, context, timer handle, future) that live until the agent ends.
With CPython's default first threshold (700 net allocations), a step of 100,000 agents
triggers about eight full collections, each of which scans the whole heap: the model's
agents, their dicts, the step's own objects. Measured on 2 cores (docs/benchmarks.md,
"Where a 100,000-agent step spends its time"): about 60% of such a step is the collector
(the same share for a bare ``asyncio.gather`` of the same coroutines).

While at least one parallel step of more than :data:`SCALE_FROM` agents runs, the
collector's first threshold is raised to the number of agents of the largest such step
(never lowered), so the collector runs about as often per agent as it would for a small
step. It still runs, reference counting still frees everything acyclic at once, and
the previous thresholds are restored when the last such step ends, unless someone else
changed them meanwhile (then theirs stay). Nothing happens when automatic collection is
off (``gc.disable()``, or a first threshold of 0).
"""

from __future__ import annotations

import gc
import os
import threading
from typing import Final

__all__ = ["SCALE_FROM", "scaled_collector"]

#: Steps of at most this many agents leave the collector alone (its default first
#: threshold: ``gc.get_threshold()[0]`` in CPython 3.12 and 3.13).
SCALE_FROM: Final = 700

_lock = threading.Lock()
_depth = 0  # large steps running now
_saved: tuple[int, ...] | None = None  # the thresholds before the first of them
_ours: tuple[int, ...] | None = None  # the thresholds we set


class scaled_collector:  # noqa: N801 - a context manager, used like a function
    """Raise the collector's first threshold to ``n`` for the duration of a step."""

    __slots__ = ("_active", "_n")

    def __init__(self, n: int) -> None:
        self._n = n
        self._active = False

    def __enter__(self) -> None:
        global _depth, _saved, _ours  # noqa: PLW0603 - process-wide, as the collector is
        if self._n <= SCALE_FROM or not gc.isenabled():
            return
        with _lock:
            current = gc.get_threshold()
            if current[0] == 0:
                return
            if _depth == 0:
                _saved = current
            elif current != _ours:
                return  # someone else changed them while our steps run: leave them
            if self._n > current[0]:
                _ours = (self._n, *current[1:])
                gc.set_threshold(*_ours)
            else:
                _ours = current
            _depth += 1
            self._active = True

    def __exit__(self, *exc: object) -> None:
        global _depth, _saved, _ours  # noqa: PLW0603
        if not self._active:
            return
        self._active = False
        with _lock:
            _depth -= 1
            if _depth == 0:
                if gc.get_threshold() == _ours and _saved is not None:
                    gc.set_threshold(*_saved)
                _saved = _ours = None


def _reset_after_fork() -> None:
    global _lock, _depth, _saved, _ours  # noqa: PLW0603
    # The child has no steps running: put back what the parent had before them.
    if _depth and _saved is not None and gc.get_threshold() == _ours:
        gc.set_threshold(*_saved)
    _lock = threading.Lock()
    _depth = 0
    _saved = _ours = None


os.register_at_fork(after_in_child=_reset_after_fork)
