"""Stress: hundreds of steps while another thread flips every switch at random.

A model of sync-only, async-only and both-method agents steps 300 times. Meanwhile a
second thread toggles, at seeded random moments, the model's ``parallel_stepping``
flag, ``settings.mode``, ``settings.max_workers`` (1-8), ``settings.max_concurrency``
(None, 1-8) and the patch itself, and makes invalid assignments that must be refused
without changing anything. A third thread samples the number of live threads; the
steps themselves run in a fourth, so that a deadlock fails the test.

Checked for every single step, whichever way it ran:

* every agent that can step did so exactly once, through exactly one of its methods,
  the one the step's mode picks (or ``step`` when Mesa's sequential loop ran);
* async-only agents ran exactly once in every parallel step and never in a sequential
  one (Mesa's own no-op ``step`` runs there);
* the ``in_turn`` blocks ran in the step's shuffled start order, the order a
  sequential run draws from the model's random generator;
* a parallel step left a fresh, clean report, a sequential one none.

And for the whole run: no exception other than those the test provokes, a bounded
number of threads while it runs, and no thread left after ``mlp.shutdown()``.
"""

from __future__ import annotations

import asyncio
import copy
import random
import threading
import time
from typing import Any

import mesa

import mesa_llm_parallel as mlp
from mesa_llm_parallel import in_turn

STEPS = 300
MAX_WORKERS = 8
#: Threads allowed beyond the pool's MAX_WORKERS while the run goes on. A resize
#: retires the old executor with shutdown(wait=False): its idle workers exit on their
#: own, a moment later, while the new executor may already be starting its workers.
#: Up to 3 such workers were seen at once under heavy CPU load; a leak (executors never
#: retired) would pass this bound within a few dozen resizes.
SLACK = MAX_WORKERS
#: Seconds the retired workers get to exit once the stepping has stopped.
SETTLE_TIMEOUT = 10.0
#: Seconds the whole run may take before it is reported as a hang (it takes about 4).
RUN_TIMEOUT = 120.0


class Counted(mesa.Agent):
    """Records every call, under the model's lock (agents may run in pool threads)."""

    def __init__(self, model: StressModel, seed: int) -> None:
        super().__init__(model)
        self.latency = (0.0, 0.0002, 0.0, 0.0005, 0.001)[seed % 5]

    def record(self, method: str) -> None:
        model = self.model
        with model.lock:
            model.calls.setdefault(model.step_no, []).append((self.unique_id, method))
            model.thread_samples.append(threading.active_count())

    def take_turn(self) -> None:
        with self.model.lock:
            self.model.turns.setdefault(self.model.step_no, []).append(self.unique_id)


class SyncOnly(Counted):
    def step(self) -> None:
        self.record("step")
        time.sleep(self.latency)
        with in_turn(self):
            self.take_turn()


class AsyncOnly(Counted):
    async def astep(self) -> None:
        self.record("astep")
        await asyncio.sleep(self.latency)
        async with in_turn(self):
            self.take_turn()


class Both(SyncOnly):
    async def astep(self) -> None:
        self.record("astep")
        await asyncio.sleep(self.latency)
        async with in_turn(self):
            self.take_turn()


class StressModel(mesa.Model):
    def __init__(self, seed: int = 5) -> None:
        super().__init__(rng=seed)
        self.parallel_stepping = True
        self.lock = threading.Lock()
        self.step_no = 0
        self.calls: dict[int, list[tuple[int, str]]] = {}
        self.turns: dict[int, list[int]] = {}
        self.thread_samples: list[int] = []
        #: Per step: the expected start order and the report (None if sequential).
        self.steps_seen: list[tuple[list[int], mlp.StepReport | None]] = []
        for i, cls in enumerate([SyncOnly, AsyncOnly, Both] * 8):
            cls(self, seed * 1000 + i)

    def step(self) -> None:
        self.step_no += 1
        # The order Mesa's shuffle (and the library's) will draw, from a copy of the RNG.
        twin = copy.deepcopy(self.random)
        order = list(self.agents)
        twin.shuffle(order)
        before = mlp.last_step_report(self)
        self.agents.shuffle_do("step")
        after = mlp.last_step_report(self)
        self.steps_seen.append(([a.unique_id for a in order], None if after is before else after))
        # Both ways consume the generator alike: it must now be where the twin is.
        assert self.random.getstate() == twin.getstate()


class Flipper(threading.Thread):
    """Flips switches at seeded random moments until told to stop."""

    def __init__(self, model: StressModel, seed: int) -> None:
        super().__init__(name="stress-flipper", daemon=True)
        self.model = model
        self.rng = random.Random(seed)  # noqa: S311 - a seeded test schedule
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.flips = 0
        self.refused = 0

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.flip()
                self.flips += 1
                time.sleep(self.rng.choice([0.0, 0.0001, 0.0005, 0.002]))
        except BaseException as exc:
            self.errors.append(exc)

    def flip(self) -> None:
        rng = self.rng
        action = rng.randrange(9)
        if action == 0:  # mostly on, so that about half of the steps run in parallel
            self.model.parallel_stepping = rng.random() < 0.75
        elif action == 1:
            mlp.settings.mode = rng.choice(mlp.MODES)
        elif action == 2:
            mlp.settings.max_workers = rng.randint(1, MAX_WORKERS)
        elif action == 3:
            mlp.settings.max_concurrency = rng.choice([None, *range(1, 9)])
        elif action == 4:
            mlp.disable_automatic_parallel_stepping()
        elif action in (5, 8):  # enabled twice as often as disabled
            mlp.enable_automatic_parallel_stepping(
                mode=rng.choice(mlp.MODES), max_workers=rng.randint(1, MAX_WORKERS)
            )
        elif action == 6:
            mlp.settings.update(
                mode=rng.choice(mlp.MODES),
                max_workers=rng.randint(1, MAX_WORKERS),
                max_concurrency=rng.choice([None, *range(1, 9)]),
            )
        else:
            self.provoke_refusal()

    def provoke_refusal(self) -> None:
        """An invalid change must raise and leave the settings and the patch as they were."""
        before = mlp.settings.snapshot()
        enabled = mlp.is_automatic_parallel_stepping_enabled()
        attempt = self.rng.randrange(4)
        try:
            if attempt == 0:
                mlp.settings.max_workers = 0
            elif attempt == 1:
                mlp.settings.update(max_workers=3, mode="fibers")
            elif attempt == 2:
                mlp.settings.max_concurrency = -1
            else:
                mlp.enable_automatic_parallel_stepping(mode="threading", max_workers=-2)
        except ValueError:
            self.refused += 1
        else:
            raise AssertionError(f"invalid change {attempt} was accepted")
        assert mlp.settings.snapshot() is before
        assert mlp.is_automatic_parallel_stepping_enabled() is enabled


class Sampler(threading.Thread):
    """Samples threading.active_count() until told to stop."""

    def __init__(self) -> None:
        super().__init__(name="stress-sampler", daemon=True)
        self.stop = threading.Event()
        self.samples: list[int] = []

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(threading.active_count())
            time.sleep(0.0005)


def _check_step(
    model: StressModel, step_no: int, order: list[int], report: mlp.StepReport | None
) -> dict[str, Any]:
    """Check one step; return what kind of step it was."""
    kinds = {a.unique_id: type(a) for a in model.agents}
    calls = model.calls.get(step_no, [])
    ran = [uid for uid, _ in calls]
    assert len(ran) == len(set(ran)), f"step {step_no}: an agent ran twice: {calls}"
    methods = dict(calls)
    if report is None:  # Mesa's sequential loop: sync `step`; async-only agents no-op
        expected = {uid: "step" for uid, cls in kinds.items() if cls is not AsyncOnly}
        assert methods == expected, f"step {step_no} (sequential): {calls}"
        mode = "sequential"
    else:
        mode = report.mode
        both = "astep" if mode == "asyncio" else "step"
        picks = {SyncOnly: "step", AsyncOnly: "astep", Both: both}
        expected = {uid: picks[cls] for uid, cls in kinds.items()}
        assert methods == expected, f"step {step_no} ({mode}): {calls}"
        n = len(kinds)
        assert (report.agents, report.started, report.completed, report.skipped) == (n, n, n, 0)
        assert report.failures == ()
        assert not report.interrupted
        assert 1 <= report.peak_in_flight <= (report.max_concurrency or n)
        assert 1 <= report.pool_size <= MAX_WORKERS
    # The in_turn blocks ran in start order (sequentially, in_turn does nothing, and
    # the order is Mesa's loop order, which is the same).
    expected_turns = [uid for uid in order if uid in methods]
    assert model.turns.get(step_no, []) == expected_turns, f"step {step_no} ({mode})"
    return {"mode": mode}


def test_stress_flipping_everything_while_stepping():
    mlp.shutdown()  # no pool or loop thread left by earlier tests
    baseline = threading.active_count()
    mlp.enable_automatic_parallel_stepping(mode="asyncio", max_workers=MAX_WORKERS)
    model = StressModel(seed=5)
    flipper = Flipper(model, seed=2024)
    sampler = Sampler()
    step_errors: list[BaseException] = []

    def run_steps() -> None:
        try:
            for _ in range(STEPS):
                model.step()
                if flipper.errors:
                    return
        except BaseException as exc:
            step_errors.append(exc)

    # The steps run in a helper thread too, so that a deadlock fails the test instead
    # of hanging it.
    stepper = threading.Thread(target=run_steps, name="stress-stepper", daemon=True)
    sampler.start()
    flipper.start()
    stepper.start()
    stepper.join(RUN_TIMEOUT)
    hung = stepper.is_alive()
    flipper.stop.set()
    sampler.stop.set()
    flipper.join(10)
    sampler.join(10)
    assert not hung, f"{model.step_no} steps done after {RUN_TIMEOUT} s: deadlock or hang"
    assert not flipper.is_alive()
    assert not sampler.is_alive()
    assert flipper.errors == []
    if step_errors:
        raise step_errors[0]

    # Every step, whichever way it ran.
    assert model.step_no == STEPS
    assert len(model.steps_seen) == STEPS
    seen_modes = [
        _check_step(model, i + 1, order, report)["mode"]
        for i, (order, report) in enumerate(model.steps_seen)
    ]

    # Per agent over the whole run: exactly one call per step it could take.
    parallel_steps = sum(mode != "sequential" for mode in seen_modes)
    per_agent: dict[int, int] = {}
    for calls in model.calls.values():
        for uid, _ in calls:
            per_agent[uid] = per_agent.get(uid, 0) + 1
    for agent in model.agents:
        expected = parallel_steps if type(agent) is AsyncOnly else STEPS
        assert per_agent.get(agent.unique_id, 0) == expected, agent

    # The flipping really exercised every path.
    assert {"sequential", "asyncio", "threading"} <= set(seen_modes), seen_modes
    assert flipper.flips > STEPS // 10
    assert flipper.refused > 0

    reports = [report for _, report in model.steps_seen if report is not None]
    assert len({r.pool_size for r in reports}) >= 3
    assert None in {r.max_concurrency for r in reports}
    assert len({r.max_concurrency for r in reports}) >= 3

    # Threads stayed bounded: the pool (<= MAX_WORKERS), the 3 helper threads, slack.
    bound = baseline + 3 + MAX_WORKERS + SLACK
    peak = max(sampler.samples + model.thread_samples)
    assert peak <= bound, f"{peak} threads (baseline {baseline}, bound {bound})"

    # Once no step runs, the retired workers leave: at most one pool's worth remains.
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while threading.active_count() > baseline + MAX_WORKERS and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= baseline + MAX_WORKERS

    mlp.shutdown()
    assert threading.active_count() <= baseline
