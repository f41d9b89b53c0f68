"""Property-based tests: ordered effects make parallel steps reproduce a sequential run.

Agents "think" concurrently (they sleep a latency drawn by Hypothesis), then, inside
``in_turn``, read shared state, ask a deterministic mock language model (a hash of a
prompt built from what they read), draw from ``model.random`` and apply effects that
depend on everything applied before them: a read-modify-write of a shared counter,
a wealth transfer to a randomly drawn partner, an entry in a shared ledger. Some
agents fail at Hypothesis-chosen points of chosen steps (``on_error="collect"``).

The final state, the random stream afterwards and the step reports must not depend on
the mode, the concurrency cap, the pool size or the latencies, and must equal a plain
sequential Mesa run of the same seed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import threading
import time
from collections.abc import Callable
from typing import Any

import hypothesis
import mesa
import pytest
from hypothesis import strategies as st

import mesa_llm_parallel as mlp
from mesa_llm_parallel import in_turn

#: Where a failing agent raises ValueError.
WHEN = ("start", "before_turn", "in_turn", "after_turn")

#: (mode, max_concurrency, max_workers, where cheap agents run) of the parallel runs
#: compared with each other: "auto" (measured: the pool, then inline), or forced by the
#: class attribute ``run_sync_inline`` (True: inline on the loop; False: the pool).
CONFIGS: tuple[tuple[str, int | None, int, bool | str], ...] = (
    ("asyncio", None, 4, "auto"),
    ("asyncio", 1, 2, "auto"),
    ("asyncio", 3, 1, "auto"),
    ("asyncio", None, 4, True),
    ("asyncio", 2, 3, False),
    ("threading", None, 12, "auto"),
    ("threading", 1, 4, "auto"),
    ("threading", 3, 8, "auto"),
    ("threading", None, 2, "auto"),
)

#: Seconds one whole run may take before it is reported as a hang.
RUN_TIMEOUT = 10.0

PROPERTY_SETTINGS = hypothesis.settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)


def mock_llm(prompt: str) -> int:
    """A deterministic stand-in for a language model: a 64-bit hash of the prompt."""
    return int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big")


# -- the model ----------------------------------------------------------------------
class Trader(mesa.Agent):
    """The shared logic; subclasses add ``step`` and/or ``astep``."""

    def __init__(self, model: LedgerModel, index: int) -> None:
        super().__init__(model)
        self.index = index
        self.wealth = 3 + index % 4
        self.memory = index  # written only by the agent itself

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.index}>"

    def latency(self) -> float:
        latencies = self.model.latencies
        return latencies[(self.index + self.model.step_no) % len(latencies)]

    def maybe_fail(self, when: str) -> None:
        model = self.model
        if model.failures.get((model.step_no, self.index)) == when:
            raise ValueError(f"agent {self.index} fails at {when} of step {model.step_no}")

    def plan(self) -> int:
        """The slow, concurrent part: only the agent's own state goes into this prompt."""
        return mock_llm(f"plan|{self.index}|{self.model.step_no}|{self.memory}")

    def read(self, plan: int) -> tuple[int, Trader, int]:
        """Inside the turn: read shared state, draw random numbers, ask the model."""
        model = self.model
        counter = model.counter
        partner = model.random.choice([a for a in model.roster if a is not self])
        draw = model.random.random()
        prompt = (
            f"act|{self.index}|{model.step_no}|{counter}|{len(model.ledger)}|"
            f"{self.wealth}|{partner.wealth}|{plan}|{draw!r}"
        )
        return counter, partner, mock_llm(prompt)

    def write(self, counter: int, partner: Trader, decision: int) -> None:
        """Inside the turn: apply effects that depend on what was read."""
        model = self.model
        model.counter = counter + 1 + decision % 7  # lost updates if turns overlapped
        self.maybe_fail("in_turn")  # a failure halfway through the effects
        amount = min(self.wealth, decision % 4)
        self.wealth -= amount
        partner.wealth += amount
        self.memory = decision % 1000
        model.ledger.append((model.step_no, self.index, partner.index, amount, counter))


class SyncTrader(Trader):
    """Only a sync ``step`` (in asyncio mode it runs in the thread pool)."""

    def step(self) -> None:
        self.maybe_fail("start")
        plan = self.plan()
        time.sleep(self.latency())
        self.maybe_fail("before_turn")
        with in_turn(self):
            read = self.read(plan)
            time.sleep(0.0001)  # let other threads run between the read and the write
            self.write(*read)
        self.maybe_fail("after_turn")


class AsyncTrader(Trader):
    """Only ``async def astep`` (in threading mode it runs on a worker's loop)."""

    async def astep(self) -> None:
        self.maybe_fail("start")
        plan = self.plan()
        await asyncio.sleep(self.latency())
        self.maybe_fail("before_turn")
        async with in_turn(self):
            read = self.read(plan)
            await asyncio.sleep(0)  # let other agents run between the read and the write
            self.write(*read)
        self.maybe_fail("after_turn")


class BothTrader(SyncTrader):
    """``step`` and ``astep`` doing the same thing; the mode picks one."""

    astep = AsyncTrader.astep


class CheapTrader(Trader):
    """A rule-based agent: a cheap sync ``step`` on its own state, no turn, no waiting.

    In asyncio mode it is observed in the pool, then runs inline on the loop (or where
    the run's configuration forces it: see the subclasses below).
    """

    def step(self) -> None:
        self.maybe_fail("start")
        self.memory = mock_llm(f"cheap|{self.index}|{self.model.step_no}|{self.memory}") % 1000


class InlineCheapTrader(CheapTrader):
    run_sync_inline = True


class PoolCheapTrader(CheapTrader):
    run_sync_inline = False


CHEAP_CLASSES: dict[bool | str, type[Trader]] = {
    "auto": CheapTrader,
    True: InlineCheapTrader,
    False: PoolCheapTrader,
}


KIND_CLASSES: dict[str, type[Trader]] = {
    "sync": SyncTrader,
    "async": AsyncTrader,
    "both": BothTrader,
    "cheap": CheapTrader,
}


def _step_catching(agent: Trader) -> None:
    """Sequential reference: step one agent, noting (not propagating) its ValueError."""
    model = agent.model
    position = model.seq_position
    model.seq_position += 1
    try:
        agent.step()
    except ValueError as exc:
        model.seq_failures.append((position, agent.index, str(exc), False))


class LedgerModel(mesa.Model):
    """A seeded model whose agents trade through shared state, stepped by shuffle_do."""

    def __init__(
        self,
        seed: int,
        kinds: list[str],
        latencies: list[float],
        failures: dict[tuple[int, int], str],
        *,
        parallel: bool,
        catch_failures: bool = False,
        cheap: bool | str = "auto",
    ) -> None:
        super().__init__(rng=seed)
        self.parallel_stepping = parallel
        self.catch_failures = catch_failures
        self.latencies = latencies
        self.failures = failures
        self.step_no = 0
        self.counter = 0
        self.ledger: list[tuple[int, ...]] = []
        self.reports: list[tuple[Any, ...]] = []
        self.seq_position = 0
        self.seq_failures: list[tuple[int, int, str, bool]] = []
        classes = {**KIND_CLASSES, "cheap": CHEAP_CLASSES[cheap]}
        self.roster = [classes[kind](self, i) for i, kind in enumerate(kinds)]

    def step(self) -> None:
        self.step_no += 1
        if self.catch_failures:
            self.seq_position = 0
            self.seq_failures = []
            self.agents.shuffle_do(_step_catching)
            n = len(self.roster)
            failed = len(self.seq_failures)
            self.reports.append((n, n, n - failed, 0, tuple(self.seq_failures), False))
            return
        before = mlp.last_step_report(self)
        self.agents.shuffle_do("step")
        report = mlp.last_step_report(self)
        if self.parallel_stepping:
            assert report is not before, "a parallel step left no report"
            self.reports.append(summarize(report))
        else:
            assert report is None, "a step with the flag off left a report"

    def outcome(self) -> dict[str, Any]:
        """Everything a run produced; read the random stream last."""
        return {
            "ledger": list(self.ledger),
            "agents": [(a.index, a.wealth, a.memory) for a in self.roster],
            "counter": self.counter,
            "reports": list(self.reports),
            "next_random": self.random.random(),
        }


def summarize(report: mlp.StepReport) -> tuple[Any, ...]:
    """What a step report must agree on across runs (no timings)."""
    failures = tuple(
        (f.position, f.agent.index, str(f.exception), f.timed_out) for f in report.failures
    )
    return (
        report.agents,
        report.started,
        report.completed,
        report.skipped,
        failures,
        report.interrupted,
    )


# -- running ------------------------------------------------------------------------
def _guarded(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a daemon thread; fail, instead of hanging, if it does not finish."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target, name="determinism-run", daemon=True)
    thread.start()
    thread.join(RUN_TIMEOUT)
    if thread.is_alive():
        pytest.fail(f"a run did not finish within {RUN_TIMEOUT} s: deadlock or hang")
    if "error" in result:
        raise result["error"]
    return result["value"]


@dataclasses.dataclass(frozen=True)
class Scenario:
    seed: int
    kinds: list[str]
    steps: int
    failures: dict[tuple[int, int], str]
    latencies: list[list[float]]  # one list per run, one latency per agent


@st.composite
def scenarios(draw: st.DrawFn, kinds: tuple[str, ...]) -> Scenario:
    n = draw(st.integers(2, 12), label="agents")
    steps = draw(st.integers(1, 3), label="steps")
    failures = draw(
        st.dictionaries(
            st.tuples(st.integers(1, steps), st.integers(0, n - 1)),
            st.sampled_from(WHEN),
            max_size=n,
        ),
        label="failures",
    )
    micros = st.integers(0, 5000)  # 0-5 ms
    latencies = draw(
        st.lists(
            st.lists(micros, min_size=n, max_size=n),
            min_size=len(CONFIGS),
            max_size=len(CONFIGS),
        ),
        label="latencies (us)",
    )
    return Scenario(
        seed=draw(st.integers(0, 2**32 - 1), label="seed"),
        kinds=draw(st.lists(st.sampled_from(kinds), min_size=n, max_size=n), label="kinds"),
        steps=steps,
        failures=failures,
        latencies=[[us / 1e6 for us in run] for run in latencies],
    )


def run_parallel(scn: Scenario, config: int) -> dict[str, Any]:
    mode, cap, workers, cheap = CONFIGS[config]

    def go() -> dict[str, Any]:
        mlp.settings.reset()
        mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=workers, on_error="collect")
        mlp.settings.max_concurrency = cap
        model = LedgerModel(
            scn.seed,
            scn.kinds,
            scn.latencies[config],
            scn.failures,
            parallel=True,
            cheap=cheap,
        )
        for _ in range(scn.steps):
            model.step()
        return model.outcome()

    return _guarded(go)


def run_sequential(scn: Scenario, *, catch_failures: bool) -> dict[str, Any]:
    """Mesa's own shuffle_do (patch installed, flag off); no latencies needed."""

    def go() -> dict[str, Any]:
        mlp.settings.reset()
        mlp.enable_automatic_parallel_stepping(on_error="collect")
        zero = [0.0] * len(scn.kinds)
        model = LedgerModel(
            scn.seed,
            scn.kinds,
            zero,
            scn.failures,
            parallel=False,
            catch_failures=catch_failures,
        )
        for _ in range(scn.steps):
            model.step()
        return model.outcome()

    return _guarded(go)


def _describe(config: int) -> str:
    mode, cap, workers, cheap = CONFIGS[config]
    return f"{mode}, max_concurrency={cap}, max_workers={workers}, cheap agents: {cheap}"


def _assert_same(expected: dict[str, Any], got: dict[str, Any], what: str) -> None:
    for key, value in expected.items():
        assert got[key] == value, f"{key} differs in {what}"


# -- properties ---------------------------------------------------------------------
@PROPERTY_SETTINGS
@hypothesis.given(scn=scenarios(kinds=("both", "sync", "cheap")))
def test_parallel_runs_reproduce_the_sequential_run(scn):
    # The sequential reference: Mesa's loop, with each agent's ValueError noted by a
    # wrapper so that the step goes on as it does with on_error="collect".
    reference = run_sequential(scn, catch_failures=True)
    if not scn.failures:
        # Without failures the wrapper is not needed: plain shuffle_do("step").
        plain = run_sequential(scn, catch_failures=False)
        _assert_same({k: v for k, v in reference.items() if k != "reports"}, plain, "flag off")
    for config in range(len(CONFIGS)):
        _assert_same(reference, run_parallel(scn, config), _describe(config))


@PROPERTY_SETTINGS
@hypothesis.given(scn=scenarios(kinds=("both", "sync", "async", "cheap")))
def test_runs_agree_across_modes_caps_pools_and_latencies(scn):
    # Async-only agents have no sequential counterpart (their `step` is Mesa's no-op),
    # so the reference is a parallel run with one agent in flight at a time.
    reference = run_parallel(scn, CONFIGS.index(("asyncio", 1, 2, "auto")))
    # A cheap agent has no turn: only its failures "at start" happen.
    expected_failures = sum(
        1 for (_, i), when in scn.failures.items() if scn.kinds[i] != "cheap" or when == "start"
    )
    assert sum(len(r[4]) for r in reference["reports"]) == expected_failures
    assert all(r[1] == len(scn.kinds) and r[3] == 0 for r in reference["reports"])
    for config in range(len(CONFIGS)):
        _assert_same(reference, run_parallel(scn, config), _describe(config))


# -- a failure before the turn ------------------------------------------------------
class Waiter(Trader):
    """The first agent in start order fails only once every other agent waits for it."""

    def is_first(self) -> bool:
        return self.index == self.model.first_index

    def arrive(self) -> None:
        with self.model.lock:
            self.model.waiting += 1
            if self.model.waiting == len(self.model.roster) - 1:
                self.model.all_waiting.set()

    def step(self) -> None:
        if self.is_first():
            assert self.model.all_waiting.wait(10), "the other agents never got going"
            raise ValueError("first agent fails before its turn")
        self.arrive()
        with in_turn(self):
            self.model.ledger.append(self.index)

    async def astep(self) -> None:
        if self.is_first():
            for _ in range(10_000):
                if self.model.all_waiting.is_set():
                    break
                await asyncio.sleep(0.001)
            assert self.model.all_waiting.is_set(), "the other agents never got going"
            raise ValueError("first agent fails before its turn")
        self.arrive()
        async with in_turn(self):
            self.model.ledger.append(self.index)


def _shuffled_indexes(seed: int, n: int) -> list[int]:
    """The start order of the first step of a seeded LedgerModel of ``n`` agents."""
    model = LedgerModel(seed, ["sync"] * n, [0.0] * n, {}, parallel=False)
    agents = list(model.agents)
    model.random.shuffle(agents)
    return [a.index for a in agents]


@pytest.mark.parametrize("mode", ["asyncio", "threading"])
def test_an_agent_failing_before_its_turn_does_not_block_later_agents(mode):
    n = 10
    order = _shuffled_indexes(7, n)
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=n, on_error="collect")

    class WaiterModel(LedgerModel):
        def __init__(self) -> None:
            super().__init__(7, [], [0.0], {}, parallel=True)
            self.roster = [Waiter(self, i) for i in range(n)]
            self.first_index = order[0]
            self.lock = threading.Lock()
            self.waiting = 0
            self.all_waiting = threading.Event()

    model = WaiterModel()
    _guarded(model.step)
    report = mlp.last_step_report(model)
    assert [(f.position, f.agent.index) for f in report.failures] == [(0, order[0])]
    assert isinstance(report.failures[0].exception, ValueError)
    assert (report.started, report.completed, report.skipped) == (n, n - 1, 0)
    assert report.peak_in_flight == n  # all of them were in flight, waiting for the first
    assert model.ledger == order[1:]  # every later agent took its turn, in start order
