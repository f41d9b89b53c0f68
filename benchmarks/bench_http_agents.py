"""The agents and the model of the HTTP scenarios: real ``openai`` clients, real HTTP.

This module imports only Mesa and ``openai`` (never ``mesa_llm_parallel``), so the very
same agent code runs in the benchmark's venv and in the reference implementation's
venv (``reference_worker.py``).

* :class:`AsyncChatAgent`: ``async def astep`` awaits one chat completion through the
  model's ``AsyncOpenAI`` client (what asyncio mode awaits concurrently);
* :class:`SyncChatAgent`: ``def step`` makes one chat completion through the model's
  ``OpenAI`` client (what threading mode and sequential Mesa run).

Each model holds ONE client of each kind, made once and reused for every step, with a
connection pool sized by :func:`make_clients` (the same settings wherever they are
compared). Each agent sends its own prompt (its id and the step number), so the server
sees distinct requests.
"""

from __future__ import annotations

import threading
from typing import Any

import mesa
import openai

try:  # openai >= 3 ships its HTTP client as httpx2; older ones use httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed openai
    import httpx  # type: ignore[no-redef]

__all__ = [
    "CLIENT_TIMEOUT",
    "KEEPALIVE_EXPIRY",
    "AsyncChatAgent",
    "HttpModel",
    "SyncChatAgent",
    "client_settings",
    "make_async_client",
    "make_sync_client",
]

#: The model name sent with every request (the loopback server echoes any name).
MODEL_NAME = "loopback-chat"
#: Seconds a request may take, including the wait for a pooled connection.
CLIENT_TIMEOUT = 120.0
#: Seconds an idle pooled connection is kept (httpx's default is 5 s: a client idle
#: while the other side of a comparison steps would reopen its connections).
KEEPALIVE_EXPIRY = 60.0


def _limits(connections: int) -> Any:
    return httpx.Limits(
        max_connections=connections,
        max_keepalive_connections=connections,
        keepalive_expiry=KEEPALIVE_EXPIRY,
    )


def client_settings(connections: int | None, max_retries: int) -> str:
    """A one-line description of the client settings, for the reports."""
    pool = (
        "openai's default pool (max_connections 1000, max_keepalive_connections 100)"
        if connections is None
        else (
            f"max_connections = max_keepalive_connections = {connections}, "
            f"keepalive_expiry {KEEPALIVE_EXPIRY:g} s"
        )
    )
    return (
        f"openai {openai.__version__} on {httpx.__name__} {httpx.__version__}: {pool}, "
        f"timeout {CLIENT_TIMEOUT:g} s, max_retries {max_retries}"
    )


def make_async_client(base_url: str, *, connections: int | None, max_retries: int) -> Any:
    """An ``AsyncOpenAI`` client with a pool of ``connections`` kept-alive connections.

    ``max_keepalive_connections`` equals ``max_connections`` so that a step's
    connections are all kept for the next step: with ``openai``'s default (100 kept of
    1,000) every step with more than 100 agents in flight would open the rest anew.
    ``connections=None`` keeps ``openai``'s own default pool.
    """
    options: dict[str, Any] = {}
    if connections is not None:
        options["http_client"] = httpx.AsyncClient(
            limits=_limits(connections), timeout=CLIENT_TIMEOUT
        )
    return openai.AsyncOpenAI(
        base_url=base_url,
        api_key="loopback",
        max_retries=max_retries,
        timeout=CLIENT_TIMEOUT,
        **options,
    )


def make_sync_client(base_url: str, *, connections: int, max_retries: int) -> Any:
    """An ``OpenAI`` client with a pool of ``connections`` kept-alive connections."""
    return openai.OpenAI(
        base_url=base_url,
        api_key="loopback",
        max_retries=max_retries,
        timeout=CLIENT_TIMEOUT,
        http_client=httpx.Client(limits=_limits(connections), timeout=CLIENT_TIMEOUT),
    )


def _messages(agent: mesa.Agent) -> list[dict[str, str]]:
    text = f"Agent {agent.unique_id}, round {agent.model.round}: should I cooperate?"
    return [{"role": "user", "content": text}]


class AsyncChatAgent(mesa.Agent):
    """Awaits one chat completion per step through the model's ``AsyncOpenAI`` client."""

    async def astep(self) -> None:
        model = self.model
        try:
            response = await model.async_client.chat.completions.create(
                model=MODEL_NAME, messages=_messages(self), temperature=0
            )
        except openai.APIError as exc:
            model.record_failure(exc)
            return
        self.answer = response.choices[0].message.content
        self.answered_round = model.round


class SyncChatAgent(mesa.Agent):
    """Makes one chat completion per step through the model's ``OpenAI`` client."""

    def step(self) -> None:
        model = self.model
        try:
            response = model.client.chat.completions.create(
                model=MODEL_NAME, messages=_messages(self), temperature=0
            )
        except openai.APIError as exc:
            model.record_failure(exc)
            return
        self.answer = response.choices[0].message.content
        self.answered_round = model.round


class HttpModel(mesa.Model):
    """``n`` chat agents of one class; ``step`` is ``self.agents.shuffle_do("step")``.

    A failed request (a 429 after the client's retries, a connection error) is counted
    in :attr:`failures` by kind, not raised, so that a scenario can report how many
    agents got no answer; :meth:`answered` counts the agents answered in the current round.
    """

    def __init__(
        self,
        agent_class: type[mesa.Agent],
        n: int,
        *,
        client: Any = None,
        async_client: Any = None,
        parallel: bool = True,
        seed: int = 42,
    ) -> None:
        super().__init__(rng=seed)
        self.parallel_stepping = parallel
        self.client = client
        self.async_client = async_client
        self.round = 0
        self.failures: dict[str, int] = {}
        self._failures_lock = threading.Lock()
        agent_class.create_agents(self, n)

    def record_failure(self, exc: BaseException) -> None:
        """Count one failed request by the name of its exception class."""
        name = type(exc).__name__
        with self._failures_lock:
            self.failures[name] = self.failures.get(name, 0) + 1

    def begin_round(self) -> None:
        """Start a round of requests: ``step`` does it; a bare baseline calls it itself."""
        self.round += 1

    def answered(self) -> int:
        """How many agents got an answer in the current round."""
        current = self.round
        return sum(1 for agent in self.agents if getattr(agent, "answered_round", 0) == current)

    def step(self) -> None:
        self.begin_round()
        self.agents.shuffle_do("step")
