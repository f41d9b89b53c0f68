"""Scenario 3: the cost of the stepping machinery itself (agents that do nothing).

For 10,000 and 1,000 trivial agents, three variants are interleaved on the same model:

* parallel: ``model.step()`` with ``parallel_stepping = True``;
* sequential: the same ``model.step()`` with the flag off (the patch is installed, so
  this is Mesa's own loop behind the patch's flag check);
* bare: the same calls without Mesa or the library, on a persistent event loop
  (``asyncio.gather``) or a persistent ``ThreadPoolExecutor(64)`` (``map``).

Per-agent figures are reported two ways: *gross* = parallel step time / n (what the
targets are judged on, the stricter of the two) and *net* = (parallel - sequential) / n.
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from bench_common import Config, Row, Stats, fmt_ratio, fmt_stats, fmt_time, interleave
from bench_latency import WORKERS, verify_parallel
from bench_models import AsyncTrivialAgent, BenchModel, SyncTrivialAgent

from mesa_llm_parallel import enable_automatic_parallel_stepping, settings

__all__ = ["machinery"]

SIZES = (10_000, 1_000)
TARGET_SIZE = 10_000
TARGET_US = {"asyncio": 20.0, "threading": 60.0}
#: mesa-llm 0.3.2 on Mesa 3.4.2: machinery time per step, by mode and number of agents.
REFERENCE_STEP = {
    ("asyncio", 1_000): 0.011,
    ("asyncio", 10_000): 0.197,
    ("threading", 1_000): 0.358,
    ("threading", 10_000): 4.7,
}
REFERENCE_SEQUENTIAL = {1_000: 0.001, 10_000: 0.015}
_call_step = operator.methodcaller("step")


async def _gather_asteps(agents: list[AsyncTrivialAgent]) -> None:
    await asyncio.gather(*[agent.astep() for agent in agents])


def _measure(model: BenchModel, bare: Callable[[], None], repeats: int) -> list[Stats]:
    def parallel() -> None:
        model.parallel_stepping = True
        model.step()

    def sequential() -> None:
        model.parallel_stepping = False
        model.step()

    for warm_up in (parallel, sequential, bare):
        warm_up()
    return interleave([parallel, sequential, bare], repeats)


def _rows(mode: str, n: int, par: Stats, seq: Stats, bare: Stats, bare_name: str) -> list[Row]:
    per_agent = par.scaled(1e6 / n)
    net_us = (par.median - seq.median) * 1e6 / n
    seq_us = seq.median * 1e6 / n
    bare_us = bare.median * 1e6 / n
    ratio = par.median / bare.median
    at_target = n == TARGET_SIZE
    ref_step = REFERENCE_STEP[(mode, n)]
    data = {
        "n": n,
        "parallel": par.as_dict(),
        "sequential_flag_off": seq.as_dict(),
        bare_name: bare.as_dict(),
        "gross_us_per_agent": per_agent.median,
        "net_us_per_agent": net_us,
        "sequential_us_per_agent": seq_us,
        "bare_us_per_agent": bare_us,
        "ratio_to_bare": ratio,
    }
    label = "astep" if mode == "asyncio" else "step"
    rows = [
        Row(
            key=f"machinery_{mode}_{n}",
            scenario=(
                f"3. machinery, {mode}: {n:,} trivial {label}, per agent (gross = step time / n)"
            ),
            measured=fmt_stats(per_agent, unit="us"),
            baseline=f"sequential {seq_us:.1f} us; net {net_us:.1f} us",
            ratio="-",
            target=f"< {TARGET_US[mode]:.0f} us/agent" if at_target else "- (target at 10,000)",
            met=per_agent.median < TARGET_US[mode] if at_target else None,
            reference=(
                f"{ref_step * 1e6 / n:.1f} us ({fmt_time(ref_step)} per step; sequential "
                f"{REFERENCE_SEQUENTIAL[n] * 1e6 / n:.1f} us)"
            ),
            data=data,
        )
    ]
    if mode == "asyncio":
        rows.append(
            Row(
                key=f"machinery_asyncio_{n}_vs_gather",
                scenario=f"3. asyncio machinery vs bare asyncio.gather, {n:,} trivial coroutines",
                measured=fmt_stats(par),
                baseline=f"bare gather {fmt_stats(bare)} ({bare_us:.1f} us/agent)",
                ratio=fmt_ratio(ratio),
                target="<= 1.5x" if at_target else "- (target at 10,000)",
                met=ratio <= 1.5 if at_target else None,
                reference="-",
                data={"ratio": ratio},
            )
        )
    else:
        rows.append(
            Row(
                key=f"machinery_threading_{n}_vs_executor",
                scenario=(
                    f"3. threading machinery vs bare ThreadPoolExecutor(64).map, "
                    f"{n:,} trivial calls"
                ),
                measured=fmt_stats(par),
                baseline=f"bare map {fmt_stats(bare)} ({bare_us:.1f} us/agent)",
                ratio=fmt_ratio(ratio),
                target="- (no target)",
                met=None,
                reference="-",
                data={"ratio": ratio},
            )
        )
    return rows


def machinery(cfg: Config) -> list[Row]:
    """Scenario 3, both modes, 10,000 and 1,000 agents."""
    rows: list[Row] = []

    settings.reset()
    enable_automatic_parallel_stepping("asyncio")
    verify_parallel("asyncio")
    loop = asyncio.new_event_loop()
    try:
        for n in SIZES:
            model = BenchModel(AsyncTrivialAgent, n, parallel=True)
            agents = list(model.agents)

            def gather(agents: list[AsyncTrivialAgent] = agents) -> None:
                loop.run_until_complete(_gather_asteps(agents))

            par, seq, bare = _measure(model, gather, cfg.repeats)
            rows += _rows("asyncio", n, par, seq, bare, "bare_gather")
            del model, agents
    finally:
        loop.close()

    settings.reset()
    enable_automatic_parallel_stepping("threading", max_workers=WORKERS)
    verify_parallel("threading")
    with ThreadPoolExecutor(max_workers=WORKERS) as executor:
        for n in SIZES:
            model = BenchModel(SyncTrivialAgent, n, parallel=True)
            agents = list(model.agents)

            def executor_map(agents: list[SyncTrivialAgent] = agents) -> None:
                for _ in executor.map(_call_step, agents):
                    pass

            par, seq, bare = _measure(model, executor_map, cfg.repeats)
            rows += _rows("threading", n, par, seq, bare, "bare_executor_map")
            del model, agents
    return rows
