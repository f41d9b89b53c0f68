"""A model's home loop: every asyncio step of a model runs on one event loop.

Agents keep things that belong to the loop they were made on (an async HTTP client's
connections, asyncio locks and queues). These tests step one model from a script, from
worker threads, from inside running loops and from a loop that another thread runs, and
check where the agents really ran.
"""

from __future__ import annotations

import _thread
import asyncio
import gc
import threading
import time
import weakref

import mesa
import pytest
from support import create_agents, run_python, steps_of

import mesa_llm_parallel as mlp
from mesa_llm_parallel import _loops
from mesa_llm_parallel._state import state_of

WAIT = 30.0  # bounds a hang; no test expects to come near it


class LoopBound:
    """Like an async client: made on the loop of its first use, and only usable there."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()

    async def call(self, delay: float) -> None:
        if asyncio.get_running_loop() is not self.loop:
            raise RuntimeError("used on another event loop than the one it was made on")
        await asyncio.sleep(delay)


class Caller(mesa.Agent):
    async def astep(self) -> None:
        model = self.model
        with model.lock:
            model.where.add((threading.get_ident(), id(asyncio.get_running_loop())))
            model.in_flight += 1
            model.peak = max(model.peak, model.in_flight)
        try:
            if model.client is None:
                model.client = LoopBound()
            while model.gate is not None and not model.gate.is_set():  # noqa: ASYNC110 - set from another thread
                await asyncio.sleep(0.01)  # held until the test opens the gate
            await model.client.call(model.delay)
        finally:
            with model.lock:
                model.in_flight -= 1


class Calls(mesa.Model):
    def __init__(self, n: int = 8, delay: float = 0.01) -> None:
        super().__init__(rng=3)
        self.parallel_stepping = True
        self.delay = delay
        self.client: LoopBound | None = None
        self.gate: threading.Event | None = None
        self.lock = threading.Lock()
        self.where: set[tuple[int, int]] = set()
        self.in_flight = 0
        self.peak = 0
        create_agents(Caller, self, n)

    def step(self) -> None:
        self.agents.shuffle_do("step")

    def threads(self) -> set[int]:
        return {thread for thread, _ in self.where}

    def loops(self) -> set[int]:
        return {loop for _, loop in self.where}


@pytest.fixture(autouse=True)
def _asyncio_mode():
    mlp.enable_automatic_parallel_stepping(mode="asyncio")


def in_thread(function, *args):
    """Run ``function`` in a new thread; return what it returned, or raise what it raised."""
    result: list = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(function(*args))
        except BaseException as exc:  # handed to the test
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), "the thread did not finish"
    if failure:
        raise failure[0]
    return result[0]


def step_and_path(model: Calls) -> str | None:
    model.step()
    return mlp.last_loop_path()


class LoopThread:
    """An event loop running forever in its own thread, like a kernel's or a UI server's."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, function, *args):
        """Call ``function`` from a coroutine on the loop (code inside the running loop)."""

        async def inside():
            return function(*args)

        return asyncio.run_coroutine_threadsafe(inside(), self.loop).result(WAIT)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


@pytest.fixture
def loop_thread():
    running = LoopThread()
    yield running
    running.close()


# -- tests ----------------------------------------------------------------------------
def test_steps_from_several_threads_all_run_on_the_first_steps_loop():
    model = Calls()
    assert mlp.home_loop(model) is None
    assert step_and_path(model) == "thread_loop"
    home = mlp.home_loop(model)
    assert home is _loops.thread_loop()
    assert in_thread(step_and_path, model) == "home_loop"
    assert in_thread(step_and_path, model) == "home_loop"
    assert step_and_path(model) == "thread_loop"
    assert model.loops() == {id(home)}
    assert mlp.last_step_report(model).failures == ()
    assert steps_of(model) == 4


@pytest.mark.mesa_min("3.4", why="Mesa before 3.4 keeps every model alive")
def test_a_home_loop_outlives_its_thread_while_the_model_lives_then_closes():
    model = Calls()
    assert in_thread(step_and_path, model) == "thread_loop"  # that thread then ends
    home = mlp.home_loop(model)
    assert home is not None
    assert not home.is_closed()
    assert step_and_path(model) == "home_loop"  # driven from this thread now
    assert mlp.last_step_report(model).failures == ()
    assert model.loops() == {id(home)}
    assert len(model.threads()) == 2

    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # the home does not keep the model alive
    assert home.is_closed()  # and the loop went with the last model that needed it


def test_inside_a_running_loop_a_model_homed_elsewhere_steps_on_its_home():
    model = Calls()
    in_thread(step_and_path, model)
    home = mlp.home_loop(model)

    async def button_handler() -> str | None:  # a UI handler: another loop runs here
        return step_and_path(model)

    assert asyncio.run(button_handler()) == "home_loop"
    assert model.loops() == {id(home)}
    assert threading.get_ident() not in model.threads()  # a helper thread ran the home loop
    assert mlp.last_step_report(model).failures == ()


def test_a_model_homed_on_a_loop_another_thread_runs_is_stepped_there(
    loop_thread, as_if_in_a_kernel
):
    model = Calls()
    assert loop_thread.call(step_and_path, model) == "running_loop"  # reused, nested
    assert mlp.home_loop(model) is loop_thread.loop
    assert step_and_path(model) == "home_loop"  # from this thread: sent to that loop
    assert in_thread(step_and_path, model) == "home_loop"
    assert model.threads() == {loop_thread.thread.ident}
    assert model.loops() == {id(loop_thread.loop)}
    assert model.peak == len(model.agents)  # still concurrent there
    assert mlp.last_step_report(model).failures == ()


def test_two_models_sharing_a_home_step_at_once_from_two_threads():
    first, second = Calls(delay=0.2), Calls(delay=0.2)
    first.step()
    second.step()
    home = mlp.home_loop(first)
    assert mlp.home_loop(second) is home
    start = threading.Barrier(2)

    def step(model: Calls) -> None:
        start.wait(WAIT)
        model.step()

    threads = [threading.Thread(target=step, args=(m,)) for m in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    for model in (first, second):
        assert steps_of(model) == 2
        assert model.loops() == {id(home)}
        assert mlp.last_step_report(model).failures == ()


def test_a_closed_home_is_replaced(as_if_in_a_kernel):
    model = Calls()

    async def cell() -> None:
        model.step()

    asyncio.run(cell())  # home: that loop, closed when asyncio.run returns
    gone = model.client.loop
    assert gone.is_closed()
    model.client = None  # what a user does with a client whose loop is gone
    assert step_and_path(model) == "thread_loop"
    assert mlp.home_loop(model) is _loops.thread_loop()
    assert mlp.last_step_report(model).failures == ()


def test_background_setting_still_wins_over_the_home():
    model = Calls()
    model.step()
    mlp.settings.loop = "background"
    model.client = None
    assert step_and_path(model) == "background"
    background = mlp.home_loop(model)
    assert background is not _loops.thread_loop()
    mlp.settings.loop = "auto"
    assert step_and_path(model) == "background"  # its home now, while it runs
    assert mlp.last_step_report(model).failures == ()


def interrupt_while_waiting_for_the_home_loop(loop_thread: LoopThread) -> None:
    """The body of the test below (run in a fresh interpreter)."""
    model = Calls(n=6, delay=0.01)
    loop_thread.call(step_and_path, model)  # home: the loop in the other thread
    model.delay = WAIT

    def interrupt_once_all_started() -> None:
        deadline = time.monotonic() + WAIT
        while model.in_flight < len(model.agents) and time.monotonic() < deadline:
            time.sleep(0.01)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_all_started, daemon=True).start()
    try:
        model.step()
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the step was not interrupted")
    assert model.in_flight == 0  # every agent was cancelled and unwound on its loop
    report = mlp.last_step_report(model)
    assert report.interrupted
    assert report.started == len(model.agents)

    model.delay = 0.01
    steps = steps_of(model)
    model.step()
    assert steps_of(model) == steps + 1
    assert mlp.last_step_report(model).completed == len(model.agents)


def test_an_interrupt_while_waiting_for_the_home_loop_cancels_the_step():
    # In a fresh interpreter, with Python's own SIGINT handler: the interrupt is a
    # simulated Ctrl-C of the whole process, which nothing of another test may touch.
    result = run_python(
        """
        import signal, sys
        sys.path.insert(0, "tests")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import mesa_llm_parallel as mlp
        from mesa_llm_parallel import _loops
        import test_loops
        _loops._is_kernel_loop = lambda loop: True  # the other thread's loop: a kernel's
        mlp.enable_automatic_parallel_stepping(mode="asyncio")
        loop_thread = test_loops.LoopThread()
        test_loops.interrupt_while_waiting_for_the_home_loop(loop_thread)
        loop_thread.close()
        print("OK")
        """
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK")


def test_waiting_in_a_cell_keeps_the_home_loop_running_for_a_background_run(as_if_in_a_kernel):
    """A panel's run sends its steps to the kernel's loop while a cell waits for it."""
    model = Calls()
    done = threading.Event()
    failures: list[BaseException] = []

    def background_run() -> None:
        try:
            for _ in range(3):
                model.step()
        except BaseException as exc:
            failures.append(exc)
        finally:
            done.set()

    async def cell() -> bool:
        model.step()  # home: this running loop
        threading.Thread(target=background_run, daemon=True).start()
        return _loops.wait_event(done, WAIT)  # a plain done.wait() would block them both

    assert asyncio.run(cell()) is True
    assert failures == []
    assert steps_of(model) == 4
    assert model.threads() == {threading.get_ident()}


def test_asyncio_run_still_closes_its_loop_once_a_running_loop_was_reused(as_if_in_a_kernel):
    async def cell() -> asyncio.AbstractEventLoop:
        Calls().step()  # reuses this running loop: nest-asyncio2 is applied
        return asyncio.get_running_loop()

    asyncio.run(cell())
    assert mlp.last_loop_path() == "running_loop"
    later = asyncio.run(cell())  # asyncio.run is nest-asyncio2's from now on
    assert later.is_closed()


def test_a_step_needing_a_helper_thread_reports_home_loop_even_for_its_own_loop():
    model = Calls()
    model.step()  # home: this thread's own persistent loop

    async def button_handler() -> str | None:  # another loop runs here now
        return step_and_path(model)

    assert asyncio.run(button_handler()) == "home_loop"  # a helper thread ran it
    assert len(model.threads()) == 2


@pytest.mark.mesa_min("3.4", why="Mesa before 3.4 keeps every model alive")
def test_a_task_left_pending_on_the_home_loop_does_not_keep_the_model_alive():
    class Lingering(Caller):
        async def astep(self) -> None:
            await super().astep()
            # Like a client's keep-alive timer: still pending when the step is over.
            asyncio.get_running_loop().create_task(asyncio.sleep(3600))

    model = Calls(n=0)
    create_agents(Lingering, model, 3)
    in_thread(model.step)  # home: that thread's loop, which outlives the thread
    home = weakref.ref(mlp.home_loop(model))  # the loop refers to the model through its tasks
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
    assert home() is None or home().is_closed()


@pytest.mark.mesa_min("3.4", why="Mesa before 3.4 needs models to be hashable")
def test_a_model_that_cannot_be_hashed_steps_and_has_a_home():
    class Unhashable(Calls):
        __hash__ = None  # as a dataclass(eq=True) model is

    model = Unhashable()
    model.step()
    assert in_thread(step_and_path, model) == "home_loop"
    assert model.loops() == {id(mlp.home_loop(model))}


class Quiet(mesa.Agent):
    async def astep(self) -> None:
        await asyncio.sleep(0)


class QuietModel(mesa.Model):
    """Nothing in it but what Mesa keeps: it can be copied and pickled."""

    def __init__(self) -> None:
        super().__init__(rng=5)
        self.parallel_stepping = True
        create_agents(Quiet, self, 3)

    def step(self) -> None:
        self.agents.shuffle_do("step")


def test_a_copied_or_pickled_model_has_no_home_until_its_first_step():
    import copy
    import pickle

    model = QuietModel()
    model.step()
    assert mlp.home_loop(model) is not None
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # noqa: S301
        assert mlp.home_loop(twin) is None
        in_thread(twin.step)
        assert mlp.home_loop(twin) not in (None, mlp.home_loop(model))
        assert steps_of(twin) == 2


def test_closing_the_loops_while_a_step_waits_for_its_home_never_strands_it():
    """shutdown() closes idle loops only: one that a step is running, or joining, stays."""
    first, second = Calls(delay=0.01), Calls(delay=0.01)
    first.step()
    second.step()  # both homed on this thread's loop
    first.gate = second.gate = gate = threading.Event()
    done: list[str] = []

    def step(model: Calls, name: str) -> None:
        model.step()
        done.append(name)

    threads = [threading.Thread(target=step, args=(m, n)) for m, n in ((first, "a"), (second, "b"))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + WAIT
    while first.in_flight + second.in_flight < 16 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.in_flight + second.in_flight == 16
    _loops.close_loops()  # while both steps are in flight on the shared home loop
    gate.set()
    for thread in threads:
        thread.join(WAIT)
    assert sorted(done) == ["a", "b"]
    assert not mlp.home_loop(first).is_closed()


def test_a_step_sent_to_a_home_loop_that_stops_fails_instead_of_hanging(
    loop_thread, as_if_in_a_kernel
):
    model = Calls(delay=0.01)
    loop_thread.call(step_and_path, model)
    model.delay = WAIT

    def stop_once_started() -> None:
        deadline = time.monotonic() + WAIT
        while model.in_flight < len(model.agents) and time.monotonic() < deadline:
            time.sleep(0.01)
        loop_thread.loop.call_soon_threadsafe(loop_thread.loop.stop)

    threading.Thread(target=stop_once_started, daemon=True).start()
    with pytest.raises(RuntimeError, match="stopped before the step finished"):
        model.step()
    # The step's cancellation waits on that loop; it is the test's to run.
    loop_thread.thread.join(WAIT)
    loop_thread.loop.run_until_complete(asyncio.sleep(0.1))
    assert model.in_flight == 0


def test_another_callers_system_exit_does_not_strand_a_joined_step():
    class Exiting(Caller):
        async def astep(self) -> None:
            await asyncio.sleep(0.2)
            raise SystemExit(3)

    quitter, waiter = Calls(n=0), Calls(n=4, delay=0.01)
    create_agents(Exiting, quitter, 1)
    waiter.step()  # waiter's home: this thread's loop
    state_of(quitter).home = state_of(waiter).home  # shared
    waiter.delay = 0.6
    outcome: dict[str, object] = {}

    def step(model: Calls, name: str) -> None:
        try:
            model.step()
            outcome[name] = "ok"
        except BaseException as exc:
            outcome[name] = type(exc).__name__

    threads = [
        threading.Thread(target=step, args=(waiter, "waiter")),
        threading.Thread(target=step, args=(quitter, "quitter")),
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(WAIT)
    assert outcome == {"waiter": "ok", "quitter": "SystemExit"}


@pytest.mark.parametrize("mode", ["asyncio", "threading"])
def test_many_models_stepping_at_once_in_an_executor(mode):
    """What a batch runner with an executor does (Mesa's ``run_scenarios``)."""
    import concurrent.futures

    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=16)
    models = [Calls(n=6, delay=0.01) for _ in range(8)]
    steps = 4

    def run(model: Calls) -> tuple[int, int, set[int]]:
        completed = []
        for _ in range(steps):
            model.step()
            completed.append(mlp.last_step_report(model).completed)
        return sum(completed), model.peak, model.loops()

    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        results = list(executor.map(run, models, timeout=WAIT))
    for model, (completed, peak, loops) in zip(models, results, strict=True):
        assert completed == 6 * steps  # every agent once per step, a report per model
        assert peak > 1  # each model's agents overlapped
        assert loops == {id(mlp.home_loop(model))}  # one loop per model, its home
        assert steps_of(model) == steps


# -- steps held up by a busy loop of another thread ------------------------------------
BLOCK = 1.5  # how long the other thread's loop is blocked, in seconds


def block(loop_thread: LoopThread) -> None:
    """Make the other thread's loop run synchronous code for BLOCK s, as a busy cell does."""
    loop_thread.loop.call_soon_threadsafe(time.sleep, BLOCK)


def test_a_step_sent_to_a_loop_busy_with_other_work_is_stalled(loop_thread, as_if_in_a_kernel):
    model = Calls(delay=0.01)
    loop_thread.call(step_and_path, model)  # home: the loop the other thread runs
    block(loop_thread)  # before the step is sent: the loop starts it only afterwards
    assert step_and_path(model) == "home_loop"
    report = mlp.last_step_report(model)
    assert report.stalled_time >= BLOCK - 0.5
    assert report.stalled_time <= report.wall_time
    assert report.stalled
    assert "stalled" in report.summary()


def test_a_loop_blocked_while_the_step_runs_there_stalls_it(loop_thread, as_if_in_a_kernel):
    model = Calls(delay=0.01)
    loop_thread.call(step_and_path, model)
    model.gate = threading.Event()

    def block_once_all_started() -> None:
        deadline = time.monotonic() + WAIT
        while model.in_flight < len(model.agents) and time.monotonic() < deadline:
            time.sleep(0.01)
        block(loop_thread)
        model.gate.set()

    threading.Thread(target=block_once_all_started, daemon=True).start()
    model.step()
    report = mlp.last_step_report(model)
    assert report.failures == ()
    assert report.stalled_time >= BLOCK - 0.5
    assert report.stalled


def test_a_step_sent_to_an_idle_loop_of_another_thread_is_not_stalled(
    loop_thread, as_if_in_a_kernel
):
    model = Calls(delay=0.3)
    loop_thread.call(step_and_path, model)
    assert step_and_path(model) == "home_loop"
    report = mlp.last_step_report(model)
    assert report.stalled_time < 0.5  # at most a few poll intervals misread on a busy machine
    assert not report.stalled
    assert "stalled" not in report.summary()


def test_agents_keeping_the_loop_busy_do_not_stall_their_own_step(loop_thread, as_if_in_a_kernel):
    class Busy(Caller):
        async def astep(self) -> None:
            time.sleep(0.3)  # noqa: ASYNC251 - blocks the loop: the step's own work
            await super().astep()

    model = Calls(n=0)
    create_agents(Busy, model, 5)
    loop_thread.call(step_and_path, model)
    assert step_and_path(model) == "home_loop"
    report = mlp.last_step_report(model)
    assert report.wall_time >= 1.5  # the loop was blocked for most of the step
    assert report.stalled_time < 0.5  # at most a few poll intervals misread on a busy machine
    assert not report.stalled


def test_a_step_on_a_loop_the_calling_thread_runs_is_never_stalled(as_if_in_a_kernel):
    model = Calls()
    assert step_and_path(model) == "thread_loop"
    assert mlp.last_step_report(model).stalled_time == 0.0

    other = Calls()

    async def cell_with(model: Calls) -> str | None:
        return step_and_path(model)

    assert asyncio.run(cell_with(other)) == "running_loop"
    assert mlp.last_step_report(other).stalled_time == 0.0


def test_one_choice_says_which_thread_runs_which_loop(loop_thread, as_if_in_a_kernel):
    fresh = Calls()
    choice = _loops.choose_loop(fresh, "auto", None)  # a script: this thread's own loop
    assert (choice.path, choice.run_by, choice.at_home) == ("thread_loop", "caller", False)
    assert choice.loop is _loops.thread_loop()
    assert mlp.home_loop(fresh) is None  # choosing records nothing

    elsewhere = Calls()
    loop_thread.call(step_and_path, elsewhere)
    choice = _loops.choose_loop(elsewhere, "auto", None)
    assert (choice.path, choice.run_by, choice.at_home) == ("home_loop", "loop_thread", True)
    assert choice.loop is loop_thread.loop

    mine = Calls()
    mine.step()  # home: this thread's persistent loop

    async def button_handler() -> _loops.LoopChoice:  # another loop runs in this thread
        return _loops.choose_loop(mine, "auto", asyncio.get_running_loop())

    choice = asyncio.run(button_handler())
    assert (choice.path, choice.run_by) == ("home_loop", "helper")
    assert choice.loop is mlp.home_loop(mine)
    choice = _loops.choose_loop(mine, "background", None)
    assert (choice.path, choice.run_by, choice.at_home) == ("background", "loop_thread", False)
