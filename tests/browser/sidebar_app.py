"""A minimal SolaraViz app with the panel as a sidebar card (for the browser tests)."""

from __future__ import annotations

import asyncio
import weakref

import mesa
from mesa.visualization import SolaraViz

import mesa_llm_parallel as mlp
from mesa_llm_parallel.visualization import ParallelSteppingSidebar

latest: weakref.ref[Tiny] | None = None


class Waiter(mesa.Agent):
    async def astep(self) -> None:
        await asyncio.sleep(0.01)


class Tiny(mesa.Model):
    def __init__(self, n: int = 10, rng: int | None = 1) -> None:
        global latest  # a weak reference, for the test
        super().__init__(rng=rng)
        self.parallel_stepping = True
        mlp.enable_automatic_parallel_stepping()
        Waiter.create_agents(self, n)
        latest = weakref.ref(self)

    def step(self) -> None:
        self.agents.shuffle_do("step")


page = SolaraViz(Tiny(), components=[ParallelSteppingSidebar], model_params={"n": 10})
