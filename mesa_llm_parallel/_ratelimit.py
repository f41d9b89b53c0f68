"""A start-rate limiter shared by every parallel step of the process.

Starts are spaced at least ``1 / rate`` seconds apart: the limiter hands out start
times (*slots*) one after another and never lets unused time accumulate, so there are
no bursts above the rate, even right after an idle period or across back-to-back steps.

A slot is reserved before its holder waits for it, and is then either used (an agent
starts) or given back (the step stopped, or was interrupted, while its holder waited).
A given-back slot is handed to the next reservation that can still reach it, so an
interrupted step never charges the next one for agents that did not start.
"""

from __future__ import annotations

import bisect
import math
import os
import threading
import time
from typing import Any

__all__ = ["StartRateLimiter", "limiter"]


class StartRateLimiter:
    """Hands out evenly spaced start times (thread-safe)."""

    __slots__ = ("_lock", "_next", "_returned", "shared")

    def __init__(self) -> None:
        #: While a batch run's processes share one quota, their schedule: reservations
        #: go there instead (see :mod:`mesa_llm_parallel._shared`).
        self.shared: Any = None
        self._lock = threading.Lock()
        self._next = 0.0  # the first slot after every slot handed out
        self._returned: list[float] = []  # given-back slots before _next, sorted

    def reserve(self, rate: float) -> tuple[float, float]:
        """Reserve the next start slot at ``rate`` starts per second.

        Returns:
            ``(slot, wait)``: the slot (a :func:`time.monotonic` time), to pass to
            :meth:`give_back` if it is not used, and the seconds to wait for it.
        """
        if (shared := self.shared) is not None:
            return shared.reserve(rate)  # type: ignore[no-any-return]
        now = time.monotonic()
        with self._lock:
            returned = self._returned
            if returned:
                # Slots given back in the past are gone: using one now could start two
                # agents closer together than 1 / rate.
                del returned[: bisect.bisect_left(returned, now)]
            if returned:
                slot = returned.pop(0)
            else:
                slot = max(now, self._next)
                self._next = slot + 1.0 / rate
        return slot, slot - now

    def give_back(self, slot: float, rate: float) -> None:
        """Return an unused ``slot`` from :meth:`reserve` (made at the same ``rate``)."""
        if (shared := self.shared) is not None:
            shared.give_back(slot, rate)
            return
        interval = 1.0 / rate
        with self._lock:
            returned = self._returned
            if math.isclose(slot + interval, self._next, rel_tol=0.0, abs_tol=1e-9):
                # The latest slot: the schedule moves back, past every slot given back
                # just before it too.
                self._next = slot
                while returned and math.isclose(
                    returned[-1] + interval, self._next, rel_tol=0.0, abs_tol=1e-9
                ):
                    self._next = returned.pop()
            elif slot < self._next:
                bisect.insort(returned, slot)

    def _reset_after_fork(self) -> None:
        self.shared = None
        self._lock = threading.Lock()


#: The process-wide limiter used when ``settings.rate_limit`` is set.
limiter = StartRateLimiter()

# A forked child keeps the schedule (it shares the parent's quota) with a lock no
# parent thread can be holding.
os.register_at_fork(after_in_child=limiter._reset_after_fork)
