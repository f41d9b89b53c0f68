"""Code written for ``mesa_llm.parallel_stepping``, with only the import changed.

mesa-llm's documentation enables parallel stepping in the model's constructor and
offers manual control over lists of agents. The same code, importing from
``mesa_llm_parallel.parallel_stepping``, steps LLMAgents against the loopback server.
"""

from __future__ import annotations

import asyncio

import mesa
import pytest
from llm_support import Citizen, Cop, Voter

import mesa_llm_parallel as mlp
from mesa_llm_parallel.parallel_stepping import (
    disable_automatic_parallel_stepping,
    enable_automatic_parallel_stepping,
    step_agents_multithreaded,
    step_agents_parallel,
    step_agents_parallel_sync,
)


class Neighbourhood(mesa.Model):
    """Enables parallel stepping itself, as mesa-llm's examples do."""

    def __init__(self, api_base: str, citizens: int, cops: int, mode: str) -> None:
        super().__init__(rng=7)
        self.parallel_stepping = True
        enable_automatic_parallel_stepping(mode=mode)
        for _ in range(citizens):
            Citizen(self, api_base)
        for _ in range(cops):
            Cop(self, api_base)

    def step(self) -> None:
        self.agents.shuffle_do("step")


class ByType(Neighbourhood):
    """Steps each agent type on its own, one type after the other."""

    def step(self) -> None:
        citizens = [a for a in self.agents if isinstance(a, Citizen)]
        cops = [a for a in self.agents if isinstance(a, Cop)]
        step_agents_parallel_sync(citizens)
        step_agents_parallel_sync(cops)


def _methods(model: mesa.Model) -> set[str]:
    return {method for agent in model.agents for method, *_ in agent.replies}


@pytest.mark.parametrize(("mode", "method"), [("asyncio", "astep"), ("threading", "step")])
def test_enable_in_the_model_constructor(server, mode, method):
    model = Neighbourhood(server.base_url, 6, 4, mode)
    model.step()
    stats = server.stats()
    assert (stats.requests, stats.peak_concurrency) == (10, 10)
    assert _methods(model) == {method}
    assert all(len(agent.replies) == 1 for agent in model.agents)
    disable_automatic_parallel_stepping()
    assert not mlp.is_automatic_parallel_stepping_enabled()


def test_manual_stepping_of_each_agent_type(server):
    model = ByType(server.base_url, 6, 4, "threading")
    model.step()
    stats = server.stats()
    # The six citizens overlapped, then the four cops: never more than six at once.
    assert (stats.requests, stats.peak_concurrency) == (10, 6)
    # step_agents_parallel_sync always uses asyncio mode: astep, whatever the mode.
    assert _methods(model) == {"astep"}
    report = mlp.last_step_report(model)
    assert (report.agents, report.completed) == (4, 4)  # the cops' step came last


def test_awaiting_step_agents_parallel_in_async_code(server):
    model = mesa.Model(rng=1)
    agents = [Voter(model, server.base_url) for _ in range(8)]

    async def main() -> None:  # an async script or a notebook cell with top-level await
        await step_agents_parallel(agents)
        await step_agents_parallel(agents)

    asyncio.run(main())
    stats = server.stats()
    assert (stats.requests, stats.peak_concurrency) == (16, 8)
    assert all([m for m, *_ in a.replies] == ["astep", "astep"] for a in agents)


def test_step_agents_multithreaded(server):
    model = mesa.Model(rng=1)
    agents = [Voter(model, server.base_url) for _ in range(8)]
    step_agents_multithreaded(agents)
    stats = server.stats()
    assert (stats.requests, stats.peak_concurrency) == (8, 8)
    assert all([m for m, *_ in a.replies] == ["step"] for a in agents)
