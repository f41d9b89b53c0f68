"""Scenario 11 (``hosts``): what one asyncio step costs in each place it can start from.

Each host is measured in a fresh interpreter of its own, because reusing a running loop
applies nest-asyncio2, which changes asyncio for the rest of the process. Every host
steps the same model of trivial ``async def astep`` agents (so the figures are the
machinery, not waiting) and is compared with a script stepping it (the thread's own
persistent loop), measured in the same interpreter just before:

* ``kernel cell``: ``model.step()`` from a coroutine on a running loop that the library
  treats as a Jupyter kernel's: the step runs nested on it (``"running_loop"``);
* ``asyncio application``: ``model.step()`` from a task of an application's
  ``asyncio.run``: the step runs on the library's background loop thread while the task
  blocks (``"background"``);
* ``threading mode``: the same async-only agents in threading mode: each runs on the
  model's home loop, sent there from a pool thread that waits for it;
* ``sub-steps in astep``: parents whose ``astep`` call the blocking ``shuffle_do`` on
  their sub-agents (nested on the home loop), against ``await ashuffle_do`` of the same
  sub-agents.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from bench_common import Config, Row, Stats, fmt_ratio, fmt_stats, run_child_json

__all__ = ["hosts"]

_CHILD = r"""
import asyncio, json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import mesa
import mesa_llm_parallel as mlp
from mesa_llm_parallel import _loops
from bench_models import AsyncTrivialAgent, BenchModel

host, n, repeats = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])


def timed(step, times):
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return samples


class Parent(mesa.Agent):
    def __init__(self, model, subs, blocking):
        super().__init__(model)
        self.subs, self.blocking = subs, blocking

    async def astep(self):
        if self.blocking:
            self.subs.shuffle_do("step")
        else:
            await mlp.ashuffle_do(self.subs, "step")


class Parents(mesa.Model):
    def __init__(self, parents, subs, blocking):
        super().__init__(rng=1)
        self.parallel_stepping = True
        for _ in range(parents):
            group = AsyncTrivialAgent.create_agents(self, subs)
            Parent(self, mesa.agent.AgentSet(group, random=self.random), blocking)

    def step(self):
        self.agents_by_type[Parent].shuffle_do("step")


mlp.enable_automatic_parallel_stepping(mode="asyncio")
out = {}
if host == "sub-steps":
    parents, subs = 10, n // 10
    awaited, blocking = Parents(parents, subs, False), Parents(parents, subs, True)
    awaited.step(), blocking.step()
    base, measured = [], []
    for _ in range(repeats):  # interleaved
        base += timed(awaited.step, 1)
        measured += timed(blocking.step, 1)
    out = {"base": base, "measured": measured}
else:
    script_model = BenchModel(AsyncTrivialAgent, n, parallel=True)
    model = BenchModel(AsyncTrivialAgent, n, parallel=True)
    script_model.step()
    base = timed(script_model.step, repeats)
    if host == "kernel":
        _loops._is_kernel_loop = lambda loop: True  # what a kernel's loop gets

        async def cell():
            model.step()
            return timed(model.step, repeats)

        measured = asyncio.run(cell())
    elif host == "application":

        async def app():
            model.step()
            return timed(model.step, repeats)

        measured = asyncio.run(app())
    else:  # threading mode, async-only agents on the home loop
        model.step()
        mlp.settings.mode = "threading"
        measured = timed(model.step, repeats)
    out = {"base": base, "measured": measured, "path": mlp.last_loop_path()}
print(json.dumps(out))
"""

_HOSTS = (
    ("kernel", "kernel cell: nested on the running loop", "script (thread loop)"),
    ("application", "asyncio application: background loop thread", "script (thread loop)"),
    ("threading", "threading mode: async-only agents on the home loop", "asyncio mode"),
    ("sub-steps", "sub-steps in astep: blocking shuffle_do (nested)", "await ashuffle_do"),
)


def _run_child(host: str, n: int, repeats: int) -> dict[str, list[float]]:
    here = Path(__file__).resolve().parent
    return run_child_json(
        [sys.executable, "-c", textwrap.dedent(_CHILD), str(here), host, str(n), str(repeats)],
        what=f"hosts benchmark child ({host})",
        timeout=600,
    )


def hosts(cfg: Config) -> list[Row]:
    """One asyncio step of trivial agents from each host, against a script's step."""
    n = 100 if cfg.quick else 1_000
    repeats = 3 if cfg.quick else max(cfg.repeats, 5) * 4
    rows = []
    for host, label, base_label in _HOSTS:
        data = _run_child(host, n, repeats)
        base, measured = Stats.of(data["base"]), Stats.of(data["measured"])
        extra_us = (measured.median - base.median) * 1e6
        rows.append(
            Row(
                key=f"hosts_{host}",
                scenario=f"11. {label}, one step of {n:,} trivial agents",
                measured=fmt_stats(measured),
                baseline=f"{base_label} {fmt_stats(base)}",
                ratio=fmt_ratio(measured.median / base.median),
                target="- (no target)",
                met=None,
                reference=f"{extra_us:+.0f} us per step, {extra_us / n:+.2f} us per agent",
                data={"n": n, "base": base.as_dict(), "measured": measured.as_dict()},
            )
        )
    return rows
