"""Scenario 4: what the installed patch costs a model that does not ask for parallel stepping.

Mesa's own example models ``BoltzmannWealth`` and ``Schelling`` (from ``mesa.examples``,
with the "small" and "large" settings of Mesa's own benchmark suite) run N steps:

* A: Mesa untouched (``disable_automatic_parallel_stepping()`` restores the originals);
* B: the patch installed (``enable_automatic_parallel_stepping()``), no
  ``parallel_stepping`` attribute on the model.

The variants alternate (AB, BA, AB, ...), each sample on a freshly built model with the
same seed (construction is not timed), and the overhead is the median of the per-pair
ratios B/A. The garbage collector is paused during the timed steps of both variants:
its full collections over a large model's objects are the main source of noise here,
and the patch creates no reference cycles for it to collect.

A last informational row isolates the patch's fixed cost per ``shuffle_do`` call
(measured first); each model row also shows what that cost predicts for its run, since
both models call ``shuffle_do`` once per step.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench_common import Config, Row, Stats, fmt_stats, interleave
from bench_models import BenchModel, SyncTrivialAgent
from mesa.examples import BoltzmannWealth, Schelling
from mesa.examples.basic.boltzmann_wealth_model.model import BoltzmannScenario
from mesa.examples.basic.schelling.model import SchellingScenario

from mesa_llm_parallel import (
    disable_automatic_parallel_stepping,
    enable_automatic_parallel_stepping,
    is_automatic_parallel_stepping_enabled,
    settings,
)

__all__ = ["flag_off"]

MAX_OVERHEAD = 0.02
SEED = 42


@dataclasses.dataclass(frozen=True)
class Workload:
    """One example model with one parameter set, as in Mesa's benchmarks/configurations.py."""

    name: str
    size: str
    build: Callable[[], Any]
    steps: int


WORKLOADS = (
    Workload(
        "BoltzmannWealth",
        "small",
        lambda: BoltzmannWealth(BoltzmannScenario(rng=SEED, n=100, width=10, height=10)),
        125,
    ),
    Workload(
        "Schelling",
        "small",
        lambda: Schelling(
            SchellingScenario(rng=SEED, height=40, width=40, homophily=0.4, radius=1, density=0.625)
        ),
        20,
    ),
    Workload(
        "BoltzmannWealth",
        "large",
        lambda: BoltzmannWealth(BoltzmannScenario(rng=SEED, n=10_000, width=100, height=100)),
        10,
    ),
    Workload(
        "Schelling",
        "large",
        lambda: Schelling(
            SchellingScenario(rng=SEED, height=100, width=100, homophily=1, radius=2, density=0.8)
        ),
        10,
    ),
)


def _sample(workload: Workload, *, patched: bool) -> float:
    if patched:
        enable_automatic_parallel_stepping()
    else:
        disable_automatic_parallel_stepping()
    model = workload.build()
    if getattr(model, "parallel_stepping", False):
        raise RuntimeError("the flag-off scenario must not set parallel_stepping")
    original = "__mesa_llm_parallel_original__"
    ours = hasattr(type(model.agents).shuffle_do, original)
    if ours != patched or is_automatic_parallel_stepping_enabled() != patched:
        raise RuntimeError(f"expected the patch {'installed' if patched else 'absent'}")
    step = model.step
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(workload.steps):
            step()
        return time.perf_counter() - start
    finally:
        gc.enable()


def _measure_workload(workload: Workload, pairs: int, per_call_s: float) -> Row:
    untouched: list[float] = []
    patched: list[float] = []
    _sample(workload, patched=False)  # warm-up: imports, caches
    _sample(workload, patched=True)
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        for with_patch in order:
            (patched if with_patch else untouched).append(_sample(workload, patched=with_patch))
    a, b = Stats.of(untouched), Stats.of(patched)
    ratios = [p / u for p, u in zip(patched, untouched, strict=True)]
    paired = statistics.median(ratios)
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [paired] * 3
    overhead = paired - 1
    predicted = per_call_s * workload.steps / a.median
    return Row(
        key=f"flag_off_{workload.name}_{workload.size}",
        scenario=(
            f"4. flag off: {workload.name} ({workload.size}), {workload.steps} steps, "
            "patch installed vs Mesa untouched"
        ),
        measured=fmt_stats(b),
        baseline=f"untouched {fmt_stats(a)}; per-call cost predicts {predicted:+.2%}",
        ratio=(
            f"{paired:.3f}x ({overhead:+.1%}, median of {pairs} pairs; "
            f"min/min {b.min / a.min:.3f}x)"
        ),
        target=f"<= +{MAX_OVERHEAD:.0%}",
        met=overhead <= MAX_OVERHEAD,
        reference="~3.5 us per call, not measurable per step",
        data={
            "patched": b.as_dict(),
            "untouched": a.as_dict(),
            "median_paired_ratio": paired,
            "ratio_of_medians": b.median / a.median,
            "ratio_of_minimums": b.min / a.min,
            "paired_ratios": ratios,
            "paired_ratio_quartiles": [quartiles[0], quartiles[2]],
            "steps": workload.steps,
            "pairs": pairs,
            "predicted_overhead_from_per_call_cost": predicted,
        },
    )


def _per_call_cost(cfg: Config) -> Row:
    """The patch's fixed cost per ``shuffle_do("step")`` on 10 trivial agents, flag off."""
    calls = 2_000 if cfg.quick else 20_000
    model = BenchModel(SyncTrivialAgent, 10, parallel=False)
    del model.parallel_stepping  # no attribute at all, as for the example models
    agents = model.agents

    def loop(*, patched: bool) -> Callable[[], None]:
        def run() -> None:
            if patched:
                enable_automatic_parallel_stepping()
            else:
                disable_automatic_parallel_stepping()
            shuffle_do = agents.shuffle_do
            for _ in range(calls):
                shuffle_do("step")

        return run

    untouched, patched = interleave([loop(patched=False), loop(patched=True)], cfg.repeats)
    per_call_us = (patched.median - untouched.median) * 1e6 / calls
    return Row(
        key="flag_off_per_call",
        scenario="4. flag off: fixed cost per shuffle_do call (10 trivial agents)",
        measured=f"{per_call_us:+.2f} us per call",
        baseline=f"untouched {untouched.median * 1e6 / calls:.2f} us per call",
        ratio=f"{patched.median / untouched.median:.2f}x",
        target="- (explains the rows above)",
        met=None,
        reference="~3.5 us per call",
        data={
            "calls_per_sample": calls,
            "patched": patched.as_dict(),
            "untouched": untouched.as_dict(),
            "extra_us_per_call": per_call_us,
        },
    )


def flag_off(cfg: Config) -> list[Row]:
    """Scenario 4: every workload (only the small ones in a quick run), then the per-call cost."""
    settings.reset()
    try:
        workloads = [w for w in WORKLOADS if w.size == "small" or not cfg.quick]
        per_call = _per_call_cost(cfg)
        per_call_s = max(per_call.data["extra_us_per_call"], 0.0) * 1e-6
        rows = []
        for workload in workloads:
            small = workload.size == "small"
            pairs = cfg.flag_off_pairs if small else cfg.flag_off_large_pairs
            rows.append(_measure_workload(workload, pairs, per_call_s))
        return [*rows, per_call]
    finally:
        disable_automatic_parallel_stepping()
