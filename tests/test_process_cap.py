"""max_concurrency holds for the whole process: every step of every model at once."""

from __future__ import annotations

import asyncio
import threading
import time

import mesa
import pytest
from mesa.agent import AgentSet
from support import create_agents

import mesa_llm_parallel as mlp
from mesa_llm_parallel._permits import permits


class Gauge:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


GAUGE = Gauge()


class Caller(mesa.Agent):
    def step(self) -> None:
        GAUGE.enter()
        try:
            time.sleep(0.01)
        finally:
            GAUGE.leave()


class AsyncCaller(mesa.Agent):
    async def astep(self) -> None:
        GAUGE.enter()
        try:
            await asyncio.sleep(0.01)
        finally:
            GAUGE.leave()


class Crowd(mesa.Model):
    def __init__(self, agent_class: type, n: int) -> None:
        super().__init__(rng=1)
        self.parallel_stepping = True
        create_agents(agent_class, self, n)

    def step(self) -> None:
        self.agents.shuffle_do("step")


@pytest.fixture(autouse=True)
def fresh_gauge():
    GAUGE.now = GAUGE.peak = 0
    yield
    assert permits.held == 0


@pytest.mark.parametrize("mode", ["asyncio", "threading"])
@pytest.mark.parametrize("agent_class", [Caller, AsyncCaller])
def test_four_models_stepping_at_once_share_one_cap(mode, agent_class):
    mlp.enable_automatic_parallel_stepping(mode=mode, max_concurrency=5, loop="background")
    models = [Crowd(agent_class, 30) for _ in range(4)]
    threads = [threading.Thread(target=m.step) for m in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert GAUGE.peak == 5  # never more, across the four steps (it was 11 with per-step caps)
    for model in models:
        report = mlp.last_step_report(model)
        assert report.completed == 30
        assert report.peak_in_flight <= 5


class Parent(mesa.Agent):
    """Steps its own sub-agents from inside its step (a blocking nested step)."""

    def __init__(self, model: mesa.Model) -> None:
        super().__init__(model)
        self.subs = AgentSet([AsyncCaller(model) for _ in range(3)], random=model.random)

    def step(self) -> None:
        self.subs.shuffle_do("step")


class Family(mesa.Model):
    def __init__(self) -> None:
        super().__init__(rng=2)
        self.parallel_stepping = True
        create_agents(Parent, self, 6)

    def step(self) -> None:
        self.agents.select(agent_type=Parent).shuffle_do("step")


@pytest.mark.parametrize("mode", ["asyncio", "threading"])
def test_nested_steps_never_deadlock_under_a_cap_smaller_than_the_outer_agents(mode):
    mlp.enable_automatic_parallel_stepping(mode=mode, max_concurrency=2)
    model = Family()
    done = threading.Event()
    thread = threading.Thread(target=lambda: (model.step(), done.set()), daemon=True)
    thread.start()
    assert done.wait(60), "a nested step deadlocked under the process-wide cap"
    assert mlp.last_step_report(model).completed == 6


@pytest.mark.parametrize("mode", ["asyncio", "threading"])
def test_a_timed_out_call_still_running_in_its_thread_keeps_its_permit(mode):
    finished = threading.Event()
    saw: list[bool] = []

    class Slow(mesa.Agent):
        def step(self) -> None:
            time.sleep(0.3)  # overruns the timeout; its thread cannot be stopped
            finished.set()

    class Next(mesa.Agent):
        def step(self) -> None:
            saw.append(finished.is_set())

    mlp.enable_automatic_parallel_stepping(
        mode=mode, max_concurrency=1, timeout=0.05, on_error="collect", run_sync_inline=False
    )
    model = mesa.Model(rng=1)
    agents = [Slow(model), Next(model)]
    if mode == "asyncio":
        mlp.step_agents_parallel_sync(agents)
    else:
        mlp.step_agents_multithreaded(agents)
    report = mlp.last_step_report(model)
    assert [f.timed_out for f in report.failures] == [True]
    # The call was still in flight at the server: the next agent waited for it to end.
    assert saw == [True]


@pytest.mark.parametrize("mode", ["asyncio", "threading"])
def test_models_stepping_at_once_under_a_cap_and_a_rate_limit_all_finish(mode):
    mlp.enable_automatic_parallel_stepping(
        mode=mode, max_concurrency=3, rate_limit=80.0, loop="background"
    )
    models = [Crowd(AsyncCaller, 12) for _ in range(3)]
    threads = [threading.Thread(target=m.step, daemon=True) for m in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a step hung"
    assert GAUGE.peak <= 3
    assert [mlp.last_step_report(m).completed for m in models] == [12, 12, 12]
