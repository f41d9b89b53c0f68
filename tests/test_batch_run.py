"""batch_run: Mesa's rows, many runs at once under one quota, failures and interrupts."""

from __future__ import annotations

import _thread
import concurrent.futures
import inspect
import multiprocessing
import threading
import time
import typing
from pathlib import Path

import mesa
import pytest
from packaging.version import Version
from support import run_python
from sweep_models import Economy, Quiet, SeededEconomy, Survey

import mesa_llm_parallel as mlp
from mesa_llm_parallel import batchrunner
from mesa_llm_parallel._permits import permits
from mesa_llm_parallel.llm_server import LoopbackLLMServer

MODES = ("asyncio", "threading")
TESTS = Path(__file__).resolve().parent

#: Mesa 4 has no batch_run: there the rows are checked against the models' own frames.
with_mesas_batch_run = pytest.mark.skipif(
    not hasattr(mesa, "batch_run"),
    reason="this Mesa has no batch_run to compare with (Mesa 4); "
    "test_rows_match_the_models_own_data_frames covers it",
)


def mesa_rows(*args, **kwargs):
    """Mesa's own batch_run, sequential, without its side effect on the start method."""
    before = multiprocessing.get_start_method(allow_none=True)
    try:
        return mesa.batch_run(*args, number_processes=1, display_progress=False, **kwargs)
    finally:
        multiprocessing.set_start_method(before, force=True)


def reference_rows(model_cls, parameter_sets, seeds, max_steps):
    """The rows for data_collection_period=1, read from each model's DataFrames."""
    rows = []
    run_id = 0
    for iteration, seed in enumerate(seeds):
        for parameters in parameter_sets:
            kwargs = {**parameters, "rng": seed}
            model = model_cls(**kwargs)
            while model.running and batchrunner._model_time(model) < max_steps:
                model.step()
            model_frame = model.datacollector.get_model_vars_dataframe()
            agent_frame = model.datacollector.get_agent_vars_dataframe().reset_index()
            steps = sorted(set(agent_frame["Step"]))
            for index, step in enumerate(steps):
                model_data = model_frame.iloc[index].to_dict()
                for _, record in agent_frame[agent_frame["Step"] == step].iterrows():
                    rows.append(
                        {
                            "RunId": run_id,
                            "iteration": iteration,
                            "Step": step,
                            **kwargs,
                            **model_data,
                            "AgentID": record["AgentID"],
                            "Wealth": record["Wealth"],
                        }
                    )
            run_id += 1
    return rows


def test_the_signature_is_mesas_plus_keyword_only_extras():
    ours = inspect.signature(mlp.batch_run).parameters
    assert list(ours)[:8] == [
        "model_cls",
        "parameters",
        "number_processes",
        "iterations",
        "data_collection_period",
        "max_steps",
        "display_progress",
        "rng",
    ]
    extras = [p for p in ours.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert [p.name for p in extras] == ["executor", "max_concurrency", "rate_limit", "on_error"]
    assert ours["max_concurrency"].default is mlp.NOT_GIVEN
    if hasattr(mesa, "batch_run") and Version(mesa.__version__) >= Version("3.5.1"):
        # (earlier releases had other defaults; Mesa 4 has none)
        theirs = inspect.signature(mesa.batch_run).parameters
        for name in list(ours)[:8]:
            if name in theirs:
                assert ours[name].default == theirs[name].default, name


@pytest.mark.mesa_min("3.5.1", "the rows of Mesa 3.5.1's batch_run, rng= included")
@with_mesas_batch_run
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("period", [-1, 1, 2])
def test_rows_equal_mesas_batch_run_for_the_same_seeds(mode, period):
    params = {"n": [2, 4], "bonus": [0, 5, -1]}
    expected = mesa_rows(Economy, params, rng=[7, 8], max_steps=5, data_collection_period=period)
    mlp.enable_automatic_parallel_stepping(mode=mode)
    rows = mlp.batch_run(
        Economy,
        params,
        rng=[7, 8],
        max_steps=5,
        data_collection_period=period,
        display_progress=False,
    )
    assert rows == expected
    assert rows.failures == ()
    assert rows.runs == 12


@pytest.mark.mesa_min("3.5.1", "the rows of Mesa 3.5.1's batch_run, rng= included")
@with_mesas_batch_run
def test_rows_equal_mesas_for_seed_models_model_reporters_only_and_iterations():
    expected = mesa_rows(SeededEconomy, {"n": 3, "bonus": [1, 2]}, rng=[3], max_steps=3)
    assert (
        mlp.batch_run(
            SeededEconomy, {"n": 3, "bonus": [1, 2]}, rng=[3], max_steps=3, display_progress=False
        )
        == expected
    )
    assert "seed" in expected[0]
    assert "rng" not in expected[0]
    expected = mesa_rows(
        Quiet, {"level": [1, 2]}, rng=[1, 2], max_steps=4, data_collection_period=1
    )
    assert (
        mlp.batch_run(
            Quiet,
            {"level": [1, 2]},
            rng=[1, 2],
            max_steps=4,
            data_collection_period=1,
            display_progress=False,
        )
        == expected
    )
    with pytest.warns(DeprecationWarning, match="iterations"):
        expected = mesa_rows(Quiet, {"level": 3}, iterations=2, max_steps=2)
    with pytest.warns(DeprecationWarning, match="iterations"):
        rows = mlp.batch_run(Quiet, {"level": 3}, iterations=2, max_steps=2, display_progress=False)
    # iterations=2 is rng=[None, None]: unseeded, so the draws differ; the rest is equal.
    assert [{**r, "Draw": 0} for r in rows] == [{**r, "Draw": 0} for r in expected]


@pytest.mark.mesa_min("3.4", "a DataCollector that records its collection steps")
@pytest.mark.parametrize("mode", MODES)
def test_rows_match_the_models_own_data_frames_on_mesa_3_4_and_later(mode):
    parameter_sets = [{"n": 2, "bonus": 0}, {"n": 3, "bonus": 4}]
    expected = reference_rows(Economy, parameter_sets, [11, 12], max_steps=3)
    mlp.enable_automatic_parallel_stepping(mode=mode)
    rows = mlp.batch_run(
        Economy,
        {"n": [2, 3], "bonus": [0, 4]},
        rng=[11, 12],
        max_steps=3,
        data_collection_period=1,
        display_progress=False,
    )
    # The parameter product also holds the two mixed sets; compare the ones built above.
    chosen = [r for r in rows if (r["n"], r["bonus"]) in {(2, 0), (3, 4)}]
    renumbered = {old: new for new, old in enumerate(sorted({r["RunId"] for r in chosen}))}
    assert [{**r, "RunId": renumbered[r["RunId"]]} for r in chosen] == expected


class LegacyCollector:
    """A DataCollector of Mesa < 3.4: records by step, keeps no list of steps."""

    agent_reporters: typing.ClassVar[dict] = {"Wealth": "wealth"}
    agenttype_reporters: typing.ClassVar[dict] = {}
    _agenttype_records: typing.ClassVar[dict] = {}

    def __init__(self):
        self.model_vars = {"Total": [10, 11, 12, 13]}
        self._agent_records = {s: [(s, 1, 100 + s), (s, 2, 200 + s)] for s in (0, 1, 2, 3)}


class LegacyModel:
    def __init__(self, steps):
        self.steps = steps
        self.datacollector = LegacyCollector()


@pytest.mark.parametrize(("period", "steps"), [(-1, [2]), (1, [0, 1, 2]), (2, [0, 2])])
def test_a_collector_without_a_step_list_follows_mesa_3_5_1s_legacy_rule(period, steps):
    # Mesa 3.5.1 reads such a collector at range(0, model.steps, period), plus the last
    # step before model.steps, taking model values by the step's place among the
    # recorded steps.
    rows = batchrunner._rows(LegacyModel(3), 4, 0, {"n": 2}, period)
    assert [r["Step"] for r in rows] == [s for s in steps for _ in (1, 2)]
    assert [r["Total"] for r in rows] == [10 + s for s in steps for _ in (1, 2)]
    assert [r["Wealth"] for r in rows] == [w + s for s in steps for w in (100, 200)]
    assert {r["RunId"] for r in rows} == {4}


def test_a_model_without_a_datacollector_is_a_failure_named_as_such():
    class Bare(mesa.Model):
        def __init__(self, rng=None):
            super().__init__(rng=rng)

    with pytest.raises(AttributeError, match="no datacollector"):
        mlp.batch_run(Bare, {}, max_steps=1, display_progress=False)


def test_models_step_in_parallel_unless_they_opt_out():
    class Watched(Economy):
        reports: typing.ClassVar[list] = []

        def step(self):
            super().step()
            type(self).reports.append(mlp.last_step_report(self))

    class OptedOut(Watched):
        reports: typing.ClassVar[list] = []

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.parallel_stepping = False

    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    mlp.batch_run(Watched, {"n": 3}, max_steps=2, display_progress=False)
    mlp.batch_run(OptedOut, {"n": 3}, max_steps=2, display_progress=False)
    assert len(Watched.reports) == 2
    assert all(r is not None for r in Watched.reports)
    assert OptedOut.reports == [None, None]


def test_it_installs_parallel_stepping_when_it_is_not_enabled():
    assert not mlp.is_automatic_parallel_stepping_enabled()
    seen = []

    class Noting(Economy):
        def step(self):
            super().step()
            seen.append(mlp.last_step_report(self))

    mlp.batch_run(Noting, {"n": 2}, max_steps=1, display_progress=False)
    assert seen
    assert seen[0] is not None
    assert seen[0].mode == mlp.settings.mode


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"number_processes": 0}, ValueError, "number_processes"),
        ({"number_processes": "2"}, TypeError, "number_processes"),
        ({"data_collection_period": 0}, ValueError, "data_collection_period"),
        ({"max_steps": -1}, ValueError, "max_steps"),
        ({"on_error": "ignore"}, ValueError, "on_error"),
        ({"executor": object()}, TypeError, "executor"),
        ({"max_concurrency": 0}, ValueError, "max_concurrency"),
        ({"rate_limit": "fast"}, TypeError, "rate_limit"),
        ({"rng": [1], "iterations": 2}, ValueError, "iterations"),
        ({"parameters": {"n": []}}, ValueError, "'n'"),
        ({"parameters": [("n", 1)]}, TypeError, "parameters"),
    ],
)
def test_bad_arguments_are_named_and_nothing_runs(kwargs, error, names):
    made = []

    class Counted(Economy):
        def __init__(self, **kw):
            made.append(1)
            super().__init__(**kw)

    arguments = {"parameters": {"n": 2}, "display_progress": False, **kwargs}
    with pytest.raises(error, match=names):
        mlp.batch_run(Counted, **arguments)
    assert made == []


def test_an_executor_with_number_processes_is_refused():
    with (
        concurrent.futures.ThreadPoolExecutor(2) as pool,
        pytest.raises(ValueError, match="number_processes=2 with an executor"),
    ):
        mlp.batch_run(Economy, {"n": 2}, number_processes=2, executor=pool)


def test_a_class_from_a_function_cannot_go_to_a_process_pool():
    class Local(Economy):
        pass

    with pytest.raises(TypeError, match="inside a function"):
        mlp.batch_run(Local, {"n": 2}, number_processes=2, display_progress=False)


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_run_never_stops_the_others_and_is_raised_with_the_rows(mode):
    mlp.enable_automatic_parallel_stepping(mode=mode)
    params = {"n": 2, "bonus": [0, 1, 2, 3], "fail_at": None}
    with pytest.raises(ValueError, match="bonus=0 failed") as caught:
        mlp.batch_run(
            Economy,
            {**params, "bonus": [0, 1, 2, 3], "fail_at": [None, 2]},
            rng=[5],
            max_steps=3,
            display_progress=False,
        )
    error = caught.value
    failures = error.mesa_llm_parallel_run_failures
    # Every run with fail_at=2 failed; the first by RunId is raised.
    assert [f.run_id for f in failures] == [1, 3, 5, 7]
    assert failures[0].parameters == {"n": 2, "bonus": 0, "fail_at": 2, "rng": 5}
    assert isinstance(failures[0].exception, ValueError)
    rows = error.mesa_llm_parallel_rows
    assert sorted({r["RunId"] for r in rows}) == [0, 2, 4, 6]  # every other run finished
    assert "4 of 8 runs failed" in "\n".join(error.__notes__)

    collected = mlp.batch_run(
        Economy,
        {**params, "fail_at": [None, 2]},
        rng=[5],
        max_steps=3,
        display_progress=False,
        on_error="collect",
    )
    assert collected == rows
    assert [f.run_id for f in collected.failures] == [1, 3, 5, 7]


class Gauge:
    def __init__(self):
        self.lock = threading.Lock()
        self.now = self.peak = 0


@pytest.mark.parametrize("mode", MODES)
def test_runs_overlap_under_one_cap_counted_at_the_server(mode):
    mlp.enable_automatic_parallel_stepping(mode=mode)
    with LoopbackLLMServer(latency=0.05) as server:
        rows = mlp.batch_run(
            Survey,
            {"n": 3, "topic": ["tea", "coffee"], "base_url": server.base_url},
            rng=[1, 2, 3],
            max_steps=3,
            display_progress=False,
            max_concurrency=7,
        )
        stats = server.stats()
    assert stats.completed == 6 * 3 * 3
    assert stats.rate_limited == 0
    # 7 in flight means at least three runs' agents overlapped (a run has 3 agents).
    assert stats.peak_concurrency == 7
    assert len(rows) == 6 * 3
    assert mlp.settings.max_concurrency is None  # the batch's cap did not leak
    assert permits.held == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_shared_rate_limit_at_90_percent_of_the_quota_gets_no_429(mode):
    mlp.enable_automatic_parallel_stepping(mode=mode)
    with LoopbackLLMServer(latency=0.02, rate_limit=40) as server:
        mlp.batch_run(
            Survey,
            {"n": 4, "topic": ["a", "b", "c"], "base_url": server.base_url},
            rng=[1, 2],
            max_steps=2,
            display_progress=False,
            rate_limit=36,
        )
        stats = server.stats()
    assert stats.rate_limited == 0
    assert stats.completed == 6 * 4 * 2


def test_the_current_settings_apply_when_no_quota_is_given():
    mlp.enable_automatic_parallel_stepping(mode="asyncio", max_concurrency=2)
    with LoopbackLLMServer(latency=0.03) as server:
        mlp.batch_run(
            Survey,
            {"n": 3, "topic": ["x", "y"], "base_url": server.base_url},
            max_steps=2,
            display_progress=False,
        )
        assert server.stats().peak_concurrency == 2
        server.reset_stats()
        mlp.batch_run(  # None: no cap, whatever the settings say
            Survey,
            {"n": 3, "topic": ["x", "y"], "base_url": server.base_url},
            max_steps=1,
            display_progress=False,
            max_concurrency=None,
        )
        assert server.stats().peak_concurrency > 2


def test_the_progress_bar_counts_runs(capsys):
    mlp.batch_run(Quiet, {"level": [1, 2, 3]}, max_steps=1, display_progress=True)
    err = capsys.readouterr().err
    assert "batch_run" in err
    assert "3/3" in err


@pytest.mark.parametrize("mode", MODES)
def test_an_interrupt_cancels_the_runs_and_attaches_the_finished_rows(mode):
    mlp.enable_automatic_parallel_stepping(mode=mode)
    with LoopbackLLMServer(latency=0.2) as server:
        # topic "quick" runs one step; the others would take 50 steps of 0.2 s.
        class Mixed(Survey):
            def step(self):
                super().step()
                if self.topic == "quick":
                    self.running = False

        sampled = []
        sampling = threading.Event()

        def sample():
            while not sampling.is_set():
                sampled.append(server.stats().in_flight)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        timer = threading.Timer(1.5, _thread.interrupt_main)
        timer.start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt) as caught:
            mlp.batch_run(
                Mixed,
                {"n": 4, "topic": ["quick", "slow", "late"], "base_url": server.base_url},
                rng=[1, 2],
                max_steps=50,
                display_progress=False,
                max_concurrency=6,
            )
        took = time.monotonic() - started
        timer.join()
        rows = caught.value.mesa_llm_parallel_rows
        assert {r["topic"] for r in rows} == {"quick"}
        assert {r["RunId"] for r in rows} == {0, 3}
        assert "2 of 6 runs had finished" in caught.value.__notes__[0]
        assert took < 1.5 + 3.0  # the slow runs stopped instead of running 10 s
        deadline = time.monotonic() + 5
        while permits.held and time.monotonic() < deadline:
            time.sleep(0.05)
        assert permits.held == 0  # calls still in threads gave their permits back
        requests = server.stats().requests
        time.sleep(0.5)
        assert server.stats().requests == requests  # nothing of the batch still asks
        sampling.set()
        sampler.join()
        # The cap held through the interrupt: agents given back their permits by the
        # interrupted runs started nothing in the runs interrupted after them.
        assert max(sampled) <= 6


def test_numpy_integers_and_float_step_counts_are_accepted_as_mesa_accepts_them():
    numpy = pytest.importorskip("numpy")
    expected = mlp.batch_run(
        Quiet,
        {"level": [1, 2]},
        rng=[1],
        max_steps=2,
        data_collection_period=1,
        display_progress=False,
    )
    for options in (
        {"max_steps": numpy.int64(2), "data_collection_period": numpy.int64(1)},
        {"max_steps": 2.0, "data_collection_period": 1},
    ):
        assert (
            mlp.batch_run(Quiet, {"level": [1, 2]}, rng=[1], display_progress=False, **options)
            == expected
        )


def test_an_interrupt_keeps_the_failures_seen_so_far():
    class Slow(Economy):
        def step(self):
            super().step()
            time.sleep(0.2)

    threading.Timer(1.0, _thread.interrupt_main).start()
    with pytest.raises(KeyboardInterrupt) as caught:
        mlp.batch_run(
            Slow, {"n": 2, "fail_at": [1, None]}, rng=[1], max_steps=50, display_progress=False
        )
    failures = caught.value.mesa_llm_parallel_run_failures
    assert [f.run_id for f in failures] == [0]
    assert caught.value.mesa_llm_parallel_rows.failures == failures
    assert "0 of 2 runs had finished, 1 had failed" in caught.value.__notes__[0]
    assert "the other 1 were cancelled" in caught.value.__notes__[0]


def test_the_start_method_of_the_program_is_left_alone():
    # In a fresh interpreter: a progress bar (tqdm makes a multiprocessing lock), a
    # manager and a process pool all leave the start method as it was (unchosen, unless
    # importing this Mesa chose one: Mesa before 3.4 sets "spawn" when imported).
    result = run_python(
        f"""
        import multiprocessing, sys
        sys.path.insert(0, {str(TESTS)!r})
        import mesa_llm_parallel as mlp
        from sweep_models import Quiet

        if __name__ == "__main__":
            before = multiprocessing.get_start_method(allow_none=True)
            for options in ({{}}, {{"number_processes": 2}}):
                mlp.batch_run(Quiet, {{"level": 1}}, max_steps=1, display_progress=True,
                              **options)
                after = multiprocessing.get_start_method(allow_none=True)
                print("SAME" if after == before else f"CHANGED {{before}} -> {{after}}")
            if before is None:
                multiprocessing.set_start_method("forkserver")
            print("SET OK")
        """
    )
    assert result.stdout.count("SAME") == 2, result.stdout + result.stderr[-2000:]
    assert "SET OK" in result.stdout
