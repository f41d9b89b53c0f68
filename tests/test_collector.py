"""The garbage collector's thresholds during large parallel steps, and after them."""

from __future__ import annotations

import asyncio
import gc
import threading

import mesa
import pytest

import mesa_llm_parallel as mlp
from mesa_llm_parallel import _collector


@pytest.fixture(autouse=True)
def default_thresholds():
    saved = gc.get_threshold()
    enabled = gc.isenabled()
    gc.set_threshold(700, 10, 10)
    gc.enable()
    yield
    gc.set_threshold(*saved)
    if not enabled:
        gc.disable()


class Seer(mesa.Agent):
    """Notes the collector's thresholds while it runs."""

    async def astep(self) -> None:
        self.model.seen.add(gc.get_threshold())
        await asyncio.sleep(0)
        hook = self.model.hook
        if hook is not None and self.unique_id == 1:
            hook()


class SyncSeer(Seer):
    def step(self) -> None:
        self.model.seen.add(gc.get_threshold())
        hook = self.model.hook
        if hook is not None and self.unique_id == 1:
            hook()


class Crowd(mesa.Model):
    def __init__(self, n: int, hook=None, agent_class: type[Seer] = Seer) -> None:
        super().__init__(rng=3)
        self.parallel_stepping = True
        self.seen: set[tuple[int, int, int]] = set()
        self.hook = hook
        agent_class.create_agents(self, n)

    def step(self) -> None:
        self.agents.shuffle_do("step")


@pytest.mark.parametrize("mode", ["asyncio", "threading"])
def test_a_large_step_raises_the_first_threshold_to_its_size_then_restores_it(mode):
    mlp.enable_automatic_parallel_stepping(mode=mode)
    model = Crowd(3_000)
    model.step()
    assert model.seen == {(3_000, 10, 10)}
    assert gc.get_threshold() == (700, 10, 10)


def test_a_small_step_leaves_the_collector_alone():
    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    model = Crowd(_collector.SCALE_FROM)
    model.step()
    assert model.seen == {(700, 10, 10)}


def test_thresholds_someone_changes_during_the_step_are_kept():
    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    model = Crowd(2_000, hook=lambda: gc.set_threshold(5_000, 20, 20))
    model.step()
    assert gc.get_threshold() == (5_000, 20, 20)


def test_with_automatic_collection_off_nothing_changes():
    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    gc.disable()
    model = Crowd(2_000)
    model.step()
    assert model.seen == {(700, 10, 10)}
    gc.set_threshold(0, 10, 10)  # the other way to turn it off
    gc.enable()
    model.seen.clear()
    model.step()
    assert model.seen == {(0, 10, 10)}


def test_an_interrupted_step_restores_the_thresholds():
    def interrupt() -> None:
        raise KeyboardInterrupt

    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    model = Crowd(2_000, hook=interrupt)
    with pytest.raises(KeyboardInterrupt):
        model.step()
    assert gc.get_threshold() == (700, 10, 10)


def test_concurrent_large_steps_restore_once_the_last_one_ends():
    mlp.enable_automatic_parallel_stepping(mode="threading")  # agents in pool threads
    inside = threading.Barrier(2, timeout=30)
    during: list[tuple[int, int, int]] = []

    def meet() -> None:
        inside.wait()
        during.append(gc.get_threshold())

    small = Crowd(1_000, hook=meet, agent_class=SyncSeer)
    large = Crowd(4_000, hook=meet, agent_class=SyncSeer)
    threads = [threading.Thread(target=m.step) for m in (small, large)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # Both steps were inside at once: the larger size holds for both.
    assert during == [(4_000, 10, 10)] * 2
    assert gc.get_threshold() == (700, 10, 10)
