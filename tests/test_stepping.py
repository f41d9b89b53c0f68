"""Parallel steps on real Mesa models: order, randomness, arguments, skips, caps, loops."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import mesa
import pytest
from models import AsyncAgent, BothAgent, SyncAgent, ToyModel
from support import agent_set_classes

import mesa_llm_parallel as mlp
from mesa_llm_parallel import _loops, _pool
from mesa_llm_parallel._engine import Step

AgentSet, _HardKeyAgentSet = agent_set_classes()

MODES = ["asyncio", "threading"]


def _agent_set(model: mesa.Model, kind: str):
    """The three kinds of set a model's step may use."""
    if kind == "model.agents":
        return model.agents
    if kind == "agents_by_type":
        return model.agents_by_type[type(next(iter(model.agents)))]
    return model.agents.select()  # a weak AgentSet


SET_KINDS = ["model.agents", "agents_by_type", "select"]


@pytest.mark.mesa_min("3.5", why="model.agents is its own class, _HardKeyAgentSet")
def test_the_sets_are_the_two_classes():
    model = ToyModel(3)
    assert type(_agent_set(model, "model.agents")) is _HardKeyAgentSet
    assert type(_agent_set(model, "agents_by_type")) is _HardKeyAgentSet
    assert type(_agent_set(model, "select")) is AgentSet


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", SET_KINDS)
@pytest.mark.parametrize("agent_cls", [AsyncAgent, SyncAgent])
def test_every_agent_steps_once_concurrently_and_set_is_returned(mode, kind, agent_cls):
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=8)
    model = ToyModel(12, agent_cls, delay=0.02)
    agents = _agent_set(model, kind)
    assert agents.shuffle_do("step", 1, two=2) is agents
    assert sorted(model.tracker.starts) == sorted(a.unique_id for a in model.agents)
    assert all(a.calls == [((1,), {"two": 2})] for a in model.agents)
    assert model.tracker.peak > 1  # they overlapped


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", SET_KINDS)
def test_start_order_and_random_stream_match_a_sequential_run(mode, kind):
    # One runner at a time makes the start order observable exactly.
    sequential = ToyModel(25, SyncAgent, seed=3, parallel=False)
    _agent_set(sequential, kind).shuffle_do("step")
    expected = (sequential.tracker.starts, sequential.random.random())

    mlp.enable_automatic_parallel_stepping(mode=mode, max_concurrency=1)
    model = ToyModel(25, SyncAgent, seed=3)
    _agent_set(model, kind).shuffle_do("step")
    assert (model.tracker.starts, model.random.random()) == expected


def test_start_order_is_the_shuffled_order_without_a_cap():
    sequential = ToyModel(40, SyncAgent, seed=11, parallel=False)
    sequential.step()
    mlp.enable_automatic_parallel_stepping()
    model = ToyModel(40, AsyncAgent, seed=11)
    model.step()
    assert model.tracker.peak == 40
    assert model.tracker.starts == sequential.tracker.starts


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cap", [1, 3, 7])
def test_max_concurrency_caps_agents_in_flight(mode, cap):
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=10, max_concurrency=cap)
    model = ToyModel(30, AsyncAgent if mode == "asyncio" else SyncAgent, delay=0.01)
    model.step()
    assert model.tracker.peak == cap
    assert len(model.tracker.starts) == 30


def test_pool_size_caps_threads_in_threading_mode():
    mlp.enable_automatic_parallel_stepping(mode="threading", max_workers=4)
    model = ToyModel(20, SyncAgent, delay=0.01)
    model.step()
    assert model.tracker.peak == 4
    assert len(model.tracker.threads) == 4
    assert threading.get_ident() not in model.tracker.threads


@pytest.mark.parametrize("mode", ["asyncio", "threading"])
def test_steps_lease_the_one_pool_that_lives_beside_its_class(mode):
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=3, run_sync_inline=False)
    ToyModel(6, SyncAgent).step()
    assert isinstance(_pool.pool, _pool.ResizablePool)
    assert _pool.pool.size == 3  # the pool the step used
    mlp.shutdown()
    assert _pool.pool.size is None  # and the one shutdown releases


def test_a_step_takes_its_arguments_by_keyword_only():
    cfg = mlp.settings.snapshot()
    with pytest.raises(TypeError, match="positional"):
        Step([], None, "step", (), {}, cfg, "asyncio")  # type: ignore[misc]
    step = Step(entries=[], method="step", cfg=cfg, mode="asyncio")
    assert (step.args, step.kwargs, step.n) == ((), {}, 0)


def test_asyncio_mode_runs_async_agents_on_one_thread_and_sync_agents_in_the_pool():
    mlp.enable_automatic_parallel_stepping(mode="asyncio", max_workers=5)
    async_model = ToyModel(10, AsyncAgent, delay=0.01)
    async_model.step()
    assert async_model.tracker.threads == {threading.get_ident()}
    assert async_model.tracker.peak == 10

    sync_model = ToyModel(10, SyncAgent, delay=0.01)
    sync_model.step()
    assert threading.get_ident() not in sync_model.tracker.threads
    assert sync_model.tracker.peak == 5


def test_run_sync_inline_calls_sync_agents_on_the_loop_thread():
    mlp.enable_automatic_parallel_stepping(run_sync_inline=True)
    model = ToyModel(6, SyncAgent, delay=0.001)
    model.step()
    assert model.tracker.threads == {threading.get_ident()}
    assert model.tracker.peak == 1


@pytest.mark.parametrize(("mode", "expected"), [("asyncio", "astep"), ("threading", "step")])
def test_agent_with_both_methods_uses_the_one_for_the_mode(mode, expected):
    mlp.enable_automatic_parallel_stepping(mode=mode)
    model = ToyModel(4, BothAgent)
    model.step()
    assert {a.ran for a in model.agents} == {expected}


def test_threading_mode_runs_async_only_agents_on_the_models_home_loop():
    mlp.enable_automatic_parallel_stepping(mode="threading", max_workers=3)
    loops: list[asyncio.AbstractEventLoop] = []
    in_flight, peak = 0, 0

    class LoopRecorder(mesa.Agent):
        def __init__(self, model, delay=0.0):
            super().__init__(model)

        async def astep(self):
            nonlocal in_flight, peak
            loops.append(asyncio.get_running_loop())
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.005)
            in_flight -= 1

    model = ToyModel(9, LoopRecorder)
    model.step()
    model.step()
    assert len(loops) == 18
    # One loop for every agent of every step: the loop an asyncio step would use.
    assert set(loops) == {mlp.home_loop(model)}
    assert peak == 3  # the pool's 3 threads each wait for one agent at a time


def test_agent_with_neither_method_runs_mesas_no_op_step():
    mlp.enable_automatic_parallel_stepping()

    class Plain(mesa.Agent):
        def __init__(self, model, delay=0.0):
            super().__init__(model)

    model = ToyModel(5, Plain)
    assert model.agents.shuffle_do("step") is model.agents


@pytest.mark.parametrize("mode", MODES)
def test_agent_removed_before_its_turn_is_skipped(mode):
    # One agent at a time, like Mesa's loop: an agent removed by an earlier one never runs.
    mlp.enable_automatic_parallel_stepping(mode=mode, max_concurrency=1)
    stepped: list[int] = []

    class Remover(mesa.Agent):
        def __init__(self, model, delay=0.0):
            super().__init__(model)

        def step(self):
            stepped.append(self.unique_id)
            for other in list(self.model.agents):
                if other is not self and other.unique_id not in stepped:
                    other.remove()
                    break

    model = ToyModel(6, Remover)
    model.step()
    assert len(stepped) == 3  # every stepped agent removed one that had not run yet
    assert len(model.agents) == 3


def test_dead_weak_references_are_skipped_in_a_weak_agent_set():
    mlp.enable_automatic_parallel_stepping(max_concurrency=1)
    model = ToyModel(6, AsyncAgent)
    weak_set = model.agents.select()
    victim = next(iter(weak_set))
    victim.remove()
    del victim
    gc.collect()
    weak_set.shuffle_do("step")
    assert len(model.tracker.starts) == 5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("host", ["kernel", "application"])
def test_step_inside_a_running_event_loop(mode, host, request):
    if host == "kernel":
        request.getfixturevalue("as_if_in_a_kernel")
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=4)
    model = ToyModel(10, AsyncAgent, delay=0.01)

    async def cell():  # a notebook cell, or a coroutine of an asyncio application
        model.step()
        model.step()
        return mlp.last_loop_path(), mlp.home_loop(model) is asyncio.get_running_loop()

    path, home_is_this_loop = asyncio.run(cell())
    assert len(model.tracker.starts) == 20
    assert model.tracker.peak > 1
    if host == "kernel":  # nested on the kernel's loop, which is the model's home
        assert home_is_this_loop
        if mode == "asyncio":
            assert path == "running_loop"
    else:  # an application's loop is left alone: the library's background loop
        assert mlp.home_loop(model) is _loops._background.loop
        if mode == "asyncio":
            assert path == "background"


def test_running_loop_is_not_starved_during_a_nested_step(as_if_in_a_kernel):
    mlp.enable_automatic_parallel_stepping()
    model = ToyModel(5, AsyncAgent, delay=0.05)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    async def cell():
        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before = ticks
        model.step()
        during = ticks - before
        task.cancel()
        return during

    assert asyncio.run(cell()) > 1  # the outer loop kept running while agents waited


def test_background_loop_setting_runs_steps_on_the_library_loop_thread():
    mlp.enable_automatic_parallel_stepping(loop="background")
    model = ToyModel(8, AsyncAgent, delay=0.005)

    async def cell():
        model.step()
        return mlp.last_loop_path()

    assert asyncio.run(cell()) == "background"
    model.step()
    assert mlp.last_loop_path() == "background"
    assert threading.get_ident() not in model.tracker.threads
    assert len(model.tracker.threads) == 1


@pytest.mark.parametrize("mode", MODES)
def test_step_from_a_non_main_thread(mode):
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=4)
    model = ToyModel(10, AsyncAgent, delay=0.01)
    errors: list[BaseException] = []

    def play():  # what SolaraViz's play thread does
        try:
            for _ in range(3):
                model.step()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=play)
    thread.start()
    thread.join()
    assert errors == []
    assert len(model.tracker.starts) == 30
    assert model.tracker.peak > 1


def test_async_primitives_created_in_one_step_work_in_the_next():
    mlp.enable_automatic_parallel_stepping()

    class Client(mesa.Agent):
        """Creates loop-bound objects once, as an async HTTP client does."""

        def __init__(self, model, delay=0.0):
            super().__init__(model)
            self.queue: asyncio.Queue[int] | None = None
            self.lock: asyncio.Lock | None = None
            self.got: list[int] = []

        async def astep(self):
            if self.queue is None:
                self.queue = asyncio.Queue()
                self.lock = asyncio.Lock()
                self.loop = asyncio.get_running_loop()
            assert asyncio.get_running_loop() is self.loop
            async with self.lock:
                await self.queue.put(len(self.got))
                self.got.append(await self.queue.get())

    model = ToyModel(5, Client)
    for _ in range(4):
        model.step()
    assert all(a.got == [0, 1, 2, 3] for a in model.agents)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("agent_cls", [AsyncAgent, SyncAgent])
@pytest.mark.mesa_min("3.4", why="Mesa before 3.4 keeps every model alive")
def test_models_are_freed_after_del(mode, agent_cls):
    # Repeated: a pool worker that still held its last job would keep a model alive
    # for a moment after the step, which a single try can miss.
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=3)
    alive = 0
    for _ in range(25):
        model = ToyModel(10, agent_cls)
        model.step()
        model.step()
        ref = weakref.ref(model)
        agent_ref = weakref.ref(next(iter(model.agents)))
        del model
        gc.collect()
        alive += ref() is not None or agent_ref() is not None
    assert alive == 0


def test_resizing_often_leaks_no_threads():
    mlp.enable_automatic_parallel_stepping(mode="threading")
    model = ToyModel(12, SyncAgent)
    baseline = threading.active_count()
    for i in range(300):
        mlp.settings.max_workers = 1 + i % 6
        model.step()
    assert len(model.tracker.starts) == 300 * 12
    mlp.shutdown()
    assert threading.active_count() <= baseline


def test_resize_while_a_step_runs_does_not_disturb_it():
    mlp.enable_automatic_parallel_stepping(mode="threading", max_workers=2, max_concurrency=2)
    release = threading.Event()
    entered = threading.Event()

    class Slow(mesa.Agent):
        def __init__(self, model, delay=0.0):
            super().__init__(model)

        def step(self):
            self.model.tracker.enter(self)
            entered.set()
            release.wait(5)
            self.model.tracker.leave()

    model = ToyModel(6, Slow)
    stepper = threading.Thread(target=model.step)
    stepper.start()
    assert entered.wait(5)
    mlp.settings.update(max_workers=5, max_concurrency=None)  # a panel changes both mid-step
    other = ToyModel(10, SyncAgent, delay=0.01)
    other.step()  # a second model's step gets the new size at once
    release.set()
    stepper.join(5)
    assert not stepper.is_alive()
    assert len(model.tracker.starts) == 6
    assert model.tracker.peak == 2
    assert other.tracker.peak == 5


@pytest.mark.parametrize(
    ("mode", "loop"), [("asyncio", "auto"), ("threading", "auto"), ("asyncio", "background")]
)
def test_nested_step_from_inside_an_agent_does_not_deadlock(mode, loop):
    # A sync agent in a pool worker steps sync sub-agents while every worker is busy
    # with such agents: the sub-agents must not wait for the pool. With the background
    # loop the inner step's coroutine runs on another thread than the worker.
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=2, loop=loop)

    class Inner(mesa.Model):
        def __init__(self):
            super().__init__(rng=1)
            self.parallel_stepping = True
            self.tracker = ToyModel(0).tracker
            for _ in range(4):
                SyncAgent(self, delay=0.001)

    class Outer(mesa.Agent):
        def __init__(self, model, delay=0.0):
            super().__init__(model)
            self.inner = Inner()

        def step(self):
            self.inner.agents.shuffle_do("step")

    model = ToyModel(4, Outer)
    done = threading.Event()
    runner = threading.Thread(target=lambda: (model.step(), done.set()), daemon=True)
    runner.start()
    runner.join(20)
    assert done.is_set()
    assert all(len(a.inner.tracker.starts) == 4 for a in model.agents)


def test_a_loop_that_cannot_be_re_entered_falls_back_to_the_background_thread():
    class ForeignLoop(asyncio.AbstractEventLoop):
        """Stands in for uvloop: a running loop not derived from asyncio's own."""

    mlp.enable_automatic_parallel_stepping()
    model = ToyModel(6, AsyncAgent, delay=0.001)
    foreign = ForeignLoop()
    asyncio._set_running_loop(foreign)
    try:
        model.step()
        path = mlp.last_loop_path()
    finally:
        asyncio._set_running_loop(None)
    assert path == "background"
    assert len(model.tracker.starts) == 6
    assert not getattr(ForeignLoop, "_nest_patched", False)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.mesa_min(
    "3.5",
    why="model.agents drops a removed agent at once; before, Mesa's own loop also steps "
    "a removed agent that is still referenced",
)
def test_agent_removed_while_waiting_for_a_worker_is_skipped(mode):
    # More sync agents than workers: the first ones remove all the others while those
    # wait for a worker. Mesa would skip them; so must both modes.
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=2)
    ran_after_removal = []

    class Remover(mesa.Agent):
        def __init__(self, model, delay=0.0):
            super().__init__(model)
            self.removed = False

        def step(self):
            if self.removed:
                ran_after_removal.append(self.unique_id)
            time.sleep(0.01)
            for other in list(self.model.agents):
                if other is not self:
                    other.removed = True
                    other.remove()

    model = ToyModel(10, Remover)
    model.step()
    report = mlp.last_step_report(model)
    assert ran_after_removal == []
    assert report.started + report.skipped == 10
    assert report.skipped >= 8
    assert report.peak_in_flight <= 2


def test_sync_agents_in_asyncio_mode_time_out_from_their_real_start():
    # 6 agents of 30 ms on 2 workers: the last ones wait ~60 ms for a worker, which
    # must not count against their 50 ms timeout.
    mlp.enable_automatic_parallel_stepping(max_workers=2, timeout=0.05)
    model = ToyModel(6, SyncAgent, delay=0.03)
    model.step()
    report = mlp.last_step_report(model)
    assert (report.completed, report.failures) == (6, ())
    assert report.peak_in_flight == 2
