"""The demo's Mesa model, with a simulated language model and one over real HTTP.

:class:`OpinionModel` is the model of ``python -m mesa_llm_parallel.demo``, of the
notebooks and of several tests: ``n`` :class:`OpinionAgent` s, each asking a language
model one question per step. The language model is a :class:`SimulatedLLM` (waits the
latency the model drew for the agent, then answers with
:func:`~mesa_llm_parallel.testing.deterministic_reply`) or a :class:`ServerLLM` (asks a
:class:`~mesa_llm_parallel.testing.LoopbackLLMServer` through the ``openai`` clients).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import mesa

from mesa_llm_parallel.testing._example import OpenAIChat
from mesa_llm_parallel.testing._replies import deterministic_reply
from mesa_llm_parallel.testing._server import LatencySpec

__all__ = ["OpinionAgent", "OpinionModel", "ServerLLM", "SimulatedLLM", "server_latency"]


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
        return deterministic_reply(prompt)  # what the loopback server answers, too

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
        return (
            f"agent {self.unique_id} with opinion {self.opinion:.3f}, step {self.model.step_count}"
        )

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


class ServerLLM:
    """The demo's language-model interface over real HTTP, through the ``openai`` clients.

    Wraps one :class:`~mesa_llm_parallel.testing.OpenAIChat`. The ``latency``
    arguments are ignored: the server draws each request's latency itself.
    """

    def __init__(self, base_url: str) -> None:
        self.chat = OpenAIChat(base_url)

    @property
    def calls(self) -> int:
        """Requests sent so far."""
        return self.chat.calls

    async def acomplete(self, prompt: str, latency: float) -> str:
        """Ask through the model's ``AsyncOpenAI`` client."""
        return await self.chat.acomplete(prompt)

    def complete(self, prompt: str, latency: float) -> str:
        """Ask through the model's ``OpenAI`` client."""
        return self.chat.complete(prompt)

    def close(self) -> None:
        """Close both clients."""
        self.chat.close()


class OpinionModel(mesa.Model):
    """``n`` agents; every step each one makes one language-model call.

    The calls go to ``llm`` (default: a :class:`SimulatedLLM`).
    """

    def __init__(
        self, n: int = 200, latency: float = 0.05, *, seed: int = 1, llm: Any = None
    ) -> None:
        super().__init__(rng=seed)
        self.mean_latency = latency
        self.llm = SimulatedLLM() if llm is None else llm
        self.latencies: dict[int, float] = {}
        self.slowest = 0.0
        self.consensus = 0.5
        self.step_count = 0  # our own: Mesa 4 has no model.steps
        for _ in range(n):
            OpinionAgent(self)

    def step(self) -> None:
        """Draw this step's latencies, then step the agents (in parallel when enabled)."""
        self.step_count += 1
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


def server_latency(mean: float) -> LatencySpec:
    """The loopback server's latency for the demo: the simulation's distribution."""
    return ("gamma", {"mean": mean, "shape": 4.0}) if mean > 0 else 0.0
