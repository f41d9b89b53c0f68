"""Models for the batch_run tests, importable by the worker processes those tests start.

The agents ask the loopback server one question per step through a minimal HTTP/1.1
client of the standard library (one connection per request), so that a worker process
needs nothing but Mesa and this module.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import urllib.parse

import mesa


def _body(prompt: str) -> bytes:
    return json.dumps(
        {"model": "loopback", "messages": [{"role": "user", "content": prompt}]}
    ).encode()


def _answer(status: int, payload: bytes) -> str:
    if status != 200:
        raise RuntimeError(f"the server answered {status}: {payload[:200]!r}")
    return json.loads(payload)["choices"][0]["message"]["content"]


def ask(base_url: str, prompt: str) -> str:
    """One chat completion, blocking."""
    url = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        connection.request(
            "POST",
            url.path + "/chat/completions",
            _body(prompt),
            {"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        return _answer(response.status, response.read())
    finally:
        connection.close()


async def aask(base_url: str, prompt: str) -> str:
    """One chat completion, awaited."""
    url = urllib.parse.urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        body = _body(prompt)
        head = (
            f"POST {url.path}/chat/completions HTTP/1.1\r\nHost: {url.hostname}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    return _answer(int(head.split()[1]), payload)


class Respondent(mesa.Agent):
    """Answers one question per step: ``astep`` in asyncio mode, ``step`` in threading."""

    def __init__(self, model: Survey) -> None:
        super().__init__(model)
        self.answer = ""
        self.asked = 0

    def question(self) -> str:
        return f"{self.model.topic} {self.unique_id} {self.asked}"

    async def astep(self) -> None:
        self.answer = await aask(self.model.base_url, self.question())
        self.asked += 1

    def step(self) -> None:
        self.answer = ask(self.model.base_url, self.question())
        self.asked += 1


class Survey(mesa.Model):
    """``n`` respondents asking the server; collects one model and one agent reporter."""

    def __init__(self, n: int = 4, topic: str = "tea", base_url: str = "", rng=None) -> None:
        super().__init__(rng=rng)
        self.topic = topic
        self.base_url = base_url
        for _ in range(n):
            Respondent(self)
        self.datacollector = mesa.DataCollector(
            model_reporters={"Agreeing": lambda m: sum(a.answer == "agree" for a in m.agents)},
            agent_reporters={"Answer": "answer", "Pid": lambda a: os.getpid()},
        )

    def step(self) -> None:
        self.agents.shuffle_do("step")
        self.datacollector.collect(self)


class Wealth(mesa.Agent):
    """No network: a seeded draw at creation, a deterministic change per step."""

    def __init__(self, model: Economy) -> None:
        super().__init__(model)
        self.wealth = self.random.randint(1, 10)

    async def astep(self) -> None:
        await asyncio.sleep(0)
        self.wealth += self.unique_id % 3

    def step(self) -> None:
        self.wealth += self.unique_id % 3


class Economy(mesa.Model):
    """Seeded, order-independent: its rows are the same stepped in parallel or not."""

    def __init__(self, n: int = 3, bonus: int = 0, rng=None, fail_at: int | None = None) -> None:
        super().__init__(rng=rng)
        self.bonus = bonus
        self.fail_at = fail_at
        self.taken = 0
        for _ in range(n):
            Wealth(self)
        self.datacollector = mesa.DataCollector(
            model_reporters={"Total": lambda m: sum(a.wealth for a in m.agents) + m.bonus},
            agent_reporters={"Wealth": "wealth"},
        )
        self.datacollector.collect(self)

    def step(self) -> None:
        self.taken += 1
        if self.fail_at is not None and self.taken == self.fail_at:
            raise ValueError(f"economy with bonus={self.bonus} failed at step {self.taken}")
        self.agents.shuffle_do("step")
        self.datacollector.collect(self)
        if self.taken >= 3 and self.bonus < 0:
            self.running = False


class SeededEconomy(Economy):
    """The same, taking ``seed=`` (Mesa's batch_run passes the seed under that name)."""

    def __init__(self, n: int = 3, bonus: int = 0, seed=None) -> None:
        super().__init__(n, bonus, rng=seed)


class Quiet(mesa.Model):
    """Model reporters only: one row per collection."""

    def __init__(self, level: int = 1, rng=None) -> None:
        super().__init__(rng=rng)
        self.level = level
        for _ in range(2):
            Wealth(self)
        self.datacollector = mesa.DataCollector(
            model_reporters={"Level": "level", "Draw": lambda m: m.random.random()}
        )

    def step(self) -> None:
        self.agents.shuffle_do("step")
        self.level += 1
        self.datacollector.collect(self)
