"""Failures, timeouts, rate limits, interrupts, recovery, reports and ordered commits."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import threading
import time

import mesa
import pytest
from models import AsyncAgent, SyncAgent, ToyModel
from support import run_python, steps_of

import mesa_llm_parallel as mlp
from mesa_llm_parallel import _engine
from mesa_llm_parallel._ratelimit import StartRateLimiter, limiter

MODES = ["asyncio", "threading"]


class Scripted(mesa.Agent):
    """Behaves as the model's ``script`` says: a delay, a failure, or a hang."""

    def __init__(self, model, delay=0.0):
        super().__init__(model)
        self.outcome: str | None = None

    def _plan(self):
        return self.model.script.get(self.unique_id, ("sleep", 0.005))

    def _everyone_started(self):
        return len(self.model.tracker.starts) >= len(self.model.agents)

    async def astep(self):
        kind, value = self._plan()
        self.model.tracker.enter(self)
        try:
            if kind == "fail":  # once every sibling is in flight
                for _ in range(5000):
                    if self._everyone_started():
                        break
                    await asyncio.sleep(0.001)
            if kind in ("fail", "fail_now"):
                raise value
            await asyncio.sleep(value)
            self.outcome = "done"
        except asyncio.CancelledError:
            self.outcome = "cancelled"
            raise
        finally:
            self.model.tracker.leave()

    def step(self):
        kind, value = self._plan()
        self.model.tracker.enter(self)
        try:
            if kind == "fail":  # once every sibling is in flight
                for _ in range(5000):
                    if self._everyone_started():
                        break
                    time.sleep(0.001)
            if kind in ("fail", "fail_now"):
                raise value
            if kind == "hang":
                self.model.release.wait(value)
            else:
                time.sleep(value)
            self.outcome = "done"
        finally:
            self.model.tracker.leave()


class SyncScripted(Scripted):
    """The same, with only the sync ``step``: runs in a thread in both modes."""

    astep = None


def scripted_model(n=8, script=None, agent_cls=Scripted, **kwargs):
    model = ToyModel(n, agent_cls, **kwargs)
    model.script = script or {}
    model.release = threading.Event()
    return model


# -- failures -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_raise_attaches_every_failure_in_start_order(mode):
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=16)
    model = scripted_model(8, {2: ("fail", KeyError("two")), 5: ("fail", OSError("five"))})
    with pytest.raises((KeyError, OSError)) as info:
        model.step()
    report = mlp.last_step_report(model)
    assert [type(f.exception) for f in report.failures] in (
        [KeyError, OSError],
        [OSError, KeyError],
    )
    assert info.value is report.failures[0].exception  # the earliest started, as itself
    assert info.value.mesa_llm_parallel_failures == report.failures
    assert [f.position for f in report.failures] == sorted(f.position for f in report.failures)
    assert {f.agent.unique_id for f in report.failures} == {2, 5}
    notes = "".join(info.value.__notes__)
    assert "1 more agent(s) failed" in notes
    assert type(report.failures[1].exception).__name__ in notes


@pytest.mark.parametrize("mode", MODES)
def test_collect_runs_every_agent_and_logs_once(mode, caplog):
    mlp.enable_automatic_parallel_stepping(mode=mode, on_error="collect", max_concurrency=2)
    failing = {i: ("fail_now", ValueError(f"agent {i}")) for i in (1, 3, 4)}
    model = scripted_model(8, failing)
    with caplog.at_level(logging.WARNING, logger="mesa_llm_parallel"):
        assert model.agents.shuffle_do("step") is model.agents
    report = mlp.last_step_report(model)
    assert (report.started, report.completed, len(report.failures)) == (8, 5, 3)
    assert report.not_started == 0
    warnings = [r for r in caplog.records if r.name == "mesa_llm_parallel"]
    assert len(warnings) == 1
    assert "3 agent(s) failed" in warnings[0].getMessage()


def test_raise_starts_no_new_agent_after_a_failure():
    mlp.enable_automatic_parallel_stepping(max_concurrency=1)
    model = scripted_model(6)
    sequential = ToyModel(6, SyncAgent, parallel=False)
    sequential.step()
    second = sequential.tracker.starts[1]
    model.script = {second: ("fail_now", ValueError("second"))}
    with pytest.raises(ValueError, match="second"):
        model.step()
    report = mlp.last_step_report(model)
    assert (report.started, report.completed, report.not_started) == (2, 1, 4)


def test_on_error_is_validated_and_live():
    with pytest.raises(ValueError, match=r"'raise', 'collect', got 'ignore'"):
        mlp.settings.on_error = "ignore"
    mlp.enable_automatic_parallel_stepping(on_error="collect")
    model = scripted_model(4, {1: ("fail_now", ValueError("x"))})
    model.step()
    mlp.settings.on_error = "raise"
    with pytest.raises(ValueError, match="x"):
        model.step()


# -- timeouts -----------------------------------------------------------------------
def test_timeout_cancels_an_overdue_async_agent():
    mlp.enable_automatic_parallel_stepping(timeout=0.05, on_error="collect")
    model = scripted_model(6, {3: ("hang", 60.0)})
    model.step()
    report = mlp.last_step_report(model)
    agents = {a.unique_id: a for a in model.agents}
    assert agents[3].outcome == "cancelled"
    assert all(agents[i].outcome == "done" for i in agents if i != 3)
    assert [f.agent for f in report.timed_out] == [agents[3]]
    assert isinstance(report.timed_out[0].exception, TimeoutError)
    assert "0.05 s timeout" in str(report.timed_out[0].exception)


@pytest.mark.parametrize("mode", MODES)
def test_timeout_reports_an_overdue_thread_and_does_not_wait_for_it(mode):
    # A sync agent blocks until the test releases it: the step can only return
    # before that if it stopped waiting for the agent.
    mlp.enable_automatic_parallel_stepping(mode=mode, timeout=0.05, max_workers=4)
    model = scripted_model(6, {2: ("hang", 30.0)}, SyncScripted)
    with pytest.raises(TimeoutError, match="did not finish") as info:
        model.step()
    assert model.release.is_set() is False
    report = mlp.last_step_report(model)
    assert [f.agent.unique_id for f in report.timed_out] == [2]
    assert "cannot be stopped" in "".join(info.value.__notes__)
    assert report.completed == 5
    model.release.set()  # the abandoned thread finishes later; the next step is normal
    model.script = {}
    model.step()
    assert mlp.last_step_report(model).completed == 6


def test_a_stuck_pool_does_not_stop_the_step():
    # One worker, stuck on an overdue agent: a spare thread takes over the rest.
    mlp.enable_automatic_parallel_stepping(
        mode="threading", max_workers=1, timeout=0.05, on_error="collect"
    )
    sequential = ToyModel(5, SyncAgent, parallel=False)
    sequential.step()
    model = scripted_model(5, {sequential.tracker.starts[0]: ("hang", 30.0)}, SyncScripted)
    model.step()
    report = mlp.last_step_report(model)
    assert (report.completed, len(report.timed_out)) == (4, 1)
    model.release.set()


def test_timeout_cancels_an_async_only_agent_on_its_worker_loop():
    mlp.enable_automatic_parallel_stepping(mode="threading", timeout=0.05, on_error="collect")

    class AsyncOnly(mesa.Agent):
        def __init__(self, model, delay=0.0):
            super().__init__(model)
            self.cancelled = False

        async def astep(self):
            try:
                await asyncio.sleep(60 if self.unique_id == 1 else 0)
            except asyncio.CancelledError:
                self.cancelled = True
                raise

    model = ToyModel(3, AsyncOnly)
    model.step()
    report = mlp.last_step_report(model)
    assert [f.agent.unique_id for f in report.timed_out] == [1]
    deadline = time.monotonic() + 5
    agent = report.timed_out[0].agent
    while not agent.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert agent.cancelled


def test_an_agents_own_timeout_error_is_not_reported_as_a_timeout():
    mlp.enable_automatic_parallel_stepping(timeout=10.0, on_error="collect")
    model = scripted_model(3, {1: ("fail_now", TimeoutError("upstream"))})
    model.step()
    (failure,) = mlp.last_step_report(model).failures
    assert failure.timed_out is False
    assert str(failure.exception) == "upstream"


@pytest.mark.parametrize("value", [0, -1.5, float("nan"), float("inf")])
def test_timeout_and_rate_limit_reject_bad_numbers(value):
    for name in ("timeout", "rate_limit"):
        with pytest.raises(ValueError, match=name):
            setattr(mlp.settings, name, value)
    with pytest.raises(TypeError, match="'1s'"):
        mlp.settings.timeout = "1s"


# -- rate limit ---------------------------------------------------------------------
def test_rate_limiter_spaces_starts_without_bursts():
    limiter = StartRateLimiter()
    slots = [limiter.reserve(50.0)[0] for _ in range(5)]
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert all(g == pytest.approx(0.02, abs=1e-9) for g in gaps)
    time.sleep(0.2)  # idle time does not build up credit for a burst
    later = [limiter.reserve(50.0)[0] for _ in range(3)]
    assert later[1] - later[0] == pytest.approx(0.02, abs=1e-9)


def test_rate_limiter_hands_given_back_slots_to_later_reservations():
    limiter = StartRateLimiter()
    slots = [limiter.reserve(10.0)[0] for _ in range(5)]  # 0.0, 0.1, ... 0.4 s ahead
    for slot in slots[1:]:  # four holders stop waiting: every slot after the first
        limiter.give_back(slot, 10.0)
    slot, wait = limiter.reserve(10.0)
    assert slot == pytest.approx(slots[1], abs=1e-9)  # one slot after the used one
    assert wait <= 0.1 + 1e-3
    middle = [limiter.reserve(10.0)[0] for _ in range(3)]
    limiter.give_back(middle[0], 10.0)  # a slot in the middle: reused, spacing kept
    assert limiter.reserve(10.0)[0] == pytest.approx(middle[0], abs=1e-9)
    assert limiter.reserve(10.0)[0] == pytest.approx(middle[-1] + 0.1, abs=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_rate_limit_spaces_agent_starts_across_steps(mode):
    rate = 200.0
    # In asyncio mode the agents run inline, at their slot: a pool thread's own start-up
    # (the first job of a fresh pool) could delay the first agent by more than a slot
    # on a loaded machine and make the later ones look bunched up behind it.
    mlp.enable_automatic_parallel_stepping(
        mode=mode, rate_limit=rate, max_workers=8, run_sync_inline=True
    )
    starts: list[float] = []
    lock = threading.Lock()

    class Stamped(mesa.Agent):
        def __init__(self, model, delay=0.0):
            super().__init__(model)

        def step(self):
            with lock:
                starts.append(time.monotonic())

    model = ToyModel(10, Stamped)
    model.step()
    model.step()  # right after: no burst at the step boundary
    starts.sort()
    assert len(starts) == 20
    # The k-th start comes no sooner than k slots after the first (one slot of slack for
    # the first start's own delay): never a burst above the rate, even across steps.
    # A lower bound only: sleeps never end early, however loaded the machine is.
    for k, start in enumerate(starts):
        assert start - starts[0] >= (k - 1) / rate


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_rate_limited_step_reserves_a_start_slot_per_agent_and_no_more(mode, kind):
    # A slot reserved for nobody would keep the step open until its time came (a step
    # of n agents took twice n / rate) and push the next step's starts back.
    rate = 50.0
    mlp.enable_automatic_parallel_stepping(mode=mode, rate_limit=rate, max_workers=4)

    class Quick(mesa.Agent):
        def __init__(self, model, delay=0.0):
            super().__init__(model)

        def step(self):
            pass

    class AsyncQuick(Quick):
        async def astep(self):
            pass

    model = ToyModel(8, Quick if kind == "sync" else AsyncQuick)
    before = limiter.reserve(rate)[0]  # the next free slot before the step
    limiter.give_back(before, rate)
    model.step()
    after = limiter.reserve(rate)[0]  # the next free slot after it
    limiter.give_back(after, rate)
    assert mlp.last_step_report(model).completed == 8
    # 8 slots used and none more (the first may come a little after `before`, when the
    # limiter was idle: it is then the time of the first start).
    assert 8 / rate - 1e-6 <= after - before < 9 / rate


# -- interrupts ---------------------------------------------------------------------
def _interrupt_when(event: threading.Event) -> threading.Thread:
    def fire():
        if event.wait(10):
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=fire, daemon=True)
    thread.start()
    return thread


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals")
@pytest.mark.parametrize("mode", MODES)
def test_ctrl_c_interrupts_the_step_and_the_next_step_runs_every_agent(mode):
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=4)
    model = scripted_model(8, dict.fromkeys(range(1, 9), ("hang", 2.0)))
    all_started = threading.Event()
    original_enter = model.tracker.enter

    def enter(agent):
        original_enter(agent)
        if len(model.tracker.starts) == 4:
            all_started.set()

    model.tracker.enter = enter
    threads_before = threading.active_count()
    firing = _interrupt_when(all_started)
    with pytest.raises(KeyboardInterrupt):
        model.step()
    firing.join()
    report = mlp.last_step_report(model)
    assert report.interrupted
    assert report.completed < 8
    if mode == "asyncio":
        assert all(a.outcome == "cancelled" for a in model.agents if a.outcome != "done")
        assert asyncio.all_tasks(mlp._loops.thread_loop()) == set()  # nothing orphaned
    model.release.set()
    model.script = {}
    model.tracker.starts.clear()
    model.step()  # Mesa would not step this model again without recovery
    assert sorted(model.tracker.starts) == sorted(a.unique_id for a in model.agents)
    names = [t.name for t in threading.enumerate()]
    assert threading.active_count() <= threads_before + 4, names


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals")
@pytest.mark.parametrize("mode", MODES)
def test_ctrl_c_says_what_became_of_the_agents_instead_of_where_it_landed(mode):
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=4)
    model = scripted_model(8, dict.fromkeys(range(1, 9), ("hang", 30.0)))
    four_started = threading.Event()
    original_enter = model.tracker.enter

    def enter(agent):
        original_enter(agent)
        if len(model.tracker.starts) == 4:
            four_started.set()

    model.tracker.enter = enter
    firing = _interrupt_when(four_started)
    with pytest.raises(KeyboardInterrupt) as info:
        model.step()
    firing.join()
    model.release.set()
    error = info.value
    assert type(error) is KeyboardInterrupt
    assert error.__suppress_context__  # "During handling of the above..." is not shown
    report = mlp.last_step_report(model)
    assert error.mesa_llm_parallel_report is report
    message = str(error)
    assert message.startswith(f"parallel step interrupted ({mode} mode): 0 of 8 agents finished")
    if mode == "asyncio":  # every async agent starts at once, and is cancelled
        assert report.started == 8
        assert "0 of 8 agents finished, 8 cancelled. " in message
    else:  # one agent per worker; a thread cannot be stopped
        assert report.started == 4
        assert (
            "4 never started; 4 started in threads (or on the model's event loop) "
            "cannot be stopped" in message
        )
    assert "the next model.step() runs normally" in message
    assert "mlp.last_step_report(model)" in message


@pytest.mark.parametrize("mode", MODES)
def test_an_interrupt_of_another_kind_passes_unchanged(mode):
    # batch_run stops a run with its own KeyboardInterrupt subclass, and expects it back.
    class Stopped(KeyboardInterrupt):
        pass

    class Stopping(mesa.Agent):
        def step(self):
            raise Stopped("stop this run")

    mlp.enable_automatic_parallel_stepping(mode=mode)
    model = ToyModel(3, SyncAgent)
    Stopping(model)
    with pytest.raises(Stopped, match="stop this run") as info:
        model.step()
    assert not info.value.__suppress_context__
    assert not hasattr(info.value, "mesa_llm_parallel_report")


def test_an_interrupt_inside_an_inline_agent_counts_the_agents_called_before_it():
    # Inline agents are counted a run at a time; an interrupt inside one ends the run.
    calls = itertools.count(1)

    class Cheap(mesa.Agent):
        def step(self):
            if next(calls) == 4:
                raise KeyboardInterrupt

    mlp.enable_automatic_parallel_stepping(mode="asyncio", run_sync_inline=True)
    model = mesa.Model(rng=1)
    for _ in range(8):
        Cheap(model)
    with pytest.raises(KeyboardInterrupt) as info:
        mlp.step_agents_parallel_sync(model.agents)
    report = mlp.last_step_report(model)
    assert (report.started, report.completed) == (4, 3)
    assert "3 of 8 agents finished, 1 cancelled, 4 never started. " in str(info.value)


INTERRUPTED_SCRIPT = """
    import asyncio, os, signal, threading, time

    import mesa

    import mesa_llm_parallel as mlp

    started = threading.Semaphore(0)

    class Caller(mesa.Agent):
        async def astep(self):
            started.release()
            await asyncio.sleep(30)

        def step(self):
            started.release()
            time.sleep(30)

    if {sync!r}:
        del Caller.astep

    model = mesa.Model(rng=1)
    for _ in range(40):
        Caller(model)
    model.parallel_stepping = True
    mlp.enable_automatic_parallel_stepping(mode={mode!r}, max_workers=8)

    def interrupt():
        for _ in range(8):
            started.acquire()
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    model.agents.shuffle_do("step")
"""


@pytest.mark.parametrize("sync", [False, True], ids=["async-agents", "sync-agents"])
@pytest.mark.parametrize("mode", MODES)
def test_a_script_stopped_by_ctrl_c_prints_a_short_traceback_with_the_counts(mode, sync):
    result = run_python(INTERRUPTED_SCRIPT.format(mode=mode, sync=sync))
    assert result.returncode != 0
    error = result.stderr
    if mode == "asyncio" and not sync:
        counts = "0 of 40 agents finished, 40 cancelled."
    else:  # eight in the threads (one per worker), the rest waiting for one
        counts = "0 of 40 agents finished, 32 never started; 8 started in threads"
    assert f"KeyboardInterrupt: parallel step interrupted ({mode} mode): {counts}" in error
    # The script's line, the two library frames it went through, and the message; not
    # the event loop, the selector or the wait where the signal landed.
    assert error.count("  File ") == 3, error
    assert len(error) < 1_500, error


def test_cancelling_an_awaiting_caller_cancels_the_agents_and_says_so():
    model = scripted_model(6, dict.fromkeys(range(1, 7), ("hang", 30.0)))

    async def main():
        task = asyncio.create_task(mlp.ashuffle_do(model.agents))
        while model.tracker.now < 6:  # noqa: ASYNC110 - the tracker is thread-safe, not async
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError) as cancelled:
            await task
        assert task.cancelled()  # the task still ends cancelled
        report = mlp.last_step_report(model)
        assert report.interrupted
        # A short message of what became of the agents, with the report attached.
        assert str(cancelled.value).startswith(
            "parallel step cancelled (asyncio mode): 0 of 6 agents finished, 6 cancelled."
        )
        assert "mlp.last_step_report(model)" in str(cancelled.value)
        assert cancelled.value.mesa_llm_parallel_report is report
        assert cancelled.value.__suppress_context__
        model.script = {}
        return await mlp.ashuffle_do(model.agents)

    asyncio.run(main())
    outcomes = [a.outcome for a in model.agents]
    assert outcomes == ["done"] * 6
    assert len(model.tracker.starts) == 12


def test_a_cancelled_step_agents_parallel_counts_sync_agents_left_in_threads():
    gate = threading.Event()
    entered = threading.Semaphore(0)

    class Waiting(SyncAgent):
        def step(self, *args, **kwargs):
            entered.release()
            gate.wait(30)

    model = ToyModel(4, Waiting)
    model.parallel_stepping = False  # only the manual function steps it

    async def main():
        task = asyncio.create_task(mlp.step_agents_parallel(model.agents))
        for _ in range(4):  # every agent is in its thread
            assert await asyncio.to_thread(entered.acquire, True, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError) as cancelled:
            await task
        return str(cancelled.value)

    try:
        message = asyncio.run(main())
    finally:
        gate.set()
    assert message.startswith("parallel step cancelled (asyncio mode): 0 of 4 agents finished")
    assert "; 4 started in threads cannot be stopped" in message


# -- Mesa's schedule after an escaped exception -------------------------------------
class Counting(mesa.Agent):
    def __init__(self, model, delay=0.0):
        super().__init__(model)
        self.steps = 0

    async def astep(self):
        self.steps += 1
        self.model.started = getattr(self.model, "started", 0) + 1
        if self.model.fail_once and self.unique_id == 1:
            # Only once every agent has started: the test is about the next steps, and
            # with on_error="raise" an agent after the failure in start order would
            # not start at all.
            while self.model.started < len(self.model.agents):  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            self.model.fail_once = False
            raise ValueError("model server error")


@pytest.mark.parametrize("mode", MODES)
def test_model_steps_again_after_an_escaped_failure(mode):
    mlp.enable_automatic_parallel_stepping(mode=mode)
    model = ToyModel(4, Counting)
    model.fail_once = True
    with pytest.raises(ValueError, match="model server"):
        model.step()
    model.step()
    model.step()
    assert [a.steps for a in model.agents] == [3] * 4
    assert steps_of(model) == 3


@pytest.mark.mesa_min("3.5", why="Mesa's event list schedules the steps")
def test_a_caught_failure_is_not_scheduled_twice():
    mlp.enable_automatic_parallel_stepping()

    class Catching(ToyModel):
        def step(self):
            with contextlib.suppress(ValueError):
                self.agents.shuffle_do("step")

    model = Catching(4, Counting)
    model.fail_once = True
    for _ in range(3):
        model.step()
    assert [a.steps for a in model.agents] == [3] * 4
    assert steps_of(model) == 3
    assert len(model._event_list._events) == 1  # exactly one next step is scheduled


@pytest.mark.mesa_min("3.5", why="Model.run_for")
def test_run_for_continues_after_an_escaped_failure():
    mlp.enable_automatic_parallel_stepping()
    model = ToyModel(3, Counting)
    model.fail_once = True
    with pytest.raises(ValueError, match="model server"):
        model.run_for(2)
    model.run_for(2)
    assert steps_of(model) == 3


# -- step report and callbacks ------------------------------------------------------
def test_report_is_none_before_a_parallel_step_and_describes_it_after():
    model = ToyModel(10, AsyncAgent, delay=0.01, parallel=False)
    mlp.enable_automatic_parallel_stepping(max_workers=7, max_concurrency=5)
    model.step()
    assert mlp.last_step_report(model) is None  # sequential steps have no report
    model.parallel_stepping = True
    model.step()
    report = mlp.last_step_report(model)
    assert (report.mode, report.agents, report.started, report.completed) == ("asyncio", 10, 10, 10)
    assert (report.pool_size, report.max_concurrency, report.peak_in_flight) == (7, 5, 5)
    assert report.failures == ()
    assert report.timed_out == ()
    assert not report.interrupted
    assert report.wall_time > 0
    assert report.busy_time >= 10 * 0.01 * 0.9
    assert report.speedup == pytest.approx(report.busy_time / report.wall_time)
    assert "10/10 agents completed" in report.summary()


def test_callbacks_see_every_parallel_step_and_cannot_break_it(caplog):
    seen: list[tuple[object, int]] = []

    def record(model, report):
        seen.append((model, report.completed))

    def broken(model, report):
        raise RuntimeError("callback bug")

    mlp.add_step_callback(record)
    mlp.add_step_callback(broken)
    try:
        mlp.enable_automatic_parallel_stepping()
        model = ToyModel(3)
        with caplog.at_level(logging.ERROR, logger="mesa_llm_parallel"):
            model.step()
            model.step()
        model.parallel_stepping = False
        model.step()
    finally:
        mlp.remove_step_callback(record)
        mlp.remove_step_callback(broken)
    assert seen == [(model, 3), (model, 3)]
    assert sum("step callback" in r.getMessage() for r in caplog.records) == 2
    model.parallel_stepping = True
    model.step()
    assert len(seen) == 2  # removed
    with pytest.raises(TypeError, match="callable"):
        mlp.add_step_callback("not callable")


def test_progress_bar_counts_every_agent(monkeypatch):
    bars = []
    original = _engine._progress_bar

    def recording(total, mode):
        bar = original(total, mode)
        bars.append(bar)
        return bar

    monkeypatch.setattr(_engine, "_progress_bar", recording)
    mlp.enable_automatic_parallel_stepping(mode="threading", progress=True)
    model = ToyModel(9, SyncAgent)
    model.step()
    assert len(bars) == 1
    assert (bars[0].n, bars[0].total) == (9, 9)
    mlp.settings.progress = False
    model.step()
    assert len(bars) == 1


# -- ordered commits ----------------------------------------------------------------
class Committer(mesa.Agent):
    """Thinks for a random time, then appends to the model's ledger in its turn."""

    def __init__(self, model, delay=0.0):
        super().__init__(model)

    async def astep(self):
        await asyncio.sleep(self.model.think[self.unique_id])
        async with mlp.in_turn(self):
            self.model.ledger.append(self.unique_id)

    def step(self):
        time.sleep(self.model.think[self.unique_id])
        with mlp.in_turn(self):
            self.model.ledger.append(self.unique_id)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cap", [None, 1, 3])
def test_in_turn_commits_in_start_order_whatever_the_latencies(mode, cap):
    sequential = ToyModel(12, SyncAgent, seed=9, parallel=False)
    sequential.step()
    mlp.enable_automatic_parallel_stepping(mode=mode, max_concurrency=cap, max_workers=6)
    model = ToyModel(12, Committer, seed=9)
    # The agents that start first think longest.
    model.think = {uid: 0.002 * (12 - i) for i, uid in enumerate(sequential.tracker.starts)}
    model.ledger = []
    model.step()
    assert model.ledger == sequential.tracker.starts


def test_in_turn_outside_a_parallel_step_does_nothing():
    model = ToyModel(4, Committer, parallel=False)
    model.think = dict.fromkeys((a.unique_id for a in model.agents), 0.0)
    model.ledger = []
    for agent in model.agents:
        agent.step()
    assert len(model.ledger) == 4


def test_a_failure_before_its_turn_does_not_block_later_agents():
    mlp.enable_automatic_parallel_stepping(on_error="collect")

    class FailsEarly(Committer):
        async def astep(self):
            if self.unique_id % 2:
                raise ValueError("before my turn")
            await super().astep()

    model = ToyModel(8, FailsEarly)
    model.think = dict.fromkeys((a.unique_id for a in model.agents), 0.001)
    model.ledger = []
    model.step()
    assert sorted(model.ledger) == [2, 4, 6, 8]


def test_taking_a_turn_twice_raises():
    mlp.enable_automatic_parallel_stepping(on_error="collect")

    class Greedy(mesa.Agent):
        def __init__(self, model, delay=0.0):
            super().__init__(model)

        async def astep(self):
            async with mlp.in_turn(self):
                pass
            async with mlp.in_turn(self):
                pass

    model = ToyModel(2, Greedy)
    model.step()
    failures = mlp.last_step_report(model).failures
    assert len(failures) == 2
    assert all("turn" in str(f.exception) for f in failures)


def test_blocking_in_turn_on_the_event_loop_is_refused():
    mlp.enable_automatic_parallel_stepping(on_error="collect")

    class Blocking(mesa.Agent):
        def __init__(self, model, delay=0.0):
            super().__init__(model)

        async def astep(self):
            first = not self.model.tracker.starts
            self.model.tracker.enter(self)
            await asyncio.sleep(0.05 if first else 0.001)  # the rest get there before it
            with mlp.in_turn(self):  # wrong in async code: would block the loop
                pass

    model = ToyModel(6, Blocking)
    model.step()
    failures = mlp.last_step_report(model).failures
    assert len(failures) == 5  # every agent but the first in line
    assert all("async with in_turn" in str(f.exception) for f in failures)


def test_a_timed_out_threads_late_commit_is_refused():
    mlp.enable_automatic_parallel_stepping(mode="threading", timeout=0.05, on_error="collect")
    outcome: list[BaseException | None] = []
    released = threading.Event()

    class Late(mesa.Agent):
        def __init__(self, model, delay=0.0):
            super().__init__(model)

        def step(self):
            if self.unique_id == 1:
                released.wait(10)
                try:
                    with mlp.in_turn(self):
                        outcome.append(None)
                except RuntimeError as exc:
                    outcome.append(exc)

    model = ToyModel(3, Late)
    model.step()
    released.set()
    deadline = time.monotonic() + 5
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(outcome[0], RuntimeError)
    assert "over" in str(outcome[0])


def test_shared_lock_is_one_lock_per_object_and_guards_threads():
    mlp.enable_automatic_parallel_stepping(mode="threading", max_workers=8)

    class Adder(mesa.Agent):
        def __init__(self, model, delay=0.0):
            super().__init__(model)

        def step(self):
            for _ in range(200):
                with mlp.shared_lock(self.model):
                    value = self.model.total
                    time.sleep(0)  # invite a thread switch inside the read-modify-write
                    self.model.total = value + 1

    model = ToyModel(8, Adder)
    model.total = 0
    model.step()
    assert model.total == 8 * 200
    assert mlp.shared_lock(model) is mlp.shared_lock(model)
    assert mlp.shared_lock(model) is not mlp.shared_lock(ToyModel(0))
    with pytest.raises(TypeError, match="weak references"):
        mlp.shared_lock(3)


def test_model_stepping_manually_also_steps_again_after_a_failure():
    class Manual(ToyModel):
        def step(self):
            mlp.step_agents_parallel_sync(list(self.agents))

    model = Manual(3, Counting)
    model.fail_once = True
    with pytest.raises(ValueError, match="model server"):
        model.step()
    before = [a.steps for a in model.agents]
    model.step()
    assert [a.steps for a in model.agents] == [n + 1 for n in before]


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals")
@pytest.mark.parametrize("agent_cls", [Scripted, SyncScripted])
@pytest.mark.parametrize("mode", MODES)
def test_the_next_step_does_not_queue_behind_agents_still_stuck_in_threads(mode, agent_cls):
    # After Ctrl-C the interrupted agents' threads cannot be stopped and may hold every
    # worker; the next step gets fresh workers instead of waiting for them.
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=2)
    model = scripted_model(2, {1: ("hang", 30.0), 2: ("hang", 30.0)}, agent_cls)
    started = threading.Event()
    original_enter = model.tracker.enter

    def enter(agent):
        original_enter(agent)
        if model.tracker.now == 2:
            started.set()

    model.tracker.enter = enter
    firing = _interrupt_when(started)
    with pytest.raises(KeyboardInterrupt):
        model.step()
    firing.join()
    model.script = {}
    finished = threading.Event()
    threading.Thread(target=lambda: (model.step(), finished.set()), daemon=True).start()
    assert finished.wait(20)  # while the stuck agents still wait for the release
    assert not model.release.is_set()
    assert mlp.last_step_report(model).completed == 2
    model.release.set()


def test_an_agent_awaiting_something_held_only_weakly_is_not_collected_mid_step():
    # The loop keeps weak references to tasks; an asyncio stream's reader is held weakly
    # by its protocol. An agent task awaiting such a future must stay alive through a
    # garbage collection, or its step never ends.
    import gc
    import weakref

    pending: list[weakref.ref] = []

    class Waiting(mesa.Agent):
        async def astep(self):
            future = asyncio.get_running_loop().create_future()
            pending.append(weakref.ref(future))
            await future

    def resolve():
        for ref in pending:
            future = ref()
            if future is not None and not future.done():
                future.set_result(None)

    model = mesa.Model(rng=1)
    for _ in range(5):
        Waiting(model)

    async def main():
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, gc.collect)
        loop.call_later(0.1, resolve)
        await asyncio.wait_for(mlp.step_agents_parallel(model.agents), 5)

    asyncio.run(main())
    assert len(pending) == 5
