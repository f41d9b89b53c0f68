"""Scenarios 1, 2 and 5: agents that wait on a simulated language model.

1. asyncio mode, 1,000 agents awaiting ``asyncio.sleep(0.05)`` in ``astep``: one
   ``model.step()``, against a bare ``asyncio.gather`` of the same coroutines.
2. threading mode with 64 workers, 1,000 agents blocking in ``time.sleep(0.05)``: one
   ``model.step()``, against a bare ``ThreadPoolExecutor(64).map`` of the same calls.
5. Sequential baseline (Mesa untouched): 20 agents, extrapolated to 1,000, since the
   real thing would take 50 s.
"""

from __future__ import annotations

import asyncio
import math
import operator
import time
from concurrent.futures import ThreadPoolExecutor

from bench_common import Config, Row, fmt_ratio, fmt_stats, fmt_time, interleave
from bench_models import LATENCY, AsyncSleepAgent, BenchModel, SyncSleepAgent

from mesa_llm_parallel import (
    disable_automatic_parallel_stepping,
    enable_automatic_parallel_stepping,
    settings,
)

__all__ = ["asyncio_latency", "sequential_baseline", "threading_latency", "verify_parallel"]

N_AGENTS = 1_000
WORKERS = 64
SEQUENTIAL_AGENTS = 20
_call_step = operator.methodcaller("step")


async def _gather_asteps(agents: list[AsyncSleepAgent]) -> None:
    await asyncio.gather(*[agent.astep() for agent in agents])


def verify_parallel(mode: str) -> None:
    """Fail loudly if a step of 20 latency agents does not overlap their waits.

    A patch that silently falls back to sequential stepping (as the reference
    implementation does on Mesa 3.5) would otherwise make the machinery figures look
    excellent: sequential Mesa never awaits ``astep`` at all.
    """
    agent_class = AsyncSleepAgent if mode == "asyncio" else SyncSleepAgent
    model = BenchModel(agent_class, SEQUENTIAL_AGENTS, parallel=True)
    awaited_before = AsyncSleepAgent.awaited
    start = time.perf_counter()
    model.step()
    elapsed = time.perf_counter() - start
    if elapsed > SEQUENTIAL_AGENTS * LATENCY / 2:
        raise RuntimeError(
            f"{mode} mode did not step in parallel: {SEQUENTIAL_AGENTS} agents x "
            f"{LATENCY * 1e3:.0f} ms took {fmt_time(elapsed)}"
        )
    if mode == "asyncio" and AsyncSleepAgent.awaited - awaited_before != SEQUENTIAL_AGENTS:
        raise RuntimeError("asyncio mode did not await the agents' astep")


def asyncio_latency(cfg: Config) -> list[Row]:
    """Scenario 1."""
    settings.reset()
    enable_automatic_parallel_stepping("asyncio")
    verify_parallel("asyncio")
    model = BenchModel(AsyncSleepAgent, N_AGENTS, parallel=True)
    agents = list(model.agents)
    loop = asyncio.new_event_loop()  # kept across the repeats, like the library's own

    def bare() -> None:
        loop.run_until_complete(_gather_asteps(agents))

    try:
        model.step()  # warm-up: creates the library's persistent loop
        bare()
        ours, base = interleave([model.step, bare], cfg.repeats)
    finally:
        loop.close()
    ratio = ours.median / base.median
    data = {"ours": ours.as_dict(), "bare_gather": base.as_dict(), "ratio": ratio}
    return [
        Row(
            key="asyncio_1000_50ms",
            scenario="1. asyncio: one model.step(), 1,000 agents awaiting 50 ms",
            measured=fmt_stats(ours),
            baseline=f"bare gather {fmt_stats(base)}",
            ratio=fmt_ratio(ratio),
            target="< 80 ms",
            met=ours.median < 0.080,
            reference="82 ms",
            data=data,
        ),
        Row(
            key="asyncio_1000_50ms_vs_gather",
            scenario="1. asyncio vs bare asyncio.gather, same 1,000 coroutines",
            measured=fmt_time(ours.median),
            baseline=fmt_time(base.median),
            ratio=fmt_ratio(ratio),
            target="<= 1.5x",
            met=ratio <= 1.5,
            reference="-",
            data={"ratio": ratio},
        ),
    ]


def threading_latency(cfg: Config) -> list[Row]:
    """Scenario 2."""
    settings.reset()
    enable_automatic_parallel_stepping("threading", max_workers=WORKERS)
    verify_parallel("threading")
    model = BenchModel(SyncSleepAgent, N_AGENTS, parallel=True)
    agents = list(model.agents)
    with ThreadPoolExecutor(max_workers=WORKERS) as executor:

        def bare() -> None:
            for _ in executor.map(_call_step, agents):
                pass

        model.step()  # warm-up: starts the library's 64 workers
        bare()  # and the bare executor's
        ours, base = interleave([model.step, bare], cfg.repeats)
    ratio = ours.median / base.median
    ideal = math.ceil(N_AGENTS / WORKERS) * LATENCY
    return [
        Row(
            key="threading_1000_50ms",
            scenario="2. threading, 64 workers: one model.step(), 1,000 agents blocking 50 ms",
            measured=fmt_stats(ours),
            baseline=f"bare ThreadPoolExecutor(64).map {fmt_stats(base)}",
            ratio=fmt_ratio(ratio),
            target="< 1 s",
            met=ours.median < 1.0,
            reference="8.6 s (default pool: 6 workers)",
            data={
                "ours": ours.as_dict(),
                "bare_executor_map": base.as_dict(),
                "ratio": ratio,
                "ideal": ideal,
            },
        )
    ]


def sequential_baseline(cfg: Config) -> list[Row]:
    """Scenario 5: 20 agents with Mesa untouched, extrapolated to 1,000."""
    disable_automatic_parallel_stepping()
    model = BenchModel(SyncSleepAgent, SEQUENTIAL_AGENTS, parallel=False)
    (seq,) = interleave([model.step], cfg.sequential_repeats)
    factor = N_AGENTS / SEQUENTIAL_AGENTS
    extrapolated = seq.scaled(factor)
    return [
        Row(
            key="sequential_1000_50ms_extrapolated",
            scenario=(
                f"5. sequential (Mesa untouched), {SEQUENTIAL_AGENTS} agents blocking 50 ms, "
                f"extrapolated x{factor:.0f} to 1,000 (not run in full)"
            ),
            measured=f"{fmt_stats(extrapolated)} (measured {fmt_stats(seq)})",
            baseline="-",
            ratio="-",
            target="- (baseline)",
            met=None,
            reference="50.9 s (run in full)",
            data={"measured_20": seq.as_dict(), "extrapolated_1000": extrapolated.as_dict()},
        )
    ]
