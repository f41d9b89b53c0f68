"""mesa-llm's LLMAgent stepped by mesa_llm_parallel, against the loopback server.

mesa_llm is imported first (by the conftest), then each test enables parallel stepping:
the recommended order. Concurrency is read off the server: how many requests it served
at once (``peak_concurrency``) and how many it got per step, never from a clock.
"""

from __future__ import annotations

import threading

import pytest
from llm_support import Planner, StepOnly, Town

import mesa_llm_parallel as mlp
from mesa_llm_parallel.testing import LoopbackLLMServer, deterministic_reply

AGENTS = 20
STEPS = 3


def _step_and_count(model: Town, server: LoopbackLLMServer) -> tuple[int, int]:
    """Step once; return the server's (requests, peak concurrency) for that step."""
    server.reset_stats()
    model.step()
    stats = server.stats()
    assert stats.completed == stats.requests
    assert (stats.errors, stats.rate_limited) == (0, 0)
    return stats.requests, stats.peak_concurrency


def _assert_replies(model: Town, method: str, steps: int) -> None:
    """Every agent got, once per step, the server's answer to its own prompt."""
    for agent in model.agents:
        assert [m for m, *_ in agent.replies] == [method] * steps
        assert [p for _, p, *_ in agent.replies] == [
            f"Agent {agent.unique_id}, step {s}: do you agree?" for s in range(1, steps + 1)
        ]
        assert all(reply == deterministic_reply(prompt) for _, prompt, reply, _ in agent.replies)


def _assert_report(model: Town, mode: str, agents: int) -> None:
    report = mlp.last_step_report(model)
    assert report is not None
    assert (report.mode, report.completed, report.failures) == (mode, agents, ())


def test_asyncio_mode_overlaps_every_agents_agenerate(server):
    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    model = Town(AGENTS, server.base_url)
    connections = 0
    for _ in range(STEPS):
        assert _step_and_count(model, server) == (AGENTS, AGENTS)  # all requests at once
        _assert_report(model, "asyncio", AGENTS)
        connections += server.stats().connections
    _assert_replies(model, "astep", STEPS)
    # Every step ran on the same event loop, so litellm's cached async client (one per
    # loop) and its keep-alive connections served all of them.
    assert connections <= AGENTS


def test_threading_mode_runs_generate_in_the_pool(server):
    workers = 8
    mlp.enable_automatic_parallel_stepping(mode="threading", max_workers=workers)
    model = Town(2 * workers, server.base_url)
    for _ in range(STEPS):
        # One request per worker at a time.
        assert _step_and_count(model, server) == (2 * workers, workers)
        _assert_report(model, "threading", 2 * workers)
    _assert_replies(model, "step", STEPS)
    threads = {thread for agent in model.agents for *_, thread in agent.replies}
    assert len(threads) == workers
    assert all(name.startswith("mesa-llm-parallel-worker") for name in threads)


@pytest.mark.parametrize("mode", ["asyncio", "threading"])
def test_chain_of_thought_plans_overlap(server, mode):
    """mesa-llm's own reasoning: ``aplan`` (asyncio) or ``plan`` (threading), two calls each."""
    mlp.enable_automatic_parallel_stepping(mode=mode)
    n = 10
    model = Town(n, server.base_url, Planner)
    for _ in range(2):
        # The reasoning request of every agent at once, then every tool-call request.
        assert _step_and_count(model, server) == (2 * n, n)
        _assert_report(model, mode, n)
    method = "astep" if mode == "asyncio" else "step"
    for agent in model.agents:
        assert [m for m, _ in agent.plans] == [method, method]
        assert all(content in ("agree", "disagree") for _, content in agent.plans)


def test_llm_agent_without_astep_blocks_the_loop_in_asyncio_mode():
    """An LLMAgent subclass with only ``step`` inherits mesa-llm's ``async def astep``,
    which calls that blocking ``step`` on the event loop: the agents run one at a time.
    Threading mode runs the same agents concurrently."""
    with LoopbackLLMServer(latency=0.2) as server:
        mlp.enable_automatic_parallel_stepping(mode="asyncio")
        model = Town(4, server.base_url, StepOnly)
        with pytest.warns(RuntimeWarning, match=r"falling back to synchronous step\(\)"):
            assert _step_and_count(model, server) == (4, 1)
        mlp.enable_automatic_parallel_stepping(mode="threading")
        assert _step_and_count(model, server) == (4, 4)
    _assert_replies(model, "step", 2)


def test_without_the_flag_mesas_own_method_calls_step():
    with LoopbackLLMServer(latency=0.05) as server:
        mlp.enable_automatic_parallel_stepping(mode="asyncio")
        model = Town(5, server.base_url, parallel=False)
        assert _step_and_count(model, server) == (5, 1)
    assert mlp.last_step_report(model) is None
    _assert_replies(model, "step", 1)


def test_a_model_stepped_from_two_threads_keeps_working(server):
    """A UI steps from its play thread, then from another one: every step runs on the
    model's home loop, so litellm's client of that loop serves them all."""
    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    n = 10
    model = Town(n, server.base_url)
    counts = [_step_and_count(model, server)]
    home = mlp.home_loop(model)
    errors: list[BaseException] = []
    paths: list[str | None] = []

    def play() -> None:
        try:
            counts.append(_step_and_count(model, server))
            paths.append(mlp.last_loop_path())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=play)
    thread.start()
    thread.join(30)
    assert errors == []
    assert paths == ["home_loop"]
    counts.append(_step_and_count(model, server))
    assert counts == [(n, n)] * 3
    assert mlp.home_loop(model) is home
    _assert_replies(model, "astep", 3)
    _assert_report(model, "asyncio", n)
