"""A start-rate limiter shared by every parallel step of the process.

Starts are spaced at least ``1 / rate`` seconds apart: the limiter hands out start
times one after another and never lets unused time accumulate, so there are no bursts
above the rate, even right after an idle period or across back-to-back steps.
"""

from __future__ import annotations

import threading
import time

__all__ = ["StartRateLimiter", "limiter"]


class StartRateLimiter:
    """Hands out evenly spaced start times (thread-safe)."""

    __slots__ = ("_lock", "_next")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0.0

    def reserve(self, rate: float) -> float:
        """Reserve the next start slot at ``rate`` starts per second; return the wait in seconds."""
        now = time.monotonic()
        with self._lock:
            start = max(now, self._next)
            self._next = start + 1.0 / rate
        return start - now


#: The process-wide limiter used when ``settings.rate_limit`` is set.
limiter = StartRateLimiter()
