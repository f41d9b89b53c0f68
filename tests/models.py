"""Small real Mesa models used across the tests (no mocks of Mesa)."""

from __future__ import annotations

import asyncio
import threading
import time

import mesa


class InFlight:
    """Counts how many agents are inside their step at once (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.starts: list[int] = []
        self.threads: set[int] = set()

    def enter(self, agent: mesa.Agent) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.starts.append(agent.unique_id)
            self.threads.add(threading.get_ident())

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


class AsyncAgent(mesa.Agent):
    """Waits like an LLM call in ``astep``; also draws from the model's RNG first."""

    def __init__(self, model: mesa.Model, delay: float = 0.0) -> None:
        super().__init__(model)
        self.delay = delay
        self.calls: list[tuple] = []
        self.draw: float | None = None

    async def astep(self, *args, **kwargs) -> None:
        self.model.tracker.enter(self)
        self.calls.append((args, kwargs))
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.model.tracker.leave()


class SyncAgent(mesa.Agent):
    """Blocks like a sync LLM client in ``step``."""

    def __init__(self, model: mesa.Model, delay: float = 0.0) -> None:
        super().__init__(model)
        self.delay = delay
        self.calls: list[tuple] = []

    def step(self, *args, **kwargs) -> None:
        self.model.tracker.enter(self)
        self.calls.append((args, kwargs))
        try:
            if self.delay:
                time.sleep(self.delay)
        finally:
            self.model.tracker.leave()


class BothAgent(SyncAgent):
    """Has both ``step`` and ``astep``; records which one ran."""

    ran: str | None = None

    def step(self, *args, **kwargs) -> None:
        self.ran = "step"
        super().step(*args, **kwargs)

    async def astep(self, *args, **kwargs) -> None:
        self.ran = "astep"
        self.model.tracker.enter(self)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.model.tracker.leave()


class ToyModel(mesa.Model):
    """A model of ``n`` agents of ``agent_cls`` that steps them with shuffle_do."""

    def __init__(
        self,
        n: int = 20,
        agent_cls: type[mesa.Agent] = AsyncAgent,
        *,
        seed: int = 42,
        parallel: bool | None = True,
        delay: float = 0.0,
    ) -> None:
        super().__init__(rng=seed)
        if parallel is not None:
            self.parallel_stepping = parallel
        self.tracker = InFlight()
        for _ in range(n):
            agent_cls(self, delay=delay)

    def step(self) -> None:
        self.agents.shuffle_do("step")
