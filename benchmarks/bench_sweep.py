"""Scenario 15: a sweep of many runs against one provider quota (``batch_run``).

16 runs x 50 agents x 5 steps, each agent one chat completion per step (openai's async
client, no retries, so that a 429 shows as a failure) against the loopback server in a
process of its own: 200 ms per request, a quota of 100 requests per second (429 beyond
it) and 64 requests served at once. 4,000 requests cannot take less than 40 s at 100 per
second: that, plus one request's latency, is the *ideal* time the quota allows.

Three ways, each under the same quota settings (``rate_limit`` at 90% of the server's
quota, ``max_concurrency`` 64), each model parallel-stepping:

* Mesa's ``batch_run`` (its runs one after another; Mesa 4 has none);
* our :func:`~mesa_llm_parallel.batch_run` in this process (the 16 runs at once);
* ours on a Dask ``LocalCluster`` of 2 worker processes with 8 threads each (its
  start-up timed apart, not counted).

Target: ours, in this process and on the cluster, within 1.2x of the ideal time, with
no 429. One sample each (a sample takes about 45 s); ``--quick``: 4 runs x 10 agents x 2
steps at 50 ms, without Mesa's and the cluster's rows.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import mesa
from bench_common import Config, Row, fmt_time
from bench_http import prepare_http
from bench_http_agents import AsyncChatAgent, HttpModel, make_async_client
from bench_server import ServerProcess

import mesa_llm_parallel as mlp

__all__ = ["sweep"]

TARGET_RATIO = 1.2
HEADROOM = 0.9
QUOTA = 100
IN_FLIGHT = 64


class SweepModel(HttpModel):
    """``n`` agents asking the server once per step; collects how many were answered."""

    def __init__(self, n: int = 50, base_url: str = "", rng: Any = None) -> None:
        client = make_async_client(base_url, connections=n, max_retries=0)
        super().__init__(AsyncChatAgent, n, async_client=client, seed=rng)
        self.datacollector = mesa.DataCollector(
            model_reporters={
                "Answered": lambda m: m.answered(),
                "Failed": lambda m: sum(m.failures.values()),
            }
        )

    def step(self) -> None:
        super().step()
        self.datacollector.collect(self)


def _one(label: str, run: Any, server: ServerProcess) -> dict[str, Any]:
    server.reset_stats()
    time.sleep(1.1)  # the server's one-second window is empty again
    started = time.perf_counter()
    rows = run()
    took = time.perf_counter() - started
    stats = server.stats()
    return {
        "label": label,
        "seconds": took,
        "rows": len(rows),
        "failed": sum(r["Failed"] for r in rows),
        "rate_limited": stats["rate_limited"],
        "completed": stats["completed"],
        "peak_concurrency": stats["peak_concurrency"],
    }


def sweep(config: Config) -> list[Row]:
    """Mesa's batch_run, ours in one process, ours on a 2-worker Dask cluster."""
    prepare_http()
    runs, agents, steps, latency = (4, 10, 2, 0.05) if config.quick else (16, 50, 5, 0.2)
    calls = runs * agents * steps
    ideal = calls / QUOTA + latency
    rate = HEADROOM * QUOTA
    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    results = []
    with ServerProcess(latency=latency, rate_limit=QUOTA, max_concurrent=IN_FLIGHT) as server:
        parameters = {"n": agents, "base_url": server.base_url}
        seeds = list(range(runs))
        common = {"max_steps": steps, "display_progress": False, "rng": seeds}
        quota = {"max_concurrency": IN_FLIGHT, "rate_limit": rate}

        if not config.quick and hasattr(mesa, "batch_run"):
            before = multiprocessing.get_start_method(allow_none=True)
            with mlp.settings.scoped(**quota):
                results.append(
                    _one(
                        "Mesa's batch_run",
                        lambda: mesa.batch_run(
                            SweepModel, parameters, number_processes=1, **common
                        ),
                        server,
                    )
                )
            multiprocessing.set_start_method(before, force=True)  # Mesa's side effect undone
        results.append(
            _one(
                "ours, one process",
                lambda: mlp.batch_run(SweepModel, parameters, **common, **quota),
                server,
            )
        )
        if not config.quick:
            import distributed

            started = time.perf_counter()
            with (
                distributed.LocalCluster(
                    n_workers=2, threads_per_worker=8, processes=True, dashboard_address=":0"
                ) as cluster,
                distributed.Client(cluster) as client,
            ):
                start_up = time.perf_counter() - started
                executor = client.get_executor()
                result = _one(
                    "ours, Dask 2 workers",
                    lambda: mlp.batch_run(
                        SweepModel, parameters, executor=executor, **common, **quota
                    ),
                    server,
                )
                result["cluster_start_up"] = start_up
                results.append(result)

    rows = []
    for result in results:
        ratio = result["seconds"] / ideal
        ours = result["label"].startswith("ours")
        extra = ""
        if "cluster_start_up" in result:
            extra = f"; cluster start-up {fmt_time(result['cluster_start_up'])} (not counted)"
        rows.append(
            Row(
                key=f"sweep {result['label']}",
                scenario=(
                    f"sweep {runs} runs x {agents} agents x {steps} steps, quota "
                    f"{QUOTA}/s & {IN_FLIGHT} in flight: {result['label']}"
                ),
                measured=(
                    f"{fmt_time(result['seconds'])}; 429: {result['rate_limited']}; peak in "
                    f"flight {result['peak_concurrency']}{extra}"
                ),
                baseline=f"ideal {fmt_time(ideal)} ({calls} calls / {QUOTA}/s)",
                ratio=f"{ratio:.2f}x",
                target=f"<= {TARGET_RATIO}x, no 429" if ours else "",
                met=(
                    ratio <= TARGET_RATIO and result["rate_limited"] == 0 and result["failed"] == 0
                )
                if ours
                else None,
                reference="",
                data={**result, "ideal": ideal, "ratio": ratio},
            )
        )
    return rows
