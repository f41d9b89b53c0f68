"""Scenario 14: what one chat completion costs the client, per HTTP client.

A step of 1,000 or 5,000 agents awaiting a 500 ms answer over loopback HTTP is bound by
the client's own CPU per call, not by the scheduler (scenario 6 runs the library and a
bare gather with the same client at the same speed). This scenario compares clients:
each runs in a process of its own (``client_worker.py``, with the interpreter of the
mesa-llm venv, which has litellm, openai and aiohttp), against the loopback server in
another process, stepping the same model of async agents with the library's asyncio
mode. Per client: the step's wall time and the client process's CPU seconds per call;
clients are rotated round by round. Needs ``.cache/venv-mesa-llm`` (``./dev test`` or
``./dev mesa-llm`` makes it); without it the scenario reports that and measures nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench_common import Config, Row, Stats, fmt_ratio, fmt_stats, run_child_json
from bench_server import ServerProcess

__all__ = ["clients"]

_HERE = Path(__file__).resolve().parent
VENV_PYTHON = _HERE.parent / ".cache" / "venv-mesa-llm" / "bin" / "python"
LATENCY = 0.5
#: (client, agents) pairs measured, in the order shown. A pool that keeps every
#: connection alive costs httpx time per request that grows with the pool (1,000: about
#: 15 ms of CPU per call, measured), so it is measured at 1,000 only.
PLAN = (
    ("aiohttp", 1_000),
    ("httpx", 1_000),
    ("httpx-pool", 1_000),
    ("litellm", 1_000),
    ("aiohttp", 5_000),
    ("httpx", 5_000),
    ("litellm", 5_000),
)
PLAN_QUICK = (("aiohttp", 100), ("httpx", 100), ("litellm", 100))
LABELS = {
    "aiohttp": "openai AsyncOpenAI, aiohttp transport (DefaultAioHttpClient)",
    "httpx": "openai AsyncOpenAI, default transport (httpx), default pool",
    "httpx-pool": "openai AsyncOpenAI, httpx, every connection kept alive",
    "litellm": "litellm.acompletion (what mesa-llm calls)",
}


def _run_worker(base_url: str, client: str, n: int) -> dict[str, float]:
    config = {"base_url": base_url, "client": client, "n": n, "steps": 1}
    (sample,) = run_child_json(
        [str(VENV_PYTHON), str(_HERE / "client_worker.py"), json.dumps(config)],
        what=f"client {client} ({n} agents)",
        timeout=1800,
        cwd=_HERE,
    )
    if sample["answered"] != n:
        raise RuntimeError(f"client {client}: {sample['answered']} of {n} agents answered")
    return sample


def clients(cfg: Config) -> list[Row]:
    """Scenario 14: the same step through each client, rotated round by round."""
    if not VENV_PYTHON.exists():
        return [
            Row(
                key="clients_skipped",
                scenario="14. clients: skipped",
                measured="-",
                baseline=f"{VENV_PYTHON} is missing: run ./dev mesa-llm once",
                ratio="-",
                target="-",
                met=None,
                reference="-",
            )
        ]
    plan = PLAN_QUICK if cfg.quick else PLAN
    rounds = 1 if cfg.quick else cfg.http_repeats
    samples: dict[tuple[str, int], list[dict[str, float]]] = {cell: [] for cell in plan}
    with ServerProcess(latency=LATENCY) as server:
        for round_ in range(rounds):
            for n in sorted({n for _, n in plan}):
                cells = [cell for cell in plan if cell[1] == n]
                if n >= 5_000 and round_ >= 2:
                    continue  # two rounds of the largest cells are enough (minutes each)
                shift = round_ % len(cells)
                for client, size in cells[shift:] + cells[:shift]:
                    samples[(client, size)].append(_run_worker(server.base_url, client, size))
    rows = []
    for n in sorted({n for _, n in plan}):
        cells = [cell for cell in plan if cell[1] == n]
        walls = {cell: Stats.of([s["seconds"] for s in samples[cell]]) for cell in cells}
        cpus = {cell: Stats.of([s["cpu"] / n for s in samples[cell]]) for cell in cells}
        fastest = min(cells, key=lambda cell: walls[cell].median)
        for cell in cells:
            client = cell[0]
            rows.append(
                Row(
                    key=f"clients_{client}_{n}",
                    scenario=(
                        f"14. clients, {n:,} agents x {LATENCY * 1e3:.0f} ms: {LABELS[client]}"
                    ),
                    measured=(
                        f"{fmt_stats(walls[cell])}; CPU {cpus[cell].median * 1e3:.2f} ms/call"
                    ),
                    baseline=f"fastest: {fastest[0]} {fmt_stats(walls[fastest])}",
                    ratio=fmt_ratio(walls[cell].median / walls[fastest].median),
                    target="-",
                    met=None,
                    reference="-",
                    data={
                        "client": client,
                        "n": n,
                        "wall": walls[cell].as_dict(),
                        "cpu_per_call": cpus[cell].as_dict(),
                        "limit": LATENCY,
                    },
                )
            )
    return rows
