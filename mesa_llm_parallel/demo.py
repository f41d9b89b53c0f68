"""A built-in demo: one step of LLM-waiting agents, sequentially and in both modes.

Run it with ``python -m mesa_llm_parallel.demo`` (``--help`` lists the options). No
network or model server is needed: a simulated language model answers after a latency
drawn from the model's random generator, so every run with the same seed waits the
same times in the same places.

The model and its language models live in :mod:`mesa_llm_parallel.testing` (this module
re-exports them: ``from mesa_llm_parallel.demo import OpinionModel`` keeps working).

With ``--server`` the same table is made with real HTTP: the agents call a
:class:`~mesa_llm_parallel.testing.LoopbackLLMServer` on ``127.0.0.1`` through the
``openai`` clients (``AsyncOpenAI`` in ``astep``, ``OpenAI`` in ``step``, one of each per
model), and the server draws each request's latency from the same distribution. It
needs the ``openai`` package (``pip install 'mesa_llm_parallel[llm]'``).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable, Sequence
from typing import Any

from mesa_llm_parallel import parallel_stepping, settings
from mesa_llm_parallel.testing import LoopbackLLMServer
from mesa_llm_parallel.testing._demo_models import (
    OpinionAgent,
    OpinionModel,
    ServerLLM,
    SimulatedLLM,
    server_latency,
)

__all__ = ["OpinionAgent", "OpinionModel", "ServerLLM", "SimulatedLLM", "main", "server_latency"]


def _time_one_step(model: OpinionModel) -> float:
    start = time.perf_counter()
    model.step()
    return time.perf_counter() - start


def _run_table(
    make_llm: Callable[[], Any], agents: int, latency: float, seed: int, workers: int
) -> tuple[list[tuple[str, float, int]], list[list[float]], OpinionModel]:
    """One step sequentially, in asyncio mode and in threading mode: rows and outcomes."""
    rows: list[tuple[str, float, int]] = []
    outcomes: list[list[float]] = []

    def run(label: str, *, parallel: bool) -> OpinionModel:
        model = OpinionModel(agents, latency, seed=seed, llm=make_llm())
        model.parallel_stepping = parallel
        try:
            seconds = _time_one_step(model)
        finally:
            close = getattr(model.llm, "close", None)
            if close is not None:
                close()
        rows.append((label, seconds, model.llm.calls))
        outcomes.append(model.opinions())
        return model

    run("sequential (Mesa's own shuffle_do)", parallel=False)
    parallel_stepping.enable_automatic_parallel_stepping(mode="asyncio", max_workers=workers)
    try:
        run("asyncio mode (astep on one loop)", parallel=True)
        settings.mode = "threading"
        model = run(f"threading mode ({settings.max_workers} threads)", parallel=True)
    finally:
        parallel_stepping.disable_automatic_parallel_stepping()
        parallel_stepping.shutdown()
    return rows, outcomes, model


def _print_rows(rows: list[tuple[str, float, int]]) -> None:
    base = rows[0][1]
    width = max(len(label) for label, _, _ in rows)
    print(f"{'how':<{width}}  {'wall time':>10}  {'speedup':>8}  {'calls':>6}")
    for label, seconds, calls in rows:
        print(f"{label:<{width}}  {seconds:>9.3f}s  {base / seconds:>7.1f}x  {calls:>6}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo and print the table; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m mesa_llm_parallel.demo",
        description="Time one step of LLM-waiting agents: sequential, asyncio, threading.",
    )
    parser.add_argument("--agents", type=int, default=200, help="number of agents (200)")
    parser.add_argument(
        "--latency", type=float, default=50.0, help="mean simulated latency in ms (50)"
    )
    parser.add_argument("--workers", type=int, default=64, help="thread-pool size (64)")
    parser.add_argument("--seed", type=int, default=1, help="model seed (1)")
    parser.add_argument(
        "--server",
        action="store_true",
        help="send real HTTP requests through the openai clients to a loopback "
        "OpenAI-compatible server instead of simulating the language model",
    )
    args = parser.parse_args(argv)
    if args.agents < 1:
        parser.error(f"--agents must be at least 1, got {args.agents}")
    if args.latency < 0:
        parser.error(f"--latency must be >= 0, got {args.latency}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.server and importlib.util.find_spec("openai") is None:
        parser.error("--server needs the 'openai' package: pip install 'mesa_llm_parallel[llm]'")

    latency = args.latency / 1000.0
    if not args.server:
        print(
            f"mesa_llm_parallel demo: {args.agents} agents, one simulated language-model call "
            f"each (mean {args.latency:g} ms, drawn from the model's RNG)\n"
        )
        rows, outcomes, model = _run_table(
            SimulatedLLM, args.agents, latency, args.seed, args.workers
        )
        _print_rows(rows)
        print(
            f"\nThe slowest call of the step took {model.slowest * 1000:.0f} ms: "
            "no schedule can finish the step sooner."
        )
    else:
        with LoopbackLLMServer(latency=server_latency(latency), seed=args.seed) as server:
            print(
                f"mesa_llm_parallel demo: {args.agents} agents, one chat-completion request "
                f"each over real HTTP, through the openai clients, to a loopback server at "
                f"{server.base_url} (latency drawn by the server, mean {args.latency:g} ms)\n"
            )
            rows, outcomes, model = _run_table(
                lambda: ServerLLM(server.base_url), args.agents, latency, args.seed, args.workers
            )
            stats = server.stats()
        _print_rows(rows)
        print(
            f"\nThe server answered {stats.completed} of {stats.requests} requests "
            f"({stats.rate_limited} refused with 429), at most {stats.peak_concurrency} at "
            f"once, over {stats.connections} connections."
        )
    same = all(outcome == outcomes[0] for outcome in outcomes)
    print(f"All three runs reached the same opinions: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
