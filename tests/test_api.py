"""The public API: drop-in names, manual stepping, ashuffle_do, failures, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import mesa
import pytest
from models import AsyncAgent, SyncAgent, ToyModel

import mesa_llm_parallel as mlp
from mesa_llm_parallel import parallel_stepping

DROP_IN_NAMES = [
    "enable_automatic_parallel_stepping",
    "disable_automatic_parallel_stepping",
    "step_agents_parallel",
    "step_agents_parallel_sync",
    "step_agents_multithreaded",
]


@pytest.mark.parametrize("name", DROP_IN_NAMES)
def test_drop_in_names_are_exported_from_both_places(name):
    assert getattr(parallel_stepping, name) is getattr(mlp, name)
    assert name in parallel_stepping.__all__
    assert name in mlp.__all__


def test_code_written_for_the_existing_api_runs_in_parallel():
    # Shaped like the existing implementation's documented example.
    from mesa_llm_parallel.parallel_stepping import enable_automatic_parallel_stepping

    class MyModel(mesa.Model):
        def __init__(self):
            super().__init__()
            self.tracker = ToyModel(0).tracker
            self.parallel_stepping = True
            enable_automatic_parallel_stepping(mode="asyncio")
            for _ in range(30):
                agent = AsyncAgent(self, delay=0.02)
                self.agents.add(agent)

        def step(self):
            self.agents.shuffle_do("step")

    model = MyModel()
    model.step()
    assert model.tracker.peak == 30
    assert len(model.tracker.starts) == 30


def test_step_agents_parallel_sync_with_agent_lists():
    model = ToyModel(12, AsyncAgent, parallel=None, delay=0.01)
    agents = list(model.agents)
    evens, odds = agents[::2], agents[1::2]
    assert mlp.step_agents_parallel_sync(evens) is None
    mlp.step_agents_parallel_sync(odds, "step", 5, flag=True)
    assert model.tracker.starts == [a.unique_id for a in evens + odds]  # given order
    assert model.tracker.peak == 6
    assert all(a.calls == [((5,), {"flag": True})] for a in odds)


def test_step_agents_multithreaded_runs_in_pool_threads():
    mlp.settings.max_workers = 4
    model = ToyModel(8, SyncAgent, parallel=None, delay=0.01)
    mlp.step_agents_multithreaded(model.agents)
    assert model.tracker.peak == 4
    assert threading.get_ident() not in model.tracker.threads


def test_manual_functions_work_without_enable_and_without_the_flag():
    assert not mlp.is_automatic_parallel_stepping_enabled()
    model = ToyModel(5, AsyncAgent, parallel=False, delay=0.01)
    mlp.step_agents_parallel_sync(model.agents)
    assert model.tracker.peak == 5


def test_step_agents_parallel_awaits_on_the_running_loop():
    model = ToyModel(10, AsyncAgent, parallel=None, delay=0.01)

    async def main():
        await mlp.step_agents_parallel(model.agents, "step", "a")
        return asyncio.get_running_loop()

    asyncio.run(main())
    assert model.tracker.peak == 10
    assert all(a.calls == [(("a",), {})] for a in model.agents)


@pytest.mark.parametrize("kind", ["model.agents", "select"])
def test_ashuffle_do_shuffles_like_mesa_and_returns_the_set(kind):
    sequential = ToyModel(20, SyncAgent, seed=5, parallel=False)
    sequential.agents.shuffle_do("step")
    model = ToyModel(20, AsyncAgent, seed=5, parallel=False)
    agents = model.agents if kind == "model.agents" else model.agents.select()

    async def main():
        result = await mlp.ashuffle_do(agents, "step", k=1)
        return result, mlp.last_loop_path()

    found = []
    thread = threading.Thread(target=lambda: found.append(asyncio.run(main())))
    thread.start()
    thread.join()
    assert found[0] == (agents, None)  # the set, and no loop was nested or started
    assert model.tracker.starts == sequential.tracker.starts
    assert model.random.random() == sequential.random.random()
    assert model.tracker.peak == 20


def test_ashuffle_do_rejects_a_plain_list():
    model = ToyModel(2)
    with pytest.raises(TypeError, match="list"):
        asyncio.run(mlp.ashuffle_do(list(model.agents)))


class Failing(mesa.Agent):
    """Fails when its id is in the model's ``fail_ids``, once every agent has started."""

    def __init__(self, model, delay=0.0):
        super().__init__(model)
        self.finished = False

    async def astep(self):
        model = self.model
        with model.tracker.lock:
            model.started += 1
            if model.started == len(model.agents):
                model.all_started.set()
        if self.unique_id in model.fail_ids:
            # A threading.Event: the siblings may be on other threads.
            while not model.all_started.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            raise model.error_type(f"agent {self.unique_id} failed")
        await asyncio.sleep(0.01)
        self.finished = True

    def step(self):
        asyncio.run(self.astep())


def _failing_model(fail_ids, error_type=ValueError, n=10):
    model = ToyModel(n, Failing)
    model.error_type = error_type
    model.fail_ids = set(fail_ids)
    model.started = 0
    model.all_started = threading.Event()
    return model


@pytest.mark.parametrize("mode", ["asyncio", "threading"])
@pytest.mark.parametrize("error_type", [ValueError, RuntimeError, KeyError])
def test_one_failing_agent_does_not_cancel_the_others(mode, error_type):
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=32)
    model = _failing_model({3, 7}, error_type)
    with pytest.raises(error_type) as info:
        model.step()
    finished = {a.unique_id for a in model.agents if a.finished}
    assert finished == {a.unique_id for a in model.agents} - {3, 7}  # every sibling finished
    assert "1 more agent(s) failed" in "".join(getattr(info.value, "__notes__", []))
    if error_type is RuntimeError:
        assert "event loop" not in str(info.value)


@pytest.mark.parametrize("mode", ["asyncio", "threading"])
def test_first_failure_is_the_earliest_started_not_the_earliest_raised(mode):
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=16)

    class LateFirst(mesa.Agent):
        """Every agent fails; the earlier an agent starts, the later it raises."""

        def __init__(self, model, delay=0.0):
            super().__init__(model)

        def step(self):
            self.model.tracker.enter(self)
            position = len(self.model.tracker.starts)
            time.sleep(0.005 * (9 - position))
            raise ValueError(f"agent {self.unique_id} failed")

    sequential = ToyModel(8, SyncAgent, parallel=False)
    sequential.step()
    model = ToyModel(8, LateFirst)
    with pytest.raises(ValueError, match=f"agent {sequential.tracker.starts[0]} failed") as info:
        model.step()
    # Agents are handed out in the shuffled order; in threads, the moment each one
    # reaches its own code may swap neighbours, so the order is compared as handed out.
    assert sorted(model.tracker.starts) == sorted(sequential.tracker.starts)
    first = sequential.tracker.starts[0]
    assert str(info.value) == f"agent {first} failed"
    assert [f.agent.unique_id for f in info.value.mesa_llm_parallel_failures] == (
        sequential.tracker.starts
    )


def test_after_a_failure_the_next_step_runs_every_agent():
    mlp.enable_automatic_parallel_stepping()
    model = _failing_model({2}, n=6)
    with pytest.raises(ValueError, match="agent 2"):
        model.agents.shuffle_do("step")
    model.fail_ids = set()
    model.started = 0
    for agent in model.agents:
        agent.finished = False
    model.agents.shuffle_do("step")
    assert all(a.finished for a in model.agents)


def test_shutdown_releases_threads_and_steps_work_afterwards():
    mlp.enable_automatic_parallel_stepping(mode="threading", max_workers=6)
    mlp.shutdown()
    baseline = threading.active_count()
    model = ToyModel(12, SyncAgent, delay=0.005)
    model.step()
    assert threading.active_count() > baseline
    mlp.shutdown()
    assert threading.active_count() <= baseline
    model.step()
    assert len(model.tracker.starts) == 24
    mlp.shutdown()


def test_none_passed_to_enable_means_what_it_means_in_the_settings():
    mlp.enable_automatic_parallel_stepping(max_concurrency=5, max_workers=8)
    mlp.enable_automatic_parallel_stepping(mode="threading")  # not given: unchanged
    assert (mlp.settings.max_concurrency, mlp.settings.max_workers) == (5, 8)
    mlp.enable_automatic_parallel_stepping(max_concurrency=None, max_workers=None)
    assert mlp.settings.max_concurrency is None  # None: no cap, as settings.max_concurrency
    assert mlp.settings.max_workers == mlp.DEFAULT_MAX_WORKERS  # None: the default
    assert repr(mlp.NOT_GIVEN) == "NOT_GIVEN"


def test_one_model_is_switched_and_asked_about_through_the_public_api():
    model = mesa.Model(rng=1)
    other = mesa.Model(rng=2)
    assert not mlp.wants_parallel_stepping(model)
    assert not mlp.steps_in_parallel(model)
    mlp.settings.mode = "threading"
    mlp.set_parallel_stepping(model, True)  # installs the patch, keeps the mode
    assert mlp.is_automatic_parallel_stepping_enabled()
    assert mlp.settings.mode == "threading"
    assert mlp.steps_in_parallel(model)
    assert not mlp.steps_in_parallel(other)
    mlp.settings.parallel_by_default = True  # a model without the attribute follows it
    assert mlp.steps_in_parallel(other)
    mlp.set_parallel_stepping(model, False)  # this model only: the patch stays
    assert not mlp.steps_in_parallel(model)
    assert mlp.is_automatic_parallel_stepping_enabled()
    mlp.set_parallel_stepping(model, True)
    mlp.disable_automatic_parallel_stepping()
    assert mlp.wants_parallel_stepping(model)  # it asks, but nothing is patched
    assert not mlp.steps_in_parallel(model)
    with pytest.raises(TypeError, match="True or False, got 'yes'"):
        mlp.set_parallel_stepping(model, "yes")


@pytest.mark.parametrize("function", ["set_parallel_stepping", "wants_parallel_stepping"])
def test_the_one_model_functions_refuse_what_is_not_a_model(function):
    call = getattr(mlp, function)
    model = mesa.Model(rng=1)
    agent = mesa.Agent(model)
    extra = (True,) if function == "set_parallel_stepping" else ()
    for wrong in (None, "model"):
        with pytest.raises(TypeError, match=rf"{function}: model must be a Mesa model"):
            call(wrong, *extra)
    with pytest.raises(TypeError, match=r"got Agent \(an agent: pass agent.model\)"):
        call(agent, *extra)
    assert not hasattr(agent, "parallel_stepping")  # nothing half-applied
    with pytest.raises(TypeError, match="steps_in_parallel: model must be a Mesa model"):
        mlp.steps_in_parallel("model")


@pytest.mark.parametrize(
    "function", ["step_agents_parallel_sync", "step_agents_multithreaded", "step_agents_parallel"]
)
def test_the_manual_functions_name_the_usual_mix_ups(function):
    call = getattr(mlp, function)
    model = mesa.Model(rng=1)

    def run(*args):
        result = call(*args)
        if asyncio.iscoroutine(result):
            asyncio.run(result)

    with pytest.raises(TypeError, match=rf"{function}: agents must be agents, got a model"):
        run(model)
    with pytest.raises(TypeError, match=rf"{function}: agents must be an iterable of agents"):
        run(3)
    with pytest.raises(TypeError, match=rf"{function}: method must be a method name .* got int"):
        run(model.agents, 5)


def test_ashuffle_do_checks_its_method():
    model = mesa.Model(rng=1)
    with pytest.raises(TypeError, match=r"ashuffle_do: method must be a method name"):
        asyncio.run(mlp.ashuffle_do(model.agents, 5))
