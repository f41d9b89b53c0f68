"""Scenarios 12-13: big models. Mixed models of cheap and LLM agents; 100,000 agents.

12. ``mixed``: N cheap rule-based agents (a sync ``step`` of ~0.1-0.5 us, Mesa's own
    loop) beside 100 language-model agents awaiting ``asyncio.sleep(0.05)``, one
    asyncio-mode ``model.step()``, for N = 10,000 and 50,000. The limit of such a step
    is the cheap agents' own sequential time (measured in the same run: the same model
    with the flag off, where the LLM agents' ``step`` is Mesa's no-op) plus the 50 ms
    wait; the target is 1.3x that. The same step with every sync agent sent to the
    thread pool (``run_sync_inline=False``, what the library did before it measured
    classes) is shown beside it at 10,000.
13. ``scale``: N agents each awaiting ``asyncio.sleep(0.5)``, one asyncio-mode step
    against a bare ``asyncio.gather`` of the same coroutines on a persistent loop, for
    N = 100 ... 100,000 (the target, 1.2x, at 10,000 and 100,000), with the peak memory
    of each step above the idle model (``VmHWM`` reset through ``/proc/self/clear_refs``,
    Linux). At 100,000 two more rows say where the time goes: our step with the
    collector left at its default thresholds (``_collector.SCALE_FROM`` raised), and the
    bare gather under the same collector scaling as ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import mesa
from bench_common import (
    Config,
    Row,
    Stats,
    fmt_ratio,
    fmt_stats,
    fmt_time,
    interleave,
    run_child_json,
)

from mesa_llm_parallel import _collector, enable_automatic_parallel_stepping, settings
from mesa_llm_parallel import _placement as placement
from mesa_llm_parallel._report import last_step_report

__all__ = ["mixed", "scale"]

LLM_AGENTS = 100
LLM_LATENCY = 0.05
MIXED_SIZES = (10_000, 50_000)
MIXED_TARGET = 1.3
SCALE_LATENCY = 0.5
SCALE_SIZES = (100, 1_000, 10_000, 30_000, 100_000)
SCALE_SIZES_QUICK = (100, 1_000, 10_000)
SCALE_TARGET = 1.2
SCALE_TARGET_SIZES = (10_000, 100_000)


class Cell(mesa.Agent):
    """A rule-based agent: a cheap sync step on its own state (a grid cell, a resource)."""

    def __init__(self, model: mesa.Model) -> None:
        super().__init__(model)
        self.level = 0

    def step(self) -> None:
        self.level = (self.level + 1) % 7


class Thinker(mesa.Agent):
    """A language-model agent: awaits its model's answer."""

    async def astep(self) -> None:
        await asyncio.sleep(self.model.latency)


class ScaleModel(mesa.Model):
    """``cheap`` cells and ``thinkers`` language-model agents, stepped by shuffle_do."""

    def __init__(self, cheap: int, thinkers: int, latency: float) -> None:
        super().__init__(rng=7)
        self.latency = latency
        Cell.create_agents(self, cheap)
        Thinker.create_agents(self, thinkers)

    def step(self) -> None:
        self.agents.shuffle_do("step")


# -- memory ----------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory_above(fn: Callable[[], object]) -> float | None:
    """Peak resident memory of the process during ``fn`` above what it had before, MiB.

    None where the peak cannot be reset (not Linux).
    """
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")  # VmHWM := VmRSS
        before = _status_kb("VmRSS")
    except OSError:
        return None
    fn()
    return (_status_kb("VmHWM") - before) / 1024


def _memory_in_child(variant: str, n: int) -> float | None:
    """:func:`peak_memory_above` one first step, in a fresh interpreter (no reused arenas)."""
    value = run_child_json(
        [sys.executable, str(Path(__file__).resolve()), "memory", variant, str(n)],
        what=f"memory child ({variant}, {n:,} agents)",
        timeout=600,
    )
    return None if value is None else float(value)


def _memory_main(variant: str, n: int) -> None:
    """In the child: build the model, then measure one step of ``variant``."""
    enable_automatic_parallel_stepping("asyncio")
    model = ScaleModel(0, n, SCALE_LATENCY)
    model.parallel_stepping = True
    agents = list(model.agents)
    loop = asyncio.new_event_loop()

    async def gather_all() -> None:
        await asyncio.gather(*[agent.astep() for agent in agents])

    if variant == "ours":
        step: Callable[[], object] = model.step
    else:

        def step() -> None:
            loop.run_until_complete(gather_all())

    print(json.dumps(peak_memory_above(step)))


# -- 12. mixed ------------------------------------------------------------------------
def mixed(cfg: Config) -> list[Row]:
    """Scenario 12: cheap sync agents beside LLM agents, asyncio mode."""
    rows: list[Row] = []
    sizes = (2_000,) if cfg.quick else MIXED_SIZES
    repeats = 3 if cfg.quick else cfg.repeats
    settings.reset()
    enable_automatic_parallel_stepping("asyncio")
    for n in sizes:
        model = ScaleModel(n, LLM_AGENTS, LLM_LATENCY)

        def parallel(model: ScaleModel = model) -> None:
            model.parallel_stepping = True
            model.step()

        def sequential(model: ScaleModel = model) -> None:
            model.parallel_stepping = False
            model.step()

        def all_in_pool(model: ScaleModel = model) -> None:
            settings.run_sync_inline = False
            try:
                parallel(model)
            finally:
                settings.run_sync_inline = "auto"

        parallel()  # the first step observes the cheap class in the pool
        if last_step_report(model).started != n + LLM_AGENTS:
            raise RuntimeError("the mixed step did not run every agent in parallel")
        where = {(p.agent_class, p.where) for p in last_step_report(model).placement}
        parallel()
        where = {(p.agent_class, p.where) for p in last_step_report(model).placement}
        if ("Cell", placement.INLINE) not in where:
            raise RuntimeError(f"the cheap agents did not move inline: {where}")
        variants = [parallel, sequential]
        with_pool = n == sizes[0]
        if with_pool:
            variants.append(all_in_pool)
        stats = interleave(variants, repeats)
        par, seq = stats[0], stats[1]
        ideal = seq.median + LLM_LATENCY
        ratio = par.median / ideal
        rows.append(
            Row(
                key=f"mixed_{n}",
                scenario=(
                    f"12. mixed, asyncio: {n:,} cheap sync agents + {LLM_AGENTS} awaiting "
                    f"{LLM_LATENCY * 1e3:.0f} ms"
                ),
                measured=fmt_stats(par),
                baseline=(
                    f"limit {fmt_time(ideal)} = cheap agents sequential "
                    f"{fmt_stats(seq)} + {LLM_LATENCY * 1e3:.0f} ms"
                ),
                ratio=fmt_ratio(ratio),
                target=f"<= {MIXED_TARGET}x limit",
                met=ratio <= MIXED_TARGET,
                reference="-",
                data={
                    "n": n,
                    "parallel": par.as_dict(),
                    "sequential": seq.as_dict(),
                    "limit": ideal,
                    "ratio": ratio,
                    "per_cheap_agent_us": (par.median - LLM_LATENCY) * 1e6 / n,
                    "sequential_per_cheap_agent_us": seq.median * 1e6 / n,
                },
            )
        )
        if with_pool:
            pool = stats[2]
            rows.append(
                Row(
                    key=f"mixed_{n}_all_in_pool",
                    scenario=(
                        "12. the same step, every sync agent in the thread pool "
                        "(run_sync_inline=False)"
                    ),
                    measured=fmt_stats(pool),
                    baseline=f"limit {fmt_time(ideal)}",
                    ratio=fmt_ratio(pool.median / ideal),
                    target="- (what measuring classes avoids)",
                    met=None,
                    reference="-",
                    data={"n": n, "all_in_pool": pool.as_dict(), "ratio": pool.median / ideal},
                )
            )
        del model
    settings.reset()
    return rows


# -- 13. scale ------------------------------------------------------------------------
@contextlib.contextmanager
def _collector_left_alone() -> Iterator[None]:
    saved = _collector.SCALE_FROM
    _collector.SCALE_FROM = 1 << 62  # type: ignore[misc]
    try:
        yield
    finally:
        _collector.SCALE_FROM = saved  # type: ignore[misc]


def scale(cfg: Config) -> list[Row]:
    """Scenario 13: N agents awaiting 0.5 s, ours against a bare gather, with memory."""
    rows: list[Row] = []
    sizes = SCALE_SIZES_QUICK if cfg.quick else SCALE_SIZES
    settings.reset()
    enable_automatic_parallel_stepping("asyncio")
    loop = asyncio.new_event_loop()
    try:
        for n in sizes:
            model = ScaleModel(0, n, SCALE_LATENCY)
            model.parallel_stepping = True
            agents = list(model.agents)

            async def gather_all(agents: list[Thinker] = agents) -> None:
                await asyncio.gather(*[agent.astep() for agent in agents])

            def ours(model: ScaleModel = model) -> None:
                model.step()

            def gather(gather_all: Callable[[], object] = gather_all) -> None:
                loop.run_until_complete(gather_all())

            repeats = max(3, cfg.repeats // 2) if n >= 30_000 else cfg.repeats
            ours()
            gather()
            variants: list[Callable[[], object]] = [ours, gather]
            detail = n == sizes[-1] and not cfg.quick
            if detail:

                def ours_default_collector(ours: Callable[[], None] = ours) -> None:
                    with _collector_left_alone():
                        ours()

                def gather_scaled(gather: Callable[[], None] = gather, n: int = n) -> None:
                    with _collector.scaled_collector(n):
                        gather()

                variants += [ours_default_collector, gather_scaled]
            stats = interleave(variants, repeats)
            memory = (_memory_in_child("ours", n), _memory_in_child("gather", n))
            rows.append(_scale_row(n, stats[0], stats[1], memory))
            if detail:
                rows += _detail_rows(n, stats)
            del model, agents
    finally:
        loop.close()
    settings.reset()
    return rows


def _mib(value: float | None, n: int) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f} MiB ({value * 1024 * 1024 / n:,.0f} B/agent)"


def _scale_row(n: int, ours: Stats, gather: Stats, memory: tuple[float | None, ...]) -> Row:
    ratio = ours.median / gather.median
    at_target = n in SCALE_TARGET_SIZES
    return Row(
        key=f"scale_{n}",
        scenario=f"13. scale, asyncio: {n:,} agents awaiting {SCALE_LATENCY * 1e3:.0f} ms",
        measured=f"{fmt_stats(ours)}; peak memory +{_mib(memory[0], n)}",
        baseline=f"bare gather {fmt_stats(gather)}; +{_mib(memory[1], n)}",
        ratio=fmt_ratio(ratio),
        target=f"<= {SCALE_TARGET}x" if at_target else "-",
        met=ratio <= SCALE_TARGET if at_target else None,
        reference="-",
        data={
            "n": n,
            "ours": ours.as_dict(),
            "bare_gather": gather.as_dict(),
            "ratio": ratio,
            "ours_peak_mib": memory[0],
            "gather_peak_mib": memory[1],
        },
    )


def _detail_rows(n: int, stats: list[Stats]) -> list[Row]:
    ours, gather, ours_default, gather_scaled = stats
    return [
        Row(
            key=f"scale_{n}_default_collector",
            scenario="13. the same, our step with the collector at its default thresholds",
            measured=fmt_stats(ours_default),
            baseline=f"bare gather {fmt_stats(gather)}",
            ratio=fmt_ratio(ours_default.median / gather.median),
            target="- (where the time goes)",
            met=None,
            reference="-",
            data={"n": n, "ours_default_collector": ours_default.as_dict()},
        ),
        Row(
            key=f"scale_{n}_gather_scaled_collector",
            scenario="13. the same, bare gather under our collector scaling",
            measured=fmt_stats(gather_scaled),
            baseline=f"our step {fmt_stats(ours)}",
            ratio=fmt_ratio(ours.median / gather_scaled.median),
            target="- (our machinery alone)",
            met=None,
            reference="-",
            data={"n": n, "gather_scaled_collector": gather_scaled.as_dict()},
        ),
    ]


if __name__ == "__main__":  # the memory child: bench_scale.py memory ours|gather N
    _memory_main(sys.argv[2], int(sys.argv[3]))
