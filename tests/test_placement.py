"""Where sync agents run in asyncio mode: measured per class, forced, reported.

Every test defines its agent classes inside the test: what the steps measure is kept
per class for the life of the process, so a class shared between tests would carry
one test's measurements into the next.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import threading
import time

import mesa
import pytest
from support import run_python

import mesa_llm_parallel as mlp
from mesa_llm_parallel import _placement, in_turn


class Recorder(mesa.Model):
    """A model whose agents note the thread they ran in and the order they started in."""

    def __init__(self, seed: int = 1) -> None:
        super().__init__(rng=seed)
        self.parallel_stepping = True
        self.threads: dict[int, int] = {}  # agent id -> thread ident
        self.order: list[int] = []
        self.loop_thread: int | None = None

    def step(self) -> None:
        self.agents.shuffle_do("step")


def note(agent: mesa.Agent) -> None:
    agent.model.threads[agent.unique_id] = threading.get_ident()
    agent.model.order.append(agent.unique_id)


def rows(report: mlp.StepReport, name: str) -> dict[str, mlp.Placement]:
    return {p.where: p for p in report.placement if p.agent_class.endswith(name)}


def step_on_own_loop(model: Recorder) -> mlp.StepReport:
    """One step; remember the loop thread (the calling thread: the model's own loop)."""
    model.loop_thread = threading.get_ident()
    model.step()
    return mlp.last_step_report(model)


# -- measured ----------------------------------------------------------------------
def test_cheap_sync_agents_are_observed_in_the_pool_then_run_inline():
    class Cell(mesa.Agent):
        def step(self) -> None:
            note(self)

    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    model = Recorder()
    Cell.create_agents(model, 300)
    first = step_on_own_loop(model)
    by_where = rows(first, "Cell")
    assert set(by_where) == {"thread pool", "inline"}
    observed = by_where["thread pool"].agents
    assert _placement.OBSERVED_CALLS <= observed < 300
    assert by_where["inline"].agents == 300 - observed
    assert "less than the hop to a thread" in by_where["inline"].reason
    on_loop = sum(1 for t in model.threads.values() if t == model.loop_thread)
    assert on_loop == 300 - observed  # inline means: called on the loop's own thread

    model.threads.clear()
    second = step_on_own_loop(model)
    assert [(p.where, p.agents) for p in second.placement] == [("inline", 300)]
    assert set(model.threads.values()) == {model.loop_thread}
    assert (second.completed, second.started) == (300, 300)


def test_sync_agents_that_block_stay_in_the_pool_and_overlap():
    class Caller(mesa.Agent):
        def step(self) -> None:
            time.sleep(0.002)  # a blocking call (a sync HTTP client)
            note(self)

    mlp.enable_automatic_parallel_stepping(mode="asyncio", max_workers=16)
    model = Recorder()
    Caller.create_agents(model, 40)
    for _ in range(2):
        report = step_on_own_loop(model)
        by_where = rows(report, "Caller")
        assert set(by_where) == {"thread pool"}
        assert by_where["thread pool"].agents == 40
        assert report.peak_in_flight > 1
    assert "took >= 20 us" in by_where["thread pool"].reason
    assert model.loop_thread not in model.threads.values()


def test_a_class_that_blocks_once_inline_goes_back_to_the_pool_for_good():
    class Sometimes(mesa.Agent):
        calls = 0

        def step(self) -> None:
            type(self).calls += 1
            if type(self).calls == 100:  # inline by then: blocks the loop once
                time.sleep(0.05)
            note(self)

    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    model = Recorder()
    Sometimes.create_agents(model, 200)
    gc.disable()  # a full collection during the slow call would excuse it
    try:
        report = step_on_own_loop(model)
    finally:
        gc.enable()
    by_where = rows(report, "Sometimes")
    assert "blocked the event loop for" in by_where["thread pool"].reason
    inline = by_where["inline"]
    assert inline.reason.startswith("until: an inline call blocked the event loop")
    assert inline.agents < 200 - _placement.OBSERVED_CALLS
    assert report.completed == 200

    report = step_on_own_loop(model)
    assert [p.where for p in report.placement] == ["thread pool"]  # never inline again
    assert _placement.known_record(Sometimes).stalled


def test_a_full_collection_is_not_blamed_on_the_inline_agent():
    class Collects(mesa.Agent):
        calls = 0

        def step(self) -> None:
            type(self).calls += 1
            if type(self).calls == 100:
                gc.collect()  # a full collection, counted as such
                time.sleep(0.02)

    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    model = Recorder()
    Collects.create_agents(model, 200)
    report = step_on_own_loop(model)
    assert not _placement.known_record(Collects).stalled
    assert (
        rows(report, "Collects")["inline"].agents
        == 200 - rows(report, "Collects")["thread pool"].agents
    )


def test_classes_that_call_in_turn_are_never_inlined():
    class Orderly(mesa.Agent):  # names in_turn in its own source
        def step(self) -> None:
            with in_turn(self):
                note(self)

    def commit(agent: mesa.Agent) -> None:  # the class's source does not name in_turn
        with mlp.in_turn(agent):
            note(agent)

    class Indirect(mesa.Agent):
        def step(self) -> None:
            commit(self)

    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    model = Recorder()
    Orderly.create_agents(model, 60)
    Indirect.create_agents(model, 60)
    reports = [step_on_own_loop(model) for _ in range(3)]
    for report in reports:
        assert {p.where for p in report.placement} == {"thread pool"}
        assert report.completed == 120
    reasons = {p.agent_class.rsplit(".", 1)[-1]: p.reason for p in reports[-1].placement}
    assert reasons == {
        "Orderly": "its methods call in_turn",
        "Indirect": "its agents call in_turn",
    }
    assert model.loop_thread not in model.threads.values()


def test_with_a_timeout_sync_agents_stay_in_the_pool():
    class Cell(mesa.Agent):
        def step(self) -> None:
            note(self)

    mlp.enable_automatic_parallel_stepping(mode="asyncio", timeout=5)
    model = Recorder()
    Cell.create_agents(model, 100)
    for _ in range(2):
        report = step_on_own_loop(model)
        assert [(p.where, p.agents) for p in report.placement] == [("thread pool", 100)]
    assert "timeout" in report.placement[0].reason


# -- forced ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("setting", "attribute", "where"),
    [
        (True, None, "inline"),
        (False, None, "thread pool"),
        ("auto", True, "inline"),
        (True, False, "thread pool"),
        (False, "auto", None),  # the class measures itself whatever the setting
    ],
)
def test_the_setting_and_the_class_attribute_force_either(setting, attribute, where):
    class Cell(mesa.Agent):
        run_sync_inline = attribute

        def step(self) -> None:
            note(self)

    mlp.enable_automatic_parallel_stepping(mode="asyncio", run_sync_inline=setting)
    model = Recorder()
    Cell.create_agents(model, 50)
    report = step_on_own_loop(model)
    if where is None:  # 50 agents, 64 workers: all observed in the pool, then inline
        assert [(p.where, p.agents) for p in report.placement] == [("thread pool", 50)]
        report = step_on_own_loop(model)
        assert [(p.where, p.agents) for p in report.placement] == [("inline", 50)]
        return
    assert [(p.where, p.agents) for p in report.placement] == [(where, 50)]
    assert "run_sync_inline" in report.placement[0].reason
    assert report.completed == 50


def test_a_bad_class_attribute_names_the_value():
    class Cell(mesa.Agent):
        run_sync_inline = "yes"

        def step(self) -> None:
            pass

    mlp.enable_automatic_parallel_stepping(mode="asyncio", on_error="collect")
    model = Recorder()
    Cell.create_agents(model, 3)
    model.step()
    failures = mlp.last_step_report(model).failures
    assert len(failures) == 3
    message = str(failures[0].exception)
    for part in ("run_sync_inline", "'yes'", "'auto'"):
        assert part in message


@pytest.mark.parametrize("value", ["sometimes", 1, None])
def test_a_bad_setting_names_the_value_and_changes_nothing(value):
    with pytest.raises(ValueError, match=r"run_sync_inline must be True, False or 'auto'") as info:
        mlp.settings.update(run_sync_inline=value, max_workers=3)
    assert repr(value) in str(info.value)
    assert mlp.settings.run_sync_inline == "auto"
    assert mlp.settings.max_workers != 3


# -- what inlining must not change ---------------------------------------------------
def test_inline_agents_keep_start_order_turns_and_the_random_stream():
    def build(inline: bool | str) -> Recorder:
        class Rule(mesa.Agent):
            run_sync_inline = inline

            def step(self) -> None:
                note(self)
                with in_turn(self):  # forced inline: every turn is ready in order
                    self.model.ledger.append(self.unique_id)

        model = Recorder(seed=42)
        model.ledger = []
        Rule.create_agents(model, 80)
        return model

    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    sequential = build(True)
    sequential.parallel_stepping = False
    sequential.step()
    inline = build(True)
    inline.step()
    assert inline.order == sequential.order  # called one after another, in shuffled order
    assert inline.ledger == sequential.ledger == sequential.order
    assert inline.random.random() == sequential.random.random()
    report = mlp.last_step_report(inline)
    assert (report.completed, report.failures) == (80, ())


def test_inline_agents_each_get_their_own_copy_of_the_callers_context():
    seen = contextvars.ContextVar("seen", default="caller's")
    leaks: list[str] = []

    class Cell(mesa.Agent):
        run_sync_inline = True

        def step(self) -> None:
            leaks.append(seen.get())
            seen.set(f"set by {self.unique_id}")

    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    model = Recorder()
    Cell.create_agents(model, 20)
    model.step()
    assert leaks == ["caller's"] * 20
    assert seen.get() == "caller's"


def test_failures_and_skips_in_a_run_of_inline_agents_are_reported_as_before():
    def build(parallel: bool) -> Recorder:
        class Cell(mesa.Agent):
            run_sync_inline = True

            def step(self) -> None:
                note(self)
                if self.unique_id % 7 == 0:  # removes the next agent, if still there
                    other = self.model.by_id.get(self.unique_id + 1)
                    if other is not None and other in self.model.agents:
                        other.remove()
                        self.model.removed.append(other.unique_id)
                if self.unique_id % 5 == 0 and self.model.parallel_stepping:
                    raise ValueError(f"cell {self.unique_id}")

        model = Recorder(seed=5)
        model.parallel_stepping = parallel
        model.removed = []
        Cell.create_agents(model, 50)
        model.by_id = {a.unique_id: a for a in model.agents}
        return model

    mlp.enable_automatic_parallel_stepping(mode="asyncio", on_error="collect")
    sequential, parallel = build(False), build(True)
    sequential.step()
    parallel.step()
    assert parallel.order == sequential.order  # the same agents ran, in the same order
    report = mlp.last_step_report(parallel)
    assert report.agents == 50
    assert report.started == len(parallel.order)
    assert report.skipped == 50 - len(parallel.order) > 0
    assert report.completed == report.started - len(report.failures)
    failed = [f.agent.unique_id for f in report.failures]
    assert failed == [i for i in parallel.order if i % 5 == 0]  # in start order
    assert [f.position for f in report.failures] == sorted(f.position for f in report.failures)


def test_a_step_of_cheap_agents_gives_the_loop_a_turn_between_slices():
    ticks = []

    class Cell(mesa.Agent):
        run_sync_inline = True

        def step(self) -> None:
            time.sleep(0.0001)

    async def ticker() -> None:
        while True:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0)

    async def main() -> None:
        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before = len(ticks)
        await mlp.step_agents_parallel(list(model.agents))
        task.cancel()
        return len(ticks) - before

    model = Recorder()
    Cell.create_agents(model, 400)  # about 40 ms of inline calls
    assert asyncio.run(main()) >= 3  # the loop ran other tasks during the step


def test_the_report_says_where_async_and_no_op_agents_ran():
    class Thinker(mesa.Agent):
        async def astep(self) -> None:
            await asyncio.sleep(0)

    class Idle(mesa.Agent):  # Mesa's own no-op step
        pass

    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    model = Recorder()
    Thinker.create_agents(model, 4)
    Idle.create_agents(model, 3)
    report = step_on_own_loop(model)
    assert rows(report, "Thinker")["event loop"].agents == 4
    assert rows(report, "Idle")["inline"].agents == 3

    mlp.settings.mode = "threading"
    report = step_on_own_loop(model)
    assert rows(report, "Thinker")["home loop"].agents == 4
    assert rows(report, "Idle")["inline"].agents == 3


def test_an_inline_agent_that_asks_for_a_turn_not_yet_due_fails_clearly():
    class Slow(mesa.Agent):
        async def astep(self) -> None:
            await asyncio.sleep(0.05)

    class Late(mesa.Agent):
        run_sync_inline = True

        def step(self) -> None:
            with in_turn(self):
                pass

    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    model = Recorder()
    Slow.create_agents(model, 1)
    Late.create_agents(model, 1)
    agents = sorted(model.agents, key=lambda a: isinstance(a, Late))  # Slow starts first
    with pytest.raises(RuntimeError, match="would block the event loop") as info:
        mlp.step_agents_parallel_sync(agents)
    assert "run_sync_inline = False" in str(info.value)
    assert _placement.record_for(Late).uses_turns  # under "auto" it would stay in the pool


@pytest.mark.parametrize("cap", [None, 1])
def test_async_agents_each_get_their_own_copy_of_the_callers_context(cap):
    seen = contextvars.ContextVar("seen", default="caller's")
    leaks: list[str] = []

    class Thinker(mesa.Agent):
        async def astep(self) -> None:
            leaks.append(seen.get())
            seen.set(f"set by {self.unique_id}")
            await asyncio.sleep(0)

    mlp.enable_automatic_parallel_stepping(mode="asyncio", max_concurrency=cap)
    model = Recorder()
    Thinker.create_agents(model, 10)
    model.step()
    assert leaks == ["caller's"] * 10
    assert seen.get() == "caller's"


def test_an_inline_call_that_blocks_and_raises_sends_its_class_back_too():
    class Flaky(mesa.Agent):
        calls = 0

        def step(self) -> None:
            type(self).calls += 1
            if type(self).calls % 50 == 0:  # a sync request that times out
                time.sleep(0.03)
                raise ConnectionError("timed out")

    mlp.enable_automatic_parallel_stepping(mode="asyncio", on_error="collect")
    model = Recorder()
    Flaky.create_agents(model, 200)
    gc.disable()
    try:
        reports = [step_on_own_loop(model) for _ in range(3)]
    finally:
        gc.enable()
    first = reports[0]
    assert sum(p.agents for p in first.placement) == 200  # failed agents are counted too
    assert _placement.known_record(Flaky).stalled
    assert "blocked the event loop" in rows(first, "Flaky")["thread pool"].reason
    for later in reports[1:]:
        assert [(p.where, p.agents) for p in later.placement] == [("thread pool", 200)]


def test_a_sync_agent_running_its_own_event_loop_fails_once_then_runs_in_the_pool():
    # In a fresh interpreter: once nest-asyncio2 has patched asyncio (a kernel test did
    # it in this process), asyncio.run works on a running loop and nothing fails.
    result = run_python(
        """
        import asyncio, json, warnings
        import mesa
        import mesa_llm_parallel as mlp
        from mesa_llm_parallel import _placement

        warnings.simplefilter("ignore")  # the refused coroutine was never awaited

        async def fetch():
            await asyncio.sleep(0)
            return 1

        class Cached(mesa.Agent):
            calls = 0

            def step(self):
                type(self).calls += 1
                if type(self).calls > 100:  # a cache miss, once the class is inline
                    self.value = asyncio.run(fetch())

        class M(mesa.Model):
            def __init__(self):
                super().__init__(rng=1)
                self.parallel_stepping = True
                Cached.create_agents(self, 100)

            def step(self):
                self.agents.shuffle_do("step")

        mlp.enable_automatic_parallel_stepping(mode="asyncio", on_error="collect")
        model = M()
        out = []
        for _ in range(3):
            model.step()
            report = mlp.last_step_report(model)
            out.append({
                "failures": [str(f.exception) for f in report.failures],
                "placement": [[p.where, p.agents] for p in report.placement],
            })
        out.append(_placement.known_record(Cached).reason)
        out.append(sorted({getattr(a, "value", 0) for a in model.agents}))
        print(json.dumps(out))
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    first, second, third, reason, values = json.loads(result.stdout.strip().splitlines()[-1])
    assert first["failures"] == []
    assert len(second["failures"]) == 1
    assert "running event loop" in second["failures"][0]
    assert "runs an event loop itself" in reason
    assert third == {"failures": [], "placement": [["thread pool", 100]]}
    assert values == [1]


def test_each_method_of_a_class_is_measured_apart():
    class Two(mesa.Agent):
        def step(self) -> None:
            pass

        def think(self) -> None:
            time.sleep(0.002)

    mlp.enable_automatic_parallel_stepping(
        mode="asyncio", parallel_methods={"step", "think"}, max_workers=8
    )
    model = Recorder()
    Two.create_agents(model, 40)
    for _ in range(2):
        model.agents.shuffle_do("think")
        model.agents.shuffle_do("step")
    assert [p.where for p in mlp.last_step_report(model).placement] == ["inline"]  # step
    model.agents.shuffle_do("think")
    assert [p.where for p in mlp.last_step_report(model).placement] == ["thread pool"]
    assert _placement.known_record(Two, "think").reason.endswith("took >= 20 us")
    assert not _placement.known_record(Two, "step").stalled
