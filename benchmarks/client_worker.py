"""One HTTP client's cost per call, measured in a process of its own (scenario 14).

Run by ``bench_clients.py`` with the interpreter of the mesa-llm venv (it has litellm,
openai with aiohttp, Mesa and this package)::

    python client_worker.py '{"base_url": ..., "client": "aiohttp", "n": 1000, "steps": 2}'

It builds a model of ``n`` agents whose ``astep`` awaits one chat completion through the
named client, runs one warm-up step (connections opened) and ``steps`` timed asyncio-mode
steps of the library, and prints one JSON line: per step the wall seconds, the process
CPU seconds and how many agents got an answer.

Clients:

* ``httpx``: ``openai.AsyncOpenAI`` with its default transport (httpx) and its default
  connection pool (1,000 connections, 100 kept alive);
* ``httpx-pool``: the same with every connection kept alive (``max_connections =
  max_keepalive_connections = n``), as the HTTP scenarios configure it;
* ``aiohttp``: ``openai.AsyncOpenAI(http_client=openai.DefaultAioHttpClient())``;
* ``litellm``: ``litellm.acompletion(model="openai/...", api_base=...)``, what mesa-llm's
  ``ModuleLLM`` calls.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from typing import Any

import mesa

import mesa_llm_parallel as mlp

MODEL = "loopback-chat"
CLIENTS = ("httpx", "httpx-pool", "aiohttp", "litellm")


def _messages(agent: mesa.Agent) -> list[dict[str, str]]:
    text = f"Agent {agent.unique_id}, round {agent.model.round}: should I cooperate?"
    return [{"role": "user", "content": text}]


class ChatAgent(mesa.Agent):
    async def astep(self) -> None:
        reply = await self.model.complete(_messages(self))
        if reply:
            self.model.answered += 1


class ChatModel(mesa.Model):
    def __init__(self, n: int, complete: Any) -> None:
        super().__init__(rng=1)
        self.parallel_stepping = True
        self.complete = complete
        self.round = 0
        self.answered = 0
        ChatAgent.create_agents(self, n)

    def step(self) -> None:
        self.round += 1
        self.answered = 0
        self.agents.shuffle_do("step")


def make_client(kind: str, base_url: str, n: int) -> tuple[Any, Any]:
    """(complete coroutine function, closer coroutine function or None)."""
    if kind == "litellm":
        import litellm

        async def complete_litellm(messages: list[dict[str, str]]) -> str:
            response = await litellm.acompletion(
                model=f"openai/{MODEL}",
                messages=messages,
                api_base=base_url,
                api_key="loopback",
                timeout=120,
            )
            return response.choices[0].message.content

        return complete_litellm, None

    import openai

    options: dict[str, Any] = {}
    if kind == "aiohttp":
        options["http_client"] = openai.DefaultAioHttpClient(timeout=120)
    elif kind == "httpx-pool":
        try:
            import httpx2 as httpx
        except ImportError:
            import httpx  # type: ignore[no-redef]
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n, keepalive_expiry=60)
        options["http_client"] = httpx.AsyncClient(limits=limits, timeout=120)
    elif kind != "httpx":
        raise ValueError(f"unknown client {kind!r}; expected one of {', '.join(CLIENTS)}")
    client = openai.AsyncOpenAI(
        base_url=base_url, api_key="loopback", max_retries=0, timeout=120, **options
    )

    async def complete_openai(messages: list[dict[str, str]]) -> str:
        response = await client.chat.completions.create(model=MODEL, messages=messages)
        return response.choices[0].message.content

    return complete_openai, client.close


def main(config: dict[str, Any]) -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(65_536, hard), hard))
    n = config["n"]
    complete, close = make_client(config["client"], config["base_url"], n)
    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    model = ChatModel(n, complete)
    model.step()  # warm-up: imports, connections
    samples = []
    for _ in range(config["steps"]):
        gc.collect()
        cpu = time.process_time()
        start = time.perf_counter()
        model.step()
        samples.append(
            {
                "seconds": time.perf_counter() - start,
                "cpu": time.process_time() - cpu,
                "answered": model.answered,
            }
        )
    if close is not None:
        from mesa_llm_parallel._loops import run_coroutine_sync

        run_coroutine_sync(close, model=model)
    print(json.dumps(samples), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
