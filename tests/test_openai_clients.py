"""Real ``openai`` clients through parallel steps, against the loopback server.

One ``AsyncOpenAI`` and one ``OpenAI`` client per model, reused for every step: in a
script, inside a running loop, in a worker thread and in threading mode. The server
counts what really happened on the wire (requests, overlap, 429s, connections).
"""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

import mesa_llm_parallel as mlp
from mesa_llm_parallel.llm_server import LoopbackLLMServer, ServerStats

openai = pytest.importorskip(
    "openai", reason="the openai client tests need 'openai' (pip install 'mesa_llm_parallel[llm]')"
)

from mesa_llm_parallel.llm_example import ChatModel, OpenAIChat  # noqa: E402

AGENTS = 40
STEPS = 3


@pytest.fixture
def server():
    with LoopbackLLMServer(latency=0.03) as running:
        yield running


def _assert_all_answered(server: LoopbackLLMServer, model: ChatModel, steps: int) -> ServerStats:
    """Every agent made one request per step, all answered, overlapping, on reused connections."""
    stats = server.stats()
    n = len(model.agents)
    assert stats.requests == stats.completed == n * steps
    assert (stats.rate_limited, stats.errors) == (0, 0)
    assert stats.peak_concurrency > 1  # the requests overlapped on the server
    assert stats.connections <= n  # later steps reused the first step's connections
    assert model.llm.calls == n * steps
    assert all(len(answers) == steps for answers in model.answers().values())
    report = mlp.last_step_report(model)
    assert report is not None
    assert report.failures == ()
    assert report.completed == n
    return stats


def test_asyncio_mode_in_a_script_reuses_one_async_client(server):
    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    model = ChatModel(AGENTS, server.base_url, seed=1)
    client = model.llm.async_client
    for _ in range(STEPS):
        model.step()
        assert mlp.last_loop_path() == "thread_loop"
    assert model.llm.async_client is client
    _assert_all_answered(server, model, STEPS)
    model.close()


def test_asyncio_mode_inside_a_running_loop(server, as_if_in_a_kernel):
    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    model = ChatModel(AGENTS, server.base_url, seed=1)

    async def cell() -> list[str | None]:  # a notebook cell: the kernel's loop is running
        paths = []
        for _ in range(STEPS):
            model.step()
            paths.append(mlp.last_loop_path())
        await model.aclose()
        return paths

    assert asyncio.run(cell()) == ["running_loop"] * STEPS
    _assert_all_answered(server, model, STEPS)


def test_asyncio_mode_in_a_worker_thread(server):
    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    model = ChatModel(AGENTS, server.base_url, seed=1)
    errors: list[BaseException] = []
    paths: list[str | None] = []

    def play() -> None:  # a UI's play thread: no running loop
        try:
            for _ in range(STEPS):
                model.step()
                paths.append(mlp.last_loop_path())
            model.close()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=play)
    thread.start()
    thread.join(30)
    assert errors == []
    assert paths == ["thread_loop"] * STEPS
    _assert_all_answered(server, model, STEPS)


def test_threading_mode_reuses_one_sync_client(server):
    mlp.enable_automatic_parallel_stepping(mode="threading", max_workers=8)
    model = ChatModel(AGENTS, server.base_url, seed=1)
    client = model.llm.client
    for _ in range(STEPS):
        model.step()
    assert model.llm.client is client
    stats = _assert_all_answered(server, model, STEPS)
    assert stats.peak_concurrency <= 8
    assert stats.connections <= 8
    model.close()


@pytest.mark.parametrize("mode", ["asyncio", "threading"])
def test_max_concurrency_is_what_the_server_sees(server, mode):
    mlp.enable_automatic_parallel_stepping(mode=mode, max_concurrency=5)
    model = ChatModel(30, server.base_url, seed=1)
    for _ in range(2):
        model.step()
    stats = _assert_all_answered(server, model, 2)
    assert 1 < stats.peak_concurrency <= 5
    model.close()


def test_answers_are_the_same_sequentially_and_in_both_modes():
    fast = LoopbackLLMServer(latency=0.005).start()

    def run(mode: str | None) -> dict[int, list[str]]:
        if mode is not None:
            mlp.enable_automatic_parallel_stepping(mode=mode)
        model = ChatModel(20, fast.base_url, seed=5, parallel=mode is not None)
        for _ in range(2):
            model.step()
        model.close()
        return model.answers()

    try:
        sequential = run(None)
        assert run("asyncio") == sequential
        assert run("threading") == sequential
    finally:
        fast.stop()
    assert {a for answers in sequential.values() for a in answers} == {"agree", "disagree"}


# -- the quota --------------------------------------------------------------------
QUOTA = 100
BURST = 120


def _burst_against_quota(rate_limit: float | None) -> tuple[ServerStats, mlp.StepReport]:
    mlp.enable_automatic_parallel_stepping(
        mode="asyncio", on_error="collect", rate_limit=rate_limit
    )
    with LoopbackLLMServer(latency=0.02, rate_limit=QUOTA) as server:
        model = ChatModel(BURST, server.base_url, seed=1, max_retries=0)
        model.step()
        model.close()
        stats = server.stats()
    report = mlp.last_step_report(model)
    assert report is not None
    return stats, report


def test_rate_limit_below_the_quota_gets_no_429():
    stats, report = _burst_against_quota(0.9 * QUOTA)
    assert stats.rate_limited == 0
    assert stats.requests == stats.completed == BURST
    assert report.failures == ()


def test_without_rate_limit_the_same_burst_gets_429():
    stats, report = _burst_against_quota(None)
    assert stats.rate_limited > 0
    assert stats.requests == BURST
    assert stats.completed == BURST - stats.rate_limited
    assert len(report.failures) == stats.rate_limited
    assert all(isinstance(f.exception, openai.RateLimitError) for f in report.failures)


# -- one client, several threads ----------------------------------------------------
def _step_from_play_thread_then_button(model: ChatModel) -> list[mlp.StepReport]:
    """A UI: steps from a play thread, then from a handler on a running loop."""
    reports = []
    for where in ("play", "button", "play"):
        if where == "play":
            thread = threading.Thread(target=model.step)
            thread.start()
            thread.join(30)
        else:

            async def handler() -> None:
                model.step()

            asyncio.run(handler())
        reports.append(mlp.last_step_report(model))
    return reports


def test_a_step_from_another_thread_runs_on_the_models_home_loop(server):
    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    model = ChatModel(5, server.base_url, seed=1)
    model.step()  # on this thread's persistent loop: the model's home from now on
    home = mlp.home_loop(model)
    assert home is mlp._loops.thread_loop()
    seen: list[object] = []

    def play() -> None:
        model.step()
        seen.extend([mlp.last_loop_path(), mlp.home_loop(model)])

    thread = threading.Thread(target=play)  # no loop runs there; it has its own
    thread.start()
    thread.join(30)
    assert seen == ["home_loop", home]
    assert mlp.last_step_report(model).failures == ()
    stats = server.stats()
    assert stats.completed == 10
    assert stats.connections <= 5  # the second step reused the first step's connections
    model.close()


def test_play_thread_then_button_then_play_share_one_async_client(server):
    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    model = ChatModel(10, server.base_url, seed=1)
    reports = _step_from_play_thread_then_button(model)
    assert [r.failures for r in reports] == [(), (), ()]
    assert server.stats().completed == 30
    assert server.stats().connections <= 10
    model.close()


def test_async_client_awaited_on_a_foreign_loop_fails_clearly(server):
    mlp.enable_automatic_parallel_stepping(mode="asyncio", on_error="collect")
    model = ChatModel(5, server.base_url, seed=1)
    model.step()  # the client now belongs to the model's home loop
    # The async entry runs on the caller's loop, whatever the model's home is.
    asyncio.run(mlp.ashuffle_do(model.agents, "step"))
    report = mlp.last_step_report(model)
    assert {type(f.exception) for f in report.failures} == {RuntimeError}
    assert "first used on another event loop" in str(report.failures[0].exception)
    assert server.stats().requests == 5  # the second step sent nothing
    model.close()


def test_background_loop_lets_one_async_client_serve_several_threads(server):
    mlp.enable_automatic_parallel_stepping(mode="asyncio", loop="background")
    model = ChatModel(10, server.base_url, seed=1)
    reports = _step_from_play_thread_then_button(model)
    assert [r.failures for r in reports] == [(), (), ()]
    assert server.stats().completed == 30
    model.close()


def test_openai_chat_without_openai_explains_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # makes `import openai` fail
    with pytest.raises(ImportError, match=r"mesa_llm_parallel\[llm\]"):
        OpenAIChat("http://127.0.0.1:1/v1")


def test_the_example_client_uses_aiohttp_when_installed_and_httpx_on_request():
    pytest.importorskip("aiohttp", reason="the llm extra brings openai[aiohttp]")
    from mesa_llm_parallel.llm_example import OpenAIChat

    with LoopbackLLMServer(latency=0.0) as server:
        chat = OpenAIChat(server.base_url)
        assert chat.transport == "aiohttp"
        assert isinstance(chat.async_client._client, openai.DefaultAioHttpClient)
        forced = OpenAIChat(server.base_url, transport="httpx")
        assert forced.transport == "httpx"
        assert not isinstance(forced.async_client._client, openai.DefaultAioHttpClient)
        for client in (chat, forced):
            assert asyncio.run(_one_reply(client))
        with pytest.raises(ValueError, match=r"transport must be one of .*'curl'"):
            OpenAIChat(server.base_url, transport="curl")


async def _one_reply(chat) -> str:
    try:
        return await chat.acomplete("hello")
    finally:
        await chat.aclose()
