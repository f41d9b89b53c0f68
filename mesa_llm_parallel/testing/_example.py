"""An example Mesa model whose agents ask an OpenAI-compatible server through ``openai``.

Core objects: :class:`OpenAIChat` (one model's pair of ``openai`` clients),
:class:`ChatAgent` and :class:`ChatModel`. Together with
:class:`~mesa_llm_parallel.testing.LoopbackLLMServer` they make real HTTP traffic
without a real language model::

    import mesa_llm_parallel as mlp
    from mesa_llm_parallel.testing import ChatModel, LoopbackLLMServer

    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    with LoopbackLLMServer(latency=0.05) as server:
        model = ChatModel(100, server.base_url, seed=1)
        for _ in range(3):
            model.step()  # 100 concurrent requests per step, one client
        model.close()

Each model makes ONE ``AsyncOpenAI`` client, used by ``astep`` (asyncio mode), and ONE
``OpenAI`` client, used by ``step`` (threading mode and sequential Mesa), and reuses
them for every step, so their pooled keep-alive connections are reused too. The async
client's connections belong to the event loop that opened them; reusing it works
because ``mesa_llm_parallel`` runs every asyncio step started from one thread on the
same loop (that thread's persistent loop, or the loop already running there). Step a
model from one thread; a model stepped from another thread, or after
:func:`~mesa_llm_parallel.shutdown`, gets a different loop, and :class:`OpenAIChat`
then raises a ``RuntimeError`` that says so instead of failing inside the HTTP client.

Needs the ``openai`` package: ``pip install "mesa_llm_parallel[llm]"``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from typing import TYPE_CHECKING, Any

import mesa

from mesa_llm_parallel.testing._server import DEFAULT_MODEL

if TYPE_CHECKING:
    import openai

__all__ = ["ChatAgent", "ChatModel", "OpenAIChat"]


def _import_openai() -> Any:
    try:
        import openai
    except ImportError as exc:
        raise ImportError(
            "OpenAIChat needs the 'openai' package: pip install 'mesa_llm_parallel[llm]'"
        ) from exc
    return openai


TRANSPORTS = ("auto", "aiohttp", "httpx")


def _choose_transport(openai: Any, transport: str) -> str:
    if transport not in TRANSPORTS:
        raise ValueError(
            f"transport must be one of {', '.join(map(repr, TRANSPORTS))}, got {transport!r}"
        )
    if transport == "httpx":
        return "httpx"
    try:
        import aiohttp  # noqa: F401 - only whether it is there

        usable = hasattr(openai, "DefaultAioHttpClient")
    except ImportError:
        usable = False
    if usable:
        return "aiohttp"
    if transport == "aiohttp":
        raise ImportError(
            "transport='aiohttp' needs openai >= 1.89 and aiohttp: "
            "pip install 'openai[aiohttp]' (or 'mesa_llm_parallel[llm]')"
        )
    return "httpx"


class OpenAIChat:
    """One model's language-model clients: ``AsyncOpenAI`` for ``astep``, ``OpenAI`` for ``step``.

    Args:
        base_url: The server's base URL, e.g. ``LoopbackLLMServer.base_url``.
        model: The model name sent with every request.
        api_key: Any string for the loopback server.
        timeout: Seconds each request may take (the clients' own timeout).
        max_retries: How often the clients retry a 429, a 5xx or a connection error,
            honouring the server's ``Retry-After``; 0 turns retries off.
        transport: The async client's HTTP transport: ``"aiohttp"``
            (``openai.DefaultAioHttpClient``, openai >= 1.89 with aiohttp installed:
            ``pip install "openai[aiohttp]"``), ``"httpx"`` (openai's default), or
            ``"auto"`` (default): aiohttp when it is installed, else httpx. aiohttp
            costs the client about a third of httpx's CPU per call (1.5 against 4.6 ms
            at 1,000 agents x 500 ms on 2 cores, docs/benchmarks.md, scenario 14), and
            at a few hundred agents in flight the client's CPU, not the network, bounds
            a step.

    Attributes:
        async_client: The ``openai.AsyncOpenAI`` client, created once.
        client: The ``openai.OpenAI`` client, created once (thread-safe).
        calls: Completions asked for so far (both clients, any thread).

    Raises:
        ImportError: ``openai`` is not installed, or ``transport="aiohttp"`` without
            aiohttp (or with an openai older than 1.89).
        ValueError: An unknown ``transport``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str = DEFAULT_MODEL,
        api_key: str = "loopback",
        timeout: float = 30.0,
        max_retries: int = 2,
        transport: str = "auto",
    ) -> None:
        openai = _import_openai()
        options: dict[str, Any] = {
            "base_url": base_url,
            "api_key": api_key,
            "timeout": timeout,
            "max_retries": max_retries,
        }
        self.model = model
        #: The async client's transport: ``"aiohttp"`` or ``"httpx"``.
        self.transport = _choose_transport(openai, transport)
        async_options = dict(options)
        if self.transport == "aiohttp":
            async_options["http_client"] = openai.DefaultAioHttpClient(timeout=timeout)
        self.async_client: openai.AsyncOpenAI = openai.AsyncOpenAI(**async_options)
        self.client: openai.OpenAI = openai.OpenAI(**options)
        self.calls = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # where async_client is used
        self._closing: asyncio.Task[None] | None = None

    def _count(self) -> None:
        with self._lock:
            self.calls += 1

    @staticmethod
    def _messages(prompt: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": prompt}]

    def _check_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError(
                "OpenAIChat's async client was first used on another event loop, and its "
                "pooled connections belong to that loop; step the model with "
                "model.step() (its asyncio steps run on its home loop) rather than "
                "awaiting it on another loop, or give it a new OpenAIChat"
            )

    async def acomplete(self, prompt: str) -> str:
        """Ask for a completion of ``prompt`` through the async client; return its text.

        Raises:
            RuntimeError: The client is used on a different event loop than before.
            openai.APIError: The request failed (after the client's retries).
        """
        self._check_loop()
        self._count()
        response = await self.async_client.chat.completions.create(
            model=self.model, messages=self._messages(prompt), temperature=0
        )
        return response.choices[0].message.content or ""

    def complete(self, prompt: str) -> str:
        """Ask for a completion of ``prompt`` through the sync client; return its text.

        Raises:
            openai.APIError: The request failed (after the client's retries).
        """
        self._count()
        response = self.client.chat.completions.create(
            model=self.model, messages=self._messages(prompt), temperature=0
        )
        return response.choices[0].message.content or ""

    async def aclose(self) -> None:
        """Close both clients; await it on the loop that ran the async requests."""
        self.client.close()
        await self.async_client.close()

    def close(self, timeout: float = 5.0) -> None:
        """Close both clients from synchronous code (call it when no step runs).

        The async client is closed on the loop it was used on: right here when that
        loop is idle, or on its own thread when it is running there. When that loop is
        running in this very thread (a notebook cell), the close is scheduled on it;
        ``await aclose()`` there instead to wait for it.
        """
        self.client.close()
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # never used, or its loop (and so its connections) is already gone
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._closing = loop.create_task(self.async_client.close())
        elif loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self.async_client.close(), loop)
            with contextlib.suppress(concurrent.futures.TimeoutError):
                future.result(timeout)
        elif running is None:
            loop.run_until_complete(self.async_client.close())


class ChatAgent(mesa.Agent):
    """Asks the model's language model one question per step and keeps the answers.

    Attributes:
        answers: Every answer received, in step order.
    """

    def __init__(self, model: ChatModel) -> None:
        super().__init__(model)
        self.answers: list[str] = []

    def prompt(self) -> str:
        """This step's question: a function of the agent's id and the step number."""
        return f"Agent {self.unique_id}, step {self.model.step_count}: should I cooperate?"

    async def astep(self) -> None:
        """Ask through the async client: asyncio mode awaits many of these at once."""
        self.answers.append(await self.model.llm.acomplete(self.prompt()))

    def step(self) -> None:
        """Ask through the sync client: threading mode runs many of these in threads."""
        self.answers.append(self.model.llm.complete(self.prompt()))

    @property
    def cooperating(self) -> bool:
        """Whether the last answer was ``"agree"``."""
        return bool(self.answers) and self.answers[-1] == "agree"


class ChatModel(mesa.Model):
    """``n`` :class:`ChatAgent` s sharing one :class:`OpenAIChat`; one request each per step.

    Args:
        n: Number of agents.
        base_url: The server's base URL.
        seed: The model's random seed (the order agents start in).
        parallel: Sets ``parallel_stepping``: step in parallel once
            :func:`~mesa_llm_parallel.enable_automatic_parallel_stepping` was called.
        **client_options: Passed to :class:`OpenAIChat` (``model``, ``timeout``,
            ``max_retries``, ``api_key``).
    """

    def __init__(
        self,
        n: int,
        base_url: str,
        *,
        seed: int | None = None,
        parallel: bool = True,
        **client_options: Any,
    ) -> None:
        super().__init__(rng=seed)
        self.parallel_stepping = parallel
        self.llm = OpenAIChat(base_url, **client_options)
        self.step_count = 0  # our own: Mesa 4 has no model.steps
        for _ in range(n):
            ChatAgent(self)

    def step(self) -> None:
        """Step every agent (in parallel when enabled)."""
        self.step_count += 1
        self.agents.shuffle_do("step")

    def answers(self) -> dict[int, list[str]]:
        """Every agent's answers, by agent id (to compare runs)."""
        return {a.unique_id: list(a.answers) for a in self.agents}

    async def aclose(self) -> None:
        """Close the model's clients (see :meth:`OpenAIChat.aclose`)."""
        await self.llm.aclose()

    def close(self) -> None:
        """Close the model's clients (see :meth:`OpenAIChat.close`)."""
        self.llm.close()
