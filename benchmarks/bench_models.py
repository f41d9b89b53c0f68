"""The agents and the model the latency and machinery scenarios step.

A "latency" agent stands for an agent waiting on a language model: it sleeps for
:data:`LATENCY` seconds, asynchronously (``astep``) or in a blocking call (``step``).
A "trivial" agent does nothing, so that a step measures only the stepping machinery.
"""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar

import mesa

__all__ = [
    "LATENCY",
    "AsyncSleepAgent",
    "AsyncTrivialAgent",
    "BenchModel",
    "SyncSleepAgent",
    "SyncTrivialAgent",
]

#: Simulated language-model latency per agent and step, in seconds.
LATENCY = 0.05


class AsyncSleepAgent(mesa.Agent):
    """Awaits :data:`LATENCY` seconds in ``astep`` (asyncio mode)."""

    #: How many ``astep`` calls have finished, to check that they really ran.
    awaited: ClassVar[int] = 0

    async def astep(self) -> None:
        await asyncio.sleep(LATENCY)
        AsyncSleepAgent.awaited += 1


class SyncSleepAgent(mesa.Agent):
    """Blocks for :data:`LATENCY` seconds in ``step`` (threading mode, sequential)."""

    def step(self) -> None:
        time.sleep(LATENCY)


class AsyncTrivialAgent(mesa.Agent):
    """An ``astep`` that does nothing (asyncio machinery)."""

    async def astep(self) -> None:
        pass


class SyncTrivialAgent(mesa.Agent):
    """A ``step`` that does nothing (threading machinery)."""

    def step(self) -> None:
        pass


class BenchModel(mesa.Model):
    """``n`` agents of one class; ``step`` is ``self.agents.shuffle_do("step")``."""

    def __init__(self, agent_class: type[mesa.Agent], n: int, *, parallel: bool, seed: int = 42):
        super().__init__(rng=seed)
        self.parallel_stepping = parallel
        agent_class.create_agents(self, n)

    def step(self) -> None:
        self.agents.shuffle_do("step")
