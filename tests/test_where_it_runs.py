"""Where a parallel step runs: forked processes, copies, contexts, loops and stuck threads.

Each group is one situation a program meets outside a plain script, with the behaviour
the library must have there:

* a process forked after a parallel step (``os.fork``, a ``multiprocessing`` pool) steps
  models in the child;
* a model whose failure was caught, or that stepped normally, can be pickled and copied,
  and a copy steps itself, never the original, with library state of its own;
* agents see the caller's ``contextvars`` in every mode;
* blocking steps started from tasks of an application's own running loop, or from an
  agent's ``astep`` on a first step, complete and leave that loop working;
* a rate-limited step starts no agent after a failure, and an interrupted one leaves no
  reserved start slots behind for the next step;
* a sync agent stuck past its timeout never holds up its step or the next one;
* async-only agents run on the model's one home loop in both modes, so loop-bound
  objects (an ``asyncio.Lock``, an ``AsyncOpenAI`` client) survive mode switches.

Situations that could hang run in a fresh interpreter with a deadline of its own, or in
a thread joined with a timeout: a hang is a failure, never a stuck test run.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import json
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

import mesa
import pytest
from support import create_agents, run_python, steps_of

import mesa_llm_parallel as mlp

MODES = ["asyncio", "threading"]
KINDS = ["sync", "async"]  # agents with a sync ``step`` only, or an ``async def astep`` only

#: Bounds every wait for something that could hang; no passing test comes near it.
WAIT = 5.0


def call_in_thread(function: Callable[[], Any], wait: float = WAIT) -> Any:
    """Run ``function`` in a daemon thread; its result, or its exception; fail on a hang."""
    result: list[Any] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(function())
        except BaseException as exc:  # handed to the test
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(wait)
    if thread.is_alive():
        pytest.fail(f"still running after {wait} s: the call hangs")
    if failure:
        raise failure[0]
    return result[0]


# -- scripts run in a fresh interpreter ------------------------------------------------
PRELUDE = """
import asyncio
import json
import os
import signal
import sys
import threading
import time
import traceback

import mesa

import mesa_llm_parallel as mlp


class SyncCounter(mesa.Agent):
    def __init__(self, model):
        super().__init__(model)
        self.steps = 0

    def step(self):
        self.steps += 1


class AsyncCounter(mesa.Agent):
    delay = 0.001

    def __init__(self, model):
        super().__init__(model)
        self.steps = 0

    async def astep(self):
        await asyncio.sleep(self.delay)
        self.steps += 1


COUNTERS = {"sync": SyncCounter, "async": AsyncCounter}


class Counters(mesa.Model):
    def __init__(self, agent_cls, n=6):
        super().__init__(rng=1)
        self.parallel_stepping = True
        for _ in range(n):
            agent_cls(self)

    def step(self):
        self.agents.shuffle_do("step")


def counts(model):
    return sorted(a.steps for a in model.agents)


def report(**values):
    print("RESULT " + json.dumps(values), flush=True)
"""


def run_script(body: str, **params: object) -> dict[str, Any]:
    """Run ``PRELUDE``, the ``params`` as upper-case constants, then ``body``; its RESULT."""
    constants = "".join(f"{name.upper()} = {value!r}\n" for name, value in params.items())
    result = run_python(PRELUDE + constants + body)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, (result.stdout, result.stderr[-4000:])
    return json.loads(lines[-1].removeprefix("RESULT "))


# -- 1. fork ---------------------------------------------------------------------------
FORK_SCRIPT = """
mlp.enable_automatic_parallel_stepping(mode=MODE, max_workers=4)
agent_cls = COUNTERS[KIND]
old = Counters(agent_cls)
old.step()
time.sleep(0.2)  # the pool's workers go back to waiting for jobs, as in any real program
pid = os.fork()
if pid == 0:  # the child: steps a new model, then the old one, and exits with _exit
    code = 1
    try:
        new = Counters(agent_cls)
        new.step()
        old.step()
        code = 0 if (counts(new), counts(old)) == ([1] * 6, [2] * 6) else 3
    except BaseException:
        traceback.print_exc()
        code = 2
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
deadline = time.monotonic() + CHILD_WAIT
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        report(child=f"exit {os.waitstatus_to_exitcode(status)}")
        break
    if time.monotonic() > deadline:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        report(child="hung")
        break
    time.sleep(0.01)
"""

POOL_SCRIPT = """
import multiprocessing

mlp.enable_automatic_parallel_stepping(mode=MODE, max_workers=4)
AGENT_CLS = COUNTERS[KIND]


def build_and_step(_):
    model = Counters(AGENT_CLS)
    model.step()
    return counts(model)


Counters(AGENT_CLS).step()
time.sleep(0.2)  # the pool's workers go back to waiting for jobs
with multiprocessing.get_context("fork").Pool(2) as workers:
    pending = workers.map_async(build_and_step, range(4))
    try:
        report(results=pending.get(timeout=CHILD_WAIT))
    except multiprocessing.TimeoutError:
        report(results="hung")
"""

FORK_CASES = [
    ("threading", "sync"),
    ("threading", "async"),
    ("asyncio", "sync"),
    ("asyncio", "async"),
]


@pytest.mark.parametrize(("mode", "kind"), FORK_CASES)
def test_a_forked_child_steps_a_new_and_the_old_model(mode, kind):
    result = run_script(FORK_SCRIPT, mode=mode, kind=kind, child_wait=WAIT)
    assert result == {"child": "exit 0"}


@pytest.mark.parametrize(("mode", "kind"), FORK_CASES)
def test_workers_of_a_fork_pool_each_build_and_step_a_model(mode, kind):
    result = run_script(POOL_SCRIPT, mode=mode, kind=kind, child_wait=WAIT)
    assert result == {"results": [[1] * 6] * 4}


# -- 2. copies and pickles ---------------------------------------------------------------
class SyncTally(mesa.Agent):
    """Counts its steps; agent 1 fails once when the model says so."""

    def __init__(self, model: mesa.Model) -> None:
        super().__init__(model)
        self.steps = 0

    def _count(self) -> None:
        self.steps += 1
        if self.unique_id == 1 and self.model.fail_next:
            self.model.fail_next = False
            raise ValueError("agent 1 failed")

    def step(self) -> None:
        self._count()


class AsyncTally(SyncTally):
    """The same with only ``async def astep`` (Mesa's no-op ``step``)."""

    step = mesa.Agent.step

    async def astep(self) -> None:
        await asyncio.sleep(0)
        self._count()


TALLIES = {"sync": SyncTally, "async": AsyncTally}


class Tallies(mesa.Model):
    """A module-level model (picklable) of four counting agents."""

    def __init__(self, kind: str, n: int = 4) -> None:
        super().__init__(rng=7)
        self.parallel_stepping = True
        self.fail_next = False
        create_agents(TALLIES[kind], self, n)

    def step(self) -> None:
        self.agents.shuffle_do("step")


def tallies(model: Tallies) -> dict[int, int]:
    return {a.unique_id: a.steps for a in model.agents}


def plus_one(counts: dict[int, int]) -> dict[int, int]:
    return {uid: n + 1 for uid, n in counts.items()}


def failed_once(mode: str, kind: str) -> Tallies:
    """A model whose parallel step raised; the user caught the exception."""
    mlp.enable_automatic_parallel_stepping(mode=mode)
    model = Tallies(kind)
    model.fail_next = True
    with pytest.raises(ValueError, match="agent 1 failed"):
        model.step()
    assert steps_of(model) == 1.0
    return model


def stepped_once(mode: str, kind: str) -> Tallies:
    mlp.enable_automatic_parallel_stepping(mode=mode)
    model = Tallies(kind)
    model.step()
    assert mlp.last_step_report(model).completed == 4
    return model


def unpickled(model: Tallies) -> Tallies:
    return pickle.loads(pickle.dumps(model))  # noqa: S301 - our own bytes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_a_model_whose_failure_was_caught_can_be_pickled(mode, kind):
    model = failed_once(mode, kind)
    twin = unpickled(model)
    assert tallies(twin) == tallies(model)
    assert steps_of(twin) == steps_of(model)


@pytest.mark.parametrize("twin_of", [copy.deepcopy, unpickled], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_a_copy_made_after_a_caught_failure_steps_itself_not_the_original(mode, kind, twin_of):
    model = failed_once(mode, kind)
    original = (steps_of(model), tallies(model))
    twin = twin_of(model)
    before = tallies(twin)

    twin.step()  # re-armed: Mesa would skip it otherwise; runs the twin's own agents
    assert (steps_of(twin), tallies(twin)) == (2.0, plus_one(before))
    assert (steps_of(model), tallies(model)) == original  # the original did not move
    assert mlp.last_step_report(twin).completed == 4
    twin.step()
    assert (steps_of(twin), tallies(twin)) == (3.0, plus_one(plus_one(before)))
    assert (steps_of(model), tallies(model)) == original

    model.step()  # and the original goes on by itself, untouched by its twin
    assert (steps_of(model), tallies(model)) == (2.0, plus_one(original[1]))
    assert steps_of(twin) == 3.0


@pytest.mark.parametrize("twin_of", [copy.deepcopy, unpickled], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_a_copy_made_after_a_successful_step_has_library_state_of_its_own(mode, kind, twin_of):
    model = stepped_once(mode, kind)
    original_report = mlp.last_step_report(model)
    original = tallies(model)
    twin = twin_of(model)
    assert mlp.home_loop(twin) is None  # a loop cannot be copied: no home until it steps

    twin.step()
    assert tallies(twin) == plus_one(original)
    assert tallies(model) == original
    twin_report = mlp.last_step_report(twin)
    assert twin_report is not original_report
    assert (twin_report.completed, twin_report.failures) == (4, ())
    assert mlp.last_step_report(model) is original_report

    model.step()
    assert tallies(model) == plus_one(original)
    assert mlp.last_step_report(model) is not twin_report
    assert mlp.last_step_report(twin) is twin_report


@pytest.mark.parametrize("after", ["success", "caught failure"])
@pytest.mark.parametrize("mode", MODES)
def test_a_shallow_copy_works_and_shares_no_home(mode, after):
    model = stepped_once(mode, "async") if after == "success" else failed_once(mode, "async")
    shallow = copy.copy(model)
    assert mlp.home_loop(shallow) is None  # documented: a copy has no home until it steps
    before = (steps_of(model), tallies(model))
    model.step()  # the original keeps stepping its own agents
    assert (steps_of(model), tallies(model)) == (before[0] + 1, plus_one(before[1]))


# -- 3. contextvars ----------------------------------------------------------------------
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


class SyncSeer(mesa.Agent):
    """Records the request id it sees from its sync ``step``."""

    def step(self) -> None:
        with self.model.lock:
            self.model.seen.append(REQUEST_ID.get())


class AsyncSeer(mesa.Agent):
    """Records the request id it sees from ``async def astep`` (its only step)."""

    async def astep(self) -> None:
        await asyncio.sleep(0)
        with self.model.lock:
            self.model.seen.append(REQUEST_ID.get())


class Seers(mesa.Model):
    def __init__(self, kind: str, n: int = 8) -> None:
        super().__init__(rng=2)
        self.parallel_stepping = True
        self.lock = threading.Lock()
        self.seen: list[str] = []
        create_agents({"sync": SyncSeer, "async": AsyncSeer}[kind], self, n)

    def step(self) -> None:
        self.agents.shuffle_do("step")


def seen_under_request_id(model: Seers, step: Callable[[], object]) -> list[str]:
    token = REQUEST_ID.set("run-7")
    try:
        step()
    finally:
        REQUEST_ID.reset(token)
    return model.seen


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_agents_see_the_callers_context_variables(mode, kind):
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=4)
    model = Seers(kind)
    assert seen_under_request_id(model, model.step) == ["run-7"] * 8


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "manual",
    [mlp.step_agents_multithreaded, mlp.step_agents_parallel_sync],
    ids=lambda f: f.__name__,
)
def test_agents_stepped_manually_see_the_callers_context_variables(manual, kind):
    model = Seers(kind)
    agents = list(model.agents)
    assert seen_under_request_id(model, lambda: manual(agents)) == ["run-7"] * 8


# -- 4. an application's own running loop ------------------------------------------------
FROM_TASKS_SCRIPT = """
mlp.enable_automatic_parallel_stepping(mode=MODE)
AsyncCounter.delay = 0.01
models = [Counters(AsyncCounter, n=5) for _ in range(5)]


async def step_blocking(model):
    model.step()  # the blocking call, from a task of the application's loop


async def main():
    # Five tasks start in the same turn of the loop and each steps its own model.
    if SPAWN == "gather":
        together = asyncio.gather(*(step_blocking(m) for m in models))
        await asyncio.sleep(0)
        await together
    else:
        tasks = [asyncio.create_task(step_blocking(m)) for m in models]
        for task in tasks:
            await task
    await asyncio.sleep(0)  # the application's loop still works afterwards
    return await asyncio.create_task(asyncio.sleep(0.01, result="loop still running"))


after = asyncio.run(main())
report(after=after, counts=[counts(m) for m in models])
"""


@pytest.mark.parametrize("spawn", ["gather", "create_task"])
@pytest.mark.parametrize("mode", MODES)
def test_blocking_steps_from_tasks_of_a_running_loop_complete(mode, spawn):
    result = run_script(FROM_TASKS_SCRIPT, mode=mode, spawn=spawn)
    assert result == {"after": "loop still running", "counts": [[1] * 5] * 5}


SUB_STEP_SCRIPT = """
mlp.enable_automatic_parallel_stepping(mode=MODE)


class Sub(mesa.Agent):
    def __init__(self, model):
        super().__init__(model)
        self.stepped_by = []

    async def astep(self, parent_id):
        await asyncio.sleep(0.01)
        self.stepped_by.append(parent_id)


class Parent(mesa.Agent):
    def __init__(self, model, subs):
        super().__init__(model)
        self.sub_agents = mesa.agent.AgentSet(subs, random=model.random)

    async def astep(self):
        await asyncio.sleep(0.001)
        self.sub_agents.shuffle_do("step", self.unique_id)  # blocking, inside astep


class Meta(mesa.Model):
    def __init__(self):
        super().__init__(rng=1)
        self.parallel_stepping = True
        for _ in range(10):
            Parent(self, [Sub(self) for _ in range(2)])

    def step(self):
        self.agents_by_type[Parent].shuffle_do("step")


model = Meta()
model.step()  # the first parallel step of this interpreter
parents = list(model.agents_by_type[Parent])
report(
    completed=mlp.last_step_report(model).completed,
    each_sub_by_its_parent=all(
        sub.stepped_by == [parent.unique_id] for parent in parents for sub in parent.sub_agents
    ),
    subs=sum(len(parent.sub_agents) for parent in parents),
)
"""


@pytest.mark.parametrize("mode", MODES)
def test_blocking_sub_steps_inside_astep_on_the_first_step_complete(mode):
    result = run_script(SUB_STEP_SCRIPT, mode=mode)
    assert result == {"completed": 10, "each_sub_by_its_parent": True, "subs": 20}


# -- 5. rate limit ----------------------------------------------------------------------
class FirstFails(mesa.Agent):
    """Records when it starts; the first agent of the step to start fails 50 ms later."""

    def _begin(self) -> bool:
        model = self.model
        with model.lock:
            model.starts.append(time.monotonic())
            return len(model.starts) == 1

    def _fail(self) -> None:
        self.model.failed_at = time.monotonic()
        raise ValueError("the first agent failed")


class SyncFirstFails(FirstFails):
    def step(self) -> None:
        if self._begin():
            time.sleep(0.05)
            self._fail()


class AsyncFirstFails(FirstFails):
    async def astep(self) -> None:
        if self._begin():
            await asyncio.sleep(0.05)
            self._fail()


class Starters(mesa.Model):
    def __init__(self, agent_cls: type[mesa.Agent], n: int) -> None:
        super().__init__(rng=4)
        self.parallel_stepping = True
        self.lock = threading.Lock()
        self.starts: list[float] = []
        self.failed_at: float | None = None
        create_agents(agent_cls, self, n)

    def step(self) -> None:
        self.agents.shuffle_do("step")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_a_rate_limited_step_starts_no_agent_after_a_failure(mode, kind):
    mlp.enable_automatic_parallel_stepping(mode=mode, rate_limit=10.0, on_error="raise")
    model = Starters({"sync": SyncFirstFails, "async": AsyncFirstFails}[kind], 20)
    with pytest.raises(ValueError, match="the first agent failed"):
        model.step()
    report = mlp.last_step_report(model)
    late = [t for t in model.starts if t > model.failed_at]
    assert late == [], f"{len(late)} agent(s) started after the failure"
    assert report.started == len(model.starts)
    assert report.not_started == 20 - len(model.starts)


RATE_SCRIPT = """
SLOT = 0.1
mlp.enable_automatic_parallel_stepping(mode=MODE, rate_limit=1 / SLOT, on_error="raise")
third_started = threading.Event()


class Stamped(mesa.Agent):
    def _begin(self):
        model = self.model
        with model.lock:
            model.starts.append(time.monotonic())
            third = len(model.starts) == 3
        if third:
            third_started.set()
            if HOW == "failure":
                raise ValueError("the third agent failed")
        return third

    def step(self):
        self._begin()
        time.sleep(0.01)


class AsyncStamped(Stamped):
    step = mesa.Agent.step

    async def astep(self):
        self._begin()
        await asyncio.sleep(0.01)


class Stamps(mesa.Model):
    def __init__(self, n):
        super().__init__(rng=5)
        self.parallel_stepping = True
        self.lock = threading.Lock()
        self.starts = []
        for _ in range(n):
            {"sync": Stamped, "async": AsyncStamped}[KIND](self)

    def step(self):
        self.agents.shuffle_do("step")


def interrupt_once_three_started():
    if third_started.wait(30):
        os.kill(os.getpid(), signal.SIGINT)


first = Stamps(30)
fresh = Stamps(2)
outcome = None
if HOW == "cancel":

    async def main():
        task = asyncio.create_task(mlp.step_agents_parallel(list(first.agents)))
        while not third_started.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        began = time.monotonic()
        await mlp.step_agents_parallel(list(fresh.agents))
        return "CancelledError", began

    outcome, began = asyncio.run(main())
else:
    if HOW == "interrupt":
        threading.Thread(target=interrupt_once_three_started, daemon=True).start()
    try:
        first.step()
    except (ValueError, KeyboardInterrupt) as exc:
        outcome = type(exc).__name__
    began = time.monotonic()
    fresh.step()  # a new step right after the one that was cut short
report(outcome=outcome, slots_until_first_start=(min(fresh.starts) - began) / SLOT)
"""

RATE_CASES = [
    (mode, how, kind) for mode in MODES for how in ("failure", "interrupt") for kind in KINDS
] + [("asyncio", "cancel", kind) for kind in KINDS]


@pytest.mark.parametrize(("mode", "how", "kind"), RATE_CASES)
def test_a_step_cut_short_leaves_no_start_slots_reserved_for_the_next_one(mode, how, kind):
    # 30 agents at 10 starts per second would take 3 s to start; the step ends after 3
    # starts. The next step's first agent must start within about one slot, not after
    # the 27 slots the first step no longer needs.
    result = run_script(RATE_SCRIPT, mode=mode, how=how, kind=kind)
    expected = {"failure": "ValueError", "interrupt": "KeyboardInterrupt"}.get(
        how, "CancelledError"
    )
    assert result["outcome"] == expected
    assert result["slots_until_first_start"] < 3, result


# -- 6. a sync agent stuck past its timeout ------------------------------------------------
class Blocker(mesa.Agent):
    """Sync only; while the model holds, the first agent to start blocks on its event."""

    def __init__(self, model: mesa.Model) -> None:
        super().__init__(model)
        self.steps = 0

    def step(self) -> None:
        model = self.model
        with model.lock:
            stuck = model.hold and model.stuck is None
            if stuck:
                model.stuck = self
        if stuck:
            model.blocking = True
            model.release.wait(30)
            model.blocking = False
        self.steps += 1


class Blockers(mesa.Model):
    def __init__(self, n: int = 5) -> None:
        super().__init__(rng=6)
        self.parallel_stepping = True
        self.lock = threading.Lock()
        self.release = threading.Event()  # held by the test
        self.hold = True
        self.stuck: Blocker | None = None
        self.blocking = False  # the stuck agent's call is blocked right now
        create_agents(Blocker, self, n)

    def step(self) -> None:
        self.agents.shuffle_do("step")


class StepThread(threading.Thread):
    """One ``model.step()`` in a daemon thread; what it raised is kept for the test."""

    def __init__(self, model: mesa.Model) -> None:
        super().__init__(daemon=True)
        self.model = model
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.model.step()
        except BaseException as exc:  # handed to the test
            self.error = exc

    def returned(self) -> bool:
        """Whether the step returned within ``WAIT``; re-raises what it raised."""
        self.join(WAIT)
        if self.is_alive():
            return False
        if self.error is not None:
            raise self.error
        return True


def still_blocked(model: Blockers) -> bool:
    return model.blocking and not model.release.is_set()


def unblock(model: Blockers, steps: list[StepThread]) -> None:
    """Release the stuck call and wait until it and the steps have returned."""
    model.release.set()
    deadline = time.monotonic() + WAIT
    while model.blocking and time.monotonic() < deadline:
        time.sleep(0.005)
    for step in steps:
        step.join(WAIT)


@pytest.mark.parametrize("mode", MODES)
def test_a_step_returns_while_a_timed_out_sync_agent_is_still_blocked(mode):
    mlp.enable_automatic_parallel_stepping(
        mode=mode, max_workers=1, timeout=0.3, on_error="collect"
    )
    model = Blockers()
    step = StepThread(model)
    try:
        assert step.returned(), "model.step() waited for the stuck agent"
        assert still_blocked(model)
        report = mlp.last_step_report(model)
        assert report.completed == 4
        assert [(f.agent, f.timed_out) for f in report.failures] == [(model.stuck, True)]
    finally:
        unblock(model, [step])


@pytest.mark.parametrize("mode", MODES)
def test_the_next_step_runs_every_agent_while_a_timed_out_one_is_still_blocked(mode):
    mlp.enable_automatic_parallel_stepping(
        mode=mode, max_workers=1, timeout=0.3, on_error="collect"
    )
    model = Blockers()
    steps = [StepThread(model)]
    try:
        assert steps[0].returned(), "the first step waited for the stuck agent"
        model.hold = False
        steps.append(StepThread(model))
        assert steps[1].returned(), "the next step queued behind the stuck agent"
        assert still_blocked(model)
        report = mlp.last_step_report(model)
        assert (report.completed, report.failures) == (5, ())
        assert model.stuck.steps == 1  # stepped again, while its first call is still blocked
        assert [a.steps for a in model.agents if a is not model.stuck] == [2] * 4
    finally:
        unblock(model, steps)


class AllBlock(mesa.Agent):
    """Sync only: blocks on the model's event for as long as the model holds."""

    def step(self) -> None:
        model = self.model
        if model.hold:
            with model.lock:
                model.blocked += 1
            model.release.wait(30)
            with model.lock:
                model.blocked -= 1
        with model.lock:
            model.stepped += 1


class AllBlockers(mesa.Model):
    def __init__(self, n: int = 3) -> None:
        super().__init__(rng=7)
        self.parallel_stepping = True
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.hold = True
        self.blocked = 0
        self.stepped = 0
        create_agents(AllBlock, self, n)

    def step(self) -> None:
        self.agents.shuffle_do("step")


def wait_until(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


@pytest.mark.parametrize("mode", MODES)
def test_abandoned_threads_are_bounded_by_max_workers(mode):
    mlp.enable_automatic_parallel_stepping(
        mode=mode, max_workers=1, timeout=0.2, on_error="collect"
    )
    model = AllBlockers()
    try:
        # 1st agent stuck: abandoned (1 <= max_workers); 2nd stuck too: over the bound.
        with pytest.raises(mlp.StuckThreadsError) as raised:
            call_in_thread(model.step)
        assert raised.value.bound == 1
        assert len(raised.value.stuck) == 2
        report = mlp.last_step_report(model)
        assert report.stuck_threads == 2
        assert len(report.timed_out) == 2
        assert report.not_started == 1  # the step stopped starting agents
        # While they are stuck, a step that needs the pool refuses to start more threads.
        with pytest.raises(mlp.StuckThreadsError, match="max_workers=1"):
            call_in_thread(model.step)
        assert model.blocked == 2  # nothing more started
    finally:
        model.hold = False
        model.release.set()
    assert wait_until(lambda: model.blocked == 0)
    assert wait_until(lambda: _stuck_threads() == 0)
    call_in_thread(model.step)  # the calls returned: the model steps again
    report = mlp.last_step_report(model)
    assert (report.completed, report.stuck_threads) == (3, 0)


def _stuck_threads() -> int:
    from mesa_llm_parallel._pool import stuck_threads

    return stuck_threads()


# -- 7. loop-bound objects across mode switches --------------------------------------------
SWITCHES = ["asyncio", "asyncio", "threading", "threading", "asyncio", "asyncio"]


class LockUser(mesa.Agent):
    """Async only: uses an ``asyncio.Lock`` made on its first use, held across an await."""

    def __init__(self, model: mesa.Model) -> None:
        super().__init__(model)
        self.steps = 0

    async def astep(self) -> None:
        model = self.model
        with model.guard:
            model.loops.add(asyncio.get_running_loop())
            if model.alock is None:
                model.alock = asyncio.Lock()
            alock = model.alock
        async with alock:  # contended: the lock binds to its loop and must stay on it
            await asyncio.sleep(0.001)
        self.steps += 1


class LockUsers(mesa.Model):
    def __init__(self, n: int = 12) -> None:
        super().__init__(rng=8)
        self.parallel_stepping = True
        self.guard = threading.Lock()
        self.loops: set[asyncio.AbstractEventLoop] = set()
        self.alock: asyncio.Lock | None = None
        create_agents(LockUser, self, n)

    def step(self) -> None:
        self.agents.shuffle_do("step")


def step_through_modes(model: mesa.Model) -> list[mlp.StepReport]:
    reports = []
    for mode in SWITCHES:
        mlp.settings.mode = mode
        model.step()
        reports.append(mlp.last_step_report(model))
    return reports


def test_async_agents_stay_on_the_models_one_loop_across_mode_switches():
    mlp.enable_automatic_parallel_stepping(on_error="collect")
    model = LockUsers()
    reports = call_in_thread(lambda: step_through_modes(model))
    assert [r.mode for r in reports] == SWITCHES
    assert [(r.completed, r.failures) for r in reports] == [(12, ())] * 6
    assert [a.steps for a in model.agents] == [6] * 12
    assert model.loops == {mlp.home_loop(model)}


class AsyncAsker(mesa.Agent):
    """Async only: asks the model's ``AsyncOpenAI`` client one question per step."""

    def __init__(self, model: mesa.Model) -> None:
        super().__init__(model)
        self.answers: list[str] = []

    async def astep(self) -> None:
        prompt = f"Agent {self.unique_id}, step {steps_of(self.model)}: should I cooperate?"
        self.answers.append(await self.model.llm.acomplete(prompt))


def test_one_async_openai_client_serves_every_step_across_mode_switches():
    pytest.importorskip("openai", reason="needs 'openai' (pip install 'mesa_llm_parallel[llm]')")
    from mesa_llm_parallel.llm_example import OpenAIChat
    from mesa_llm_parallel.llm_server import LoopbackLLMServer

    class Askers(mesa.Model):
        def __init__(self, base_url: str) -> None:
            super().__init__(rng=9)
            self.parallel_stepping = True
            self.llm = OpenAIChat(base_url)  # its async client belongs to one loop
            create_agents(AsyncAsker, self, 12)

        def step(self) -> None:
            self.agents.shuffle_do("step")

    mlp.enable_automatic_parallel_stepping(on_error="collect")
    with LoopbackLLMServer(latency=0.01) as server:
        model = Askers(server.base_url)
        try:
            reports = call_in_thread(lambda: step_through_modes(model))
        finally:
            model.llm.close()
        stats = server.stats()
    assert [[type(f.exception).__name__ for f in r.failures] for r in reports] == [[]] * 6
    assert (stats.requests, stats.completed, stats.errors) == (72, 72, 0)
    assert [len(a.answers) for a in model.agents] == [6] * 12


# -- found by trying them as a user would ----------------------------------------------
RID = contextvars.ContextVar("rid", default="none")


class Overwriter(mesa.Agent):
    """Sync only: records what it sees, then sets the variable for whoever comes next."""

    def step(self) -> None:
        self.model.seen.append(RID.get())
        RID.set(f"set-by-{self.unique_id}")
        for sub in getattr(self, "subs", ()):
            sub.step()


class Overwriters(mesa.Model):
    def __init__(self, n: int = 5) -> None:
        super().__init__(rng=3)
        self.parallel_stepping = True
        self.seen: list[str] = []
        create_agents(Overwriter, self, n)

    def step(self) -> None:
        self.agents.shuffle_do("step")


@pytest.mark.parametrize(
    "how", ["threading", "asyncio", "step_agents_multithreaded", "step_agents_parallel_sync"]
)
def test_an_agents_context_changes_do_not_reach_the_next_agent(how):
    # One worker: the agents run one after another in the same runner.
    mode = how if how in MODES else "asyncio"
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=1, max_concurrency=1)
    model = Overwriters()
    token = RID.set("caller")
    caller = contextvars.copy_context()  # the test's thread's context, for the step's thread
    RID.reset(token)
    if how in MODES:
        call_in_thread(lambda: caller.run(model.step))
    else:
        manual = getattr(mlp, how)
        call_in_thread(lambda: caller.run(manual, list(model.agents)))
    assert model.seen == ["caller"] * 5


@pytest.mark.parametrize("mode", MODES)
def test_steps_of_several_callers_with_stuck_agents_all_return(mode):
    never = threading.Event()

    class Stuck(mesa.Agent):
        def step(self) -> None:
            never.wait(30)

    mlp.enable_automatic_parallel_stepping(
        mode=mode, timeout=0.2, on_error="collect", max_workers=1
    )
    models = []
    for _ in range(3):
        model = mesa.Model(rng=1)
        model.parallel_stepping = True
        create_agents(Stuck, model, 1)
        models.append(model)
    outcomes: list[str] = []
    lock = threading.Lock()

    def step(model: mesa.Model) -> None:
        try:
            model.agents.shuffle_do("step")
            result = "returned"
        except mlp.StuckThreadsError:
            result = "StuckThreadsError"
        with lock:
            outcomes.append(result)

    try:
        threads = [threading.Thread(target=step, args=(m,), daemon=True) for m in models]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert len(outcomes) == 3, f"a step hangs: {outcomes}"  # each returned or raised
        if mode == "threading":  # each runner gets a thread in turn: 3 stuck > max_workers
            assert "StuckThreadsError" in outcomes
        # (In asyncio mode an agent whose job still waits for a thread when it times out
        # is cancelled: it never runs, and only one thread is stuck.)
        assert _stuck_threads() <= 3
    finally:
        never.set()
    assert wait_until(lambda: _stuck_threads() == 0)


class AsyncParent(mesa.Agent):
    """Async only: steps its sub-agents, blocking or awaiting."""

    def __init__(self, model: mesa.Model, subs: mesa.agent.AgentSet, how: str) -> None:
        super().__init__(model)
        self.subs, self.how = subs, how

    async def astep(self) -> None:
        await asyncio.sleep(0.001)
        if self.how == "blocking":
            self.subs.shuffle_do("step")
        else:
            await mlp.ashuffle_do(self.subs, "step")


class SubCounter(mesa.Agent):
    def step(self) -> None:
        self.model.sub_steps += 1


class Parents(mesa.Model):
    def __init__(self, parents: int, how: str) -> None:
        super().__init__(rng=4)
        self.parallel_stepping = True
        self.sub_steps = 0
        for _ in range(parents):
            subs = mesa.agent.AgentSet(create_agents(SubCounter, self, 3), random=self.random)
            AsyncParent(self, subs, how)

    def step(self) -> None:
        self.agents_by_type[AsyncParent].shuffle_do("step")


@pytest.mark.parametrize("how", ["blocking", "awaiting"])
def test_async_parents_holding_every_pool_thread_can_step_sub_agents(how):
    # Threading mode: each async parent's pool thread waits for it on the home loop; the
    # sub-step must not wait for a pool thread (there is none left).
    mlp.enable_automatic_parallel_stepping(mode="threading", max_workers=2)
    model = Parents(2, how)
    call_in_thread(model.step)
    assert model.sub_steps == 6


@pytest.mark.parametrize("mode", MODES)
def test_many_async_parents_with_blocking_sub_steps_never_hang(mode):
    mlp.enable_automatic_parallel_stepping(mode=mode, on_error="collect")
    model = Parents(100, "blocking")
    call_in_thread(model.step, wait=30)
    report = mlp.last_step_report(model)
    # Past the nesting bound the sub-steps run right in their parent: every parent steps
    # its (sync) sub-agents; never a RecursionError, never a hang.
    assert (report.completed, report.failures) == (100, ())
    assert model.sub_steps == 300


def test_many_cell_tasks_stepping_new_models_at_once(as_if_in_a_kernel):
    # A notebook cell that gathers 100 tasks, each stepping a model of its own: the first
    # ones nest on the kernel's loop, the rest go to the background loop.
    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    models = [Parents(1, "awaiting") for _ in range(100)]

    async def cell() -> None:
        async def handler(model: mesa.Model) -> None:
            await asyncio.sleep(0)
            model.step()

        await asyncio.gather(*(handler(m) for m in models))

    call_in_thread(lambda: asyncio.run(cell()), wait=30)
    assert [m.sub_steps for m in models] == [3] * 100


@pytest.mark.parametrize("mode", MODES)
def test_a_copy_taken_while_the_model_steps_in_another_thread_steps(mode):
    mlp.enable_automatic_parallel_stepping(mode=mode)
    gate, inside = threading.Event(), threading.Event()

    class Slow(mesa.Agent):
        def step(self) -> None:
            inside.set()
            gate.wait(WAIT)
            self.model.tally += 1

    class SlowModel(mesa.Model):
        def __init__(self) -> None:
            super().__init__(rng=2)
            self.parallel_stepping = True
            self.tally = 0
            create_agents(Slow, self, 2)

        def step(self) -> None:
            self.agents.shuffle_do("step")

    model = SlowModel()
    thread = threading.Thread(target=model.step, daemon=True)
    thread.start()
    try:
        assert inside.wait(WAIT)
        twin = copy.deepcopy(model)  # in the middle of the step
    finally:
        gate.set()
    thread.join(WAIT)
    before = twin.tally
    call_in_thread(twin.step)
    call_in_thread(twin.step)
    assert twin.tally == before + 4  # the copy steps itself (Mesa had not rescheduled it)
    assert model.tally == 2  # and never the original
