"""batch_run across processes: one quota for a process pool and for a Dask cluster.

Each test counts at the loopback server: calls in flight (``peak_concurrency``), 429s,
and which processes asked (the ``Pid`` agent reporter).
"""

from __future__ import annotations

import _thread
import concurrent.futures
import multiprocessing
import threading
import time

import pytest
from support import run_python
from sweep_models import Economy, Survey

import mesa_llm_parallel as mlp
from mesa_llm_parallel.llm_server import LoopbackLLMServer

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def dask_executor():
    """A Dask cluster of 2 worker processes on this machine (4 threads each)."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=4, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client.get_executor()


@pytest.fixture
def spawn_pool():
    with concurrent.futures.ProcessPoolExecutor(
        3, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        yield pool


def survey(server, topics=("tea", "coffee", "rain")):
    return {"n": 3, "topic": list(topics), "base_url": server.base_url}


def pids(rows):
    return {row["Pid"] for row in rows}


@pytest.mark.parametrize("mode", ["asyncio", "threading"])
def test_a_process_pool_shares_one_cap_and_gives_the_same_rows(mode, spawn_pool):
    mlp.enable_automatic_parallel_stepping(mode=mode)
    with LoopbackLLMServer(latency=0.1) as server:
        rows = mlp.batch_run(
            Survey,
            survey(server),
            rng=[1, 2],
            max_steps=3,
            display_progress=False,
            executor=spawn_pool,
            max_concurrency=4,
        )
        stats = server.stats()
    assert len(pids(rows)) >= 2  # the runs went to several processes
    # Three processes, each running a run of 3 agents: 9 could be in flight, 4 may.
    assert stats.peak_concurrency == 4
    assert stats.completed == 6 * 3 * 3
    assert stats.rate_limited == 0
    local = mlp.batch_run(
        Economy,
        {"n": [2, 3], "bonus": [1, 2]},
        rng=[4],
        max_steps=3,
        display_progress=False,
        data_collection_period=1,
    )
    assert (
        mlp.batch_run(
            Economy,
            {"n": [2, 3], "bonus": [1, 2]},
            rng=[4],
            max_steps=3,
            display_progress=False,
            data_collection_period=1,
            executor=spawn_pool,
        )
        == local
    )


def test_number_processes_starts_its_own_pool_under_a_shared_rate_limit():
    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    with LoopbackLLMServer(latency=0.02, rate_limit=30) as server:
        rows = mlp.batch_run(
            Survey,
            survey(server),
            rng=[1, 2],
            max_steps=2,
            display_progress=False,
            number_processes=2,
            rate_limit=27,
        )
        stats = server.stats()
    assert len(pids(rows)) == 2
    assert stats.rate_limited == 0
    assert stats.completed == 6 * 3 * 2


@pytest.mark.parametrize("mode", ["asyncio", "threading"])
def test_a_dask_cluster_shares_one_cap(mode, dask_executor):
    mlp.enable_automatic_parallel_stepping(mode=mode)
    with LoopbackLLMServer(latency=0.1) as server:
        rows = mlp.batch_run(
            Survey,
            survey(server, topics="abcd"),
            rng=[1, 2],
            max_steps=2,
            display_progress=False,
            executor=dask_executor,
            max_concurrency=5,
        )
        stats = server.stats()
    assert len(pids(rows)) == 2  # both workers ran runs
    assert stats.peak_concurrency == 5  # 8 runs x 3 agents wanted 24 at once
    assert stats.completed == 8 * 3 * 2
    assert stats.rate_limited == 0


def test_a_dask_cluster_shares_one_rate_limit_and_gives_the_same_rows(dask_executor):
    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    with LoopbackLLMServer(latency=0.02, rate_limit=30) as server:
        mlp.batch_run(
            Survey,
            survey(server),
            rng=[1, 2],
            max_steps=2,
            display_progress=False,
            executor=dask_executor,
            rate_limit=27,
        )
        stats = server.stats()
    assert stats.rate_limited == 0
    assert stats.completed == 6 * 3 * 2
    arguments = {
        "rng": [4, 5],
        "max_steps": 3,
        "display_progress": False,
        "data_collection_period": 1,
    }
    local = mlp.batch_run(Economy, {"n": [2, 3], "bonus": [1, 2]}, **arguments)
    assert (
        mlp.batch_run(Economy, {"n": [2, 3], "bonus": [1, 2]}, executor=dask_executor, **arguments)
        == local
    )


def test_a_failure_on_a_dask_worker_comes_back_with_its_traceback(dask_executor):
    with pytest.raises(ValueError, match="bonus=1 failed") as caught:
        mlp.batch_run(
            Economy,
            {"n": 2, "bonus": [1, 2], "fail_at": [None, 1]},
            rng=[1],
            max_steps=2,
            display_progress=False,
            executor=dask_executor,
        )
    notes = "\n".join(caught.value.__notes__)
    assert "Traceback in the worker process" in notes
    assert "sweep_models.py" in notes
    assert len(caught.value.mesa_llm_parallel_rows) == 2 * 2  # 2 runs x 2 agents, last step


@pytest.mark.parametrize("place", ["dask", "processes"])
def test_an_interrupt_stops_the_runs_in_every_process(place, dask_executor):
    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    options = {"executor": dask_executor} if place == "dask" else {"number_processes": 2}
    with LoopbackLLMServer(latency=0.2) as server:
        timer = threading.Timer(4.0, _thread.interrupt_main)
        timer.start()
        with pytest.raises(KeyboardInterrupt) as caught:
            mlp.batch_run(
                Survey,
                survey(server, topics="ab"),
                rng=[1, 2],
                max_steps=100,
                display_progress=False,
                max_concurrency=4,
                **options,
            )
        timer.join()
        assert caught.value.mesa_llm_parallel_rows == []
        assert "0 of 4 runs had finished" in caught.value.__notes__[0]
        # The runs stop on every worker: the server soon hears nothing more.
        time.sleep(1.0)
        requests = server.stats().requests
        time.sleep(1.0)
        assert server.stats().requests == requests
        assert server.stats().in_flight == 0


def test_a_class_defined_in_main_works_on_dask_and_is_refused_by_a_spawn_pool():
    result = run_python(
        """
        import mesa, distributed
        import mesa_llm_parallel as mlp

        class Notebook(mesa.Model):
            def __init__(self, k=1, rng=None):
                super().__init__(rng=rng)
                self.k = k
                self.datacollector = mesa.DataCollector(model_reporters={"K": "k"})
            def step(self):
                self.k += 1
                self.datacollector.collect(self)

        with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                                      dashboard_address=":0") as cluster, \\
                distributed.Client(cluster) as client:
            rows = mlp.batch_run(Notebook, {"k": [1, 5]}, max_steps=2, display_progress=False,
                                 executor=client.get_executor())
            print("DASK", [r["K"] for r in rows])
        try:
            mlp.batch_run(Notebook, {"k": 1}, number_processes=2, display_progress=False)
        except TypeError as error:
            print("POOL", error)
        """
    )
    assert "DASK [3, 7]" in result.stdout, result.stderr[-3000:]
    assert "POOL batch_run: Notebook is defined in a notebook cell" in result.stdout
