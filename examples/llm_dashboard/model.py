"""A Mesa model of language-model agents on a grid, for the parallel-stepping dashboard.

Core objects: :class:`SimulatedLanguageModel` (a chat client stand-in: no network),
:class:`Neighbour` (an agent that asks it whether to move towards its neighbours'
opinion) and :class:`NeighbourhoodModel`.

Every step each agent makes one call. The call waits a latency drawn from the model's
random generator, so sequential stepping takes about ``agents x latency`` per step, and
parallel stepping about the slowest single call.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import weakref

import mesa
from mesa.datacollection import DataCollector
from mesa.discrete_space import CellAgent, OrthogonalMooreGrid

from mesa_llm_parallel import enable_automatic_parallel_stepping

__all__ = ["Neighbour", "NeighbourhoodModel", "SimulatedLanguageModel", "latest_model"]

_latest: weakref.ref[NeighbourhoodModel] | None = None


def latest_model() -> NeighbourhoodModel | None:
    """The most recently created model, if it still exists (for tests and the console).

    The dashboard builds a new model on every Reset; this weak reference never keeps an
    old one alive.
    """
    return None if _latest is None else _latest()


class SimulatedLanguageModelError(RuntimeError):
    """What the simulated model server answers now and then (an overloaded server)."""


class SimulatedLanguageModel:
    """Answers prompts after a given latency, deterministically, without a network.

    Both an async method (awaited concurrently in asyncio mode) and a blocking one (run
    in the thread pool in threading mode, or one after another sequentially).
    """

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()  # threading mode calls it from many threads

    def _answer(self, prompt: str, fail: bool) -> str:
        with self._lock:
            self.calls += 1
        if fail:
            raise SimulatedLanguageModelError("503 model server overloaded (simulated)")
        digest = hashlib.sha256(prompt.encode()).digest()
        return "agree" if digest[0] % 4 else "disagree"

    async def acomplete(self, prompt: str, *, latency: float, fail: bool = False) -> str:
        """Answer ``prompt`` after ``latency`` seconds without blocking the event loop."""
        await asyncio.sleep(latency)
        return self._answer(prompt, fail)

    def complete(self, prompt: str, *, latency: float, fail: bool = False) -> str:
        """Answer ``prompt`` after ``latency`` seconds, blocking the calling thread."""
        time.sleep(latency)
        return self._answer(prompt, fail)


class Neighbour(CellAgent):
    """Holds an opinion in [0, 1] and asks the language model whether to follow its neighbours."""

    def __init__(self, model: NeighbourhoodModel, cell: mesa.discrete_space.Cell) -> None:
        super().__init__(model)
        self.cell = cell
        self.opinion = model.random.random()

    def _prompt(self) -> tuple[str, float]:
        around = [a.opinion for a in self.cell.neighborhood.agents]
        mean = sum(around) / len(around) if around else self.opinion
        prompt = (
            f"You are agent {self.unique_id} at {self.cell.coordinate} with opinion "
            f"{self.opinion:.2f}; your neighbours average {mean:.2f} "
            f"(step {self.model.step_count}). Do you agree with them?"
        )
        return prompt, mean

    def _apply(self, answer: str, mean: float) -> None:
        if answer == "agree":
            self.opinion += 0.5 * (mean - self.opinion)
        else:
            self.opinion = min(1.0, max(0.0, self.opinion - 0.2 * (mean - self.opinion)))

    async def astep(self) -> None:
        """Asyncio mode: awaited concurrently with the other agents."""
        prompt, mean = self._prompt()
        latency, fail = self.model.calls[self.unique_id]
        self._apply(await self.model.llm.acomplete(prompt, latency=latency, fail=fail), mean)

    def step(self) -> None:
        """Threading mode (in the pool) and sequential stepping (one after another)."""
        prompt, mean = self._prompt()
        latency, fail = self.model.calls[self.unique_id]
        self._apply(self.model.llm.complete(prompt, latency=latency, fail=fail), mean)


class NeighbourhoodModel(mesa.Model):
    """``width x width`` agents on a Moore grid, one language-model call each per step.

    Args:
        width: Side of the square grid; the model has ``width ** 2`` agents.
        latency_ms: Mean latency of a call in milliseconds (gamma distributed).
        error_rate: Chance that a call fails. Parallel steps record failures in the
            step report (``on_error="collect"``); a sequential step stops at the first.
        rng: Seed of the model's random generators.
    """

    def __init__(
        self,
        width: int = 10,
        latency_ms: float = 30.0,
        error_rate: float = 0.0,
        rng: int | None = 42,
    ) -> None:
        global _latest  # noqa: PLW0603 - a weak reference, for tests and the console
        super().__init__(rng=rng)
        # The usual pattern: the model opts in and makes sure the patch is installed.
        self.parallel_stepping = True
        enable_automatic_parallel_stepping(mode="asyncio", on_error="collect")
        self.latency_ms = float(latency_ms)
        self.error_rate = float(error_rate)
        self.llm = SimulatedLanguageModel()
        self.calls: dict[int, tuple[float, bool]] = {}
        self.step_ms = 0.0
        self.step_count = 0  # our own: Mesa 4 has no model.steps
        self.grid = OrthogonalMooreGrid((width, width), torus=False, random=self.random)
        for cell in self.grid.all_cells:
            Neighbour(self, cell)
        self.datacollector = DataCollector(
            model_reporters={
                "Step time (ms)": "step_ms",
                "Mean opinion": lambda m: sum(a.opinion for a in m.agents) / len(m.agents),
            }
        )
        self.datacollector.collect(self)
        _latest = weakref.ref(self)

    def step(self) -> None:
        """Draw this step's latencies and failures, then step every agent."""
        self.step_count += 1
        ids = sorted(a.unique_id for a in self.agents)
        # All random draws happen here, on the stepping thread, in id order: agents
        # running concurrently never touch the generator.
        latencies = self.rng.gamma(4.0, self.latency_ms / 4000.0, size=len(ids))
        failures = self.rng.random(len(ids)) < self.error_rate
        self.calls = {
            i: (float(lat), bool(f)) for i, lat, f in zip(ids, latencies, failures, strict=True)
        }
        start = time.perf_counter()
        self.agents.shuffle_do("step")
        self.step_ms = (time.perf_counter() - start) * 1000.0
        self.datacollector.collect(self)
