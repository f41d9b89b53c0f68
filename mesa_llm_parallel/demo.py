"""A built-in demo: one step of LLM-waiting agents, sequentially and in both modes.

Run it with ``python -m mesa_llm_parallel.demo`` (``--help`` lists the options). No
network or model server is needed: a simulated language model answers after a latency
drawn from the model's random generator, so every run with the same seed waits the
same times in the same places.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import threading
import time
from collections.abc import Sequence

import mesa

from mesa_llm_parallel import parallel_stepping, settings

__all__ = ["OpinionAgent", "OpinionModel", "SimulatedLLM", "main"]


class SimulatedLLM:
    """Stands in for a chat-completion client: waits, then answers deterministically."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()  # threading mode calls it from many threads

    def _count(self) -> None:
        with self._lock:
            self.calls += 1

    @staticmethod
    def _answer(prompt: str) -> str:
        digest = hashlib.sha256(prompt.encode()).digest()
        return "agree" if digest[0] % 3 else "disagree"

    async def acomplete(self, prompt: str, latency: float) -> str:
        """Answer ``prompt`` after ``latency`` seconds without blocking the event loop."""
        self._count()
        await asyncio.sleep(latency)
        return self._answer(prompt)

    def complete(self, prompt: str, latency: float) -> str:
        """Answer ``prompt`` after ``latency`` seconds, blocking the calling thread."""
        self._count()
        time.sleep(latency)
        return self._answer(prompt)


class OpinionAgent(mesa.Agent):
    """Asks the language model whether to adopt a peer's opinion."""

    def __init__(self, model: OpinionModel) -> None:
        super().__init__(model)
        self.opinion = model.random.random()
        self.asked = 0

    def _prompt(self) -> str:
        return f"agent {self.unique_id} with opinion {self.opinion:.3f}, step {self.model.steps}"

    def _apply(self, answer: str) -> None:
        self.asked += 1
        if answer == "agree":
            self.opinion = (self.opinion + self.model.consensus) / 2

    async def astep(self) -> None:
        """The async step: asyncio mode awaits many of these at once."""
        latency = self.model.latencies[self.unique_id]
        self._apply(await self.model.llm.acomplete(self._prompt(), latency))

    def step(self) -> None:
        """The blocking step: threading mode runs many of these in the thread pool."""
        latency = self.model.latencies[self.unique_id]
        self._apply(self.model.llm.complete(self._prompt(), latency))


class OpinionModel(mesa.Model):
    """``n`` agents; every step each one makes one simulated language-model call."""

    def __init__(self, n: int = 200, latency: float = 0.05, *, seed: int = 1) -> None:
        super().__init__(rng=seed)
        self.mean_latency = latency
        self.llm = SimulatedLLM()
        self.latencies: dict[int, float] = {}
        self.slowest = 0.0
        self.consensus = 0.5
        OpinionAgent.create_agents(self, n)

    def step(self) -> None:
        """Draw this step's latencies, then step the agents (in parallel when enabled)."""
        # Gamma-distributed latencies with the requested mean: most calls near it, a few slow.
        draws = self.rng.gamma(4.0, self.mean_latency / 4.0, size=len(self.agents))
        ids = sorted(a.unique_id for a in self.agents)
        self.latencies = dict(zip(ids, draws.tolist(), strict=True))
        self.slowest = max(self.latencies.values())
        self.consensus = sum(a.opinion for a in self.agents) / len(self.agents)
        self.agents.shuffle_do("step")

    def opinions(self) -> list[float]:
        """Every agent's opinion, by agent id (to compare runs)."""
        return [a.opinion for a in sorted(self.agents, key=lambda a: a.unique_id)]


def _time_one_step(model: OpinionModel) -> float:
    start = time.perf_counter()
    model.step()
    return time.perf_counter() - start


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
    args = parser.parse_args(argv)
    if args.agents < 1:
        parser.error(f"--agents must be at least 1, got {args.agents}")
    if args.latency < 0:
        parser.error(f"--latency must be >= 0, got {args.latency}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")

    latency = args.latency / 1000.0
    print(
        f"mesa_llm_parallel demo: {args.agents} agents, one simulated language-model call "
        f"each (mean {args.latency:g} ms, drawn from the model's RNG)\n"
    )
    rows: list[tuple[str, float, int]] = []
    outcomes: list[list[float]] = []

    model = OpinionModel(args.agents, latency, seed=args.seed)
    rows.append(("sequential (Mesa's own shuffle_do)", _time_one_step(model), model.llm.calls))
    outcomes.append(model.opinions())

    parallel_stepping.enable_automatic_parallel_stepping(mode="asyncio", max_workers=args.workers)
    try:
        model = OpinionModel(args.agents, latency, seed=args.seed)
        model.parallel_stepping = True
        rows.append(("asyncio mode (astep on one loop)", _time_one_step(model), model.llm.calls))
        outcomes.append(model.opinions())

        settings.mode = "threading"
        model = OpinionModel(args.agents, latency, seed=args.seed)
        model.parallel_stepping = True
        label = f"threading mode ({settings.max_workers} threads)"
        rows.append((label, _time_one_step(model), model.llm.calls))
        outcomes.append(model.opinions())
    finally:
        parallel_stepping.disable_automatic_parallel_stepping()
        parallel_stepping.shutdown()

    base = rows[0][1]
    width = max(len(label) for label, _, _ in rows)
    print(f"{'how':<{width}}  {'wall time':>10}  {'speedup':>8}  {'calls':>6}")
    for label, seconds, calls in rows:
        print(f"{label:<{width}}  {seconds:>9.3f}s  {base / seconds:>7.1f}x  {calls:>6}")
    print(
        f"\nThe slowest call of the step took {model.slowest * 1000:.0f} ms: "
        "no schedule can finish the step sooner."
    )
    same = all(outcome == outcomes[0] for outcome in outcomes)
    print(f"All three runs reached the same opinions: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
