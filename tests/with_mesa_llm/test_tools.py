"""mesa-llm tools really run: ReAct agents call ``cast_ballot`` through the loopback server.

The server's default answers make mesa-llm's ReAct loop work offline: the reasoning
request (``response_format`` = mesa-llm's ``ReActOutput`` schema, ``tool_choice`` =
``"none"``) gets JSON valid against that schema, and the execution request
(``tool_choice`` = ``"auto"`` with the one selected tool) gets a call of that tool with
arguments valid against its parameters, which mesa-llm's tool manager then runs.
"""

from __future__ import annotations

import json

import pytest
from llm_support import Election

import mesa_llm_parallel as mlp
from mesa_llm_parallel.testing import ChatRequest, LoopbackLLMServer, ToolCall, default_reply

AGENTS = 10


@pytest.mark.parametrize("mode", ["asyncio", "threading"])
def test_react_agents_run_their_tool_concurrently(server, mode):
    mlp.enable_automatic_parallel_stepping(mode=mode)
    model = Election(AGENTS, server.base_url)
    for step in (1, 2):
        server.reset_stats()
        model.step()
        stats = server.stats()
        assert (stats.errors, stats.rate_limited) == (0, 0)
        assert stats.completed == stats.requests >= 2 * AGENTS  # reasoning + tool calls
        assert stats.peak_concurrency == AGENTS  # every agent's request at once
        report = mlp.last_step_report(model)
        assert (report.mode, report.completed, report.failures) == (mode, AGENTS, ())
        # The tool ran once per agent and step, with arguments of its schema's types.
        assert len(model.ballots) == step * AGENTS
    voters = [agent_id for agent_id, *_ in model.ballots]
    assert sorted(voters) == sorted(2 * [a.unique_id for a in model.agents])
    assert {choice for _, choice, _, _ in model.ballots} <= {"agree", "disagree"}
    assert {weight for _, _, weight, _ in model.ballots} == {0}
    threads = {thread for *_, thread in model.ballots}
    if mode == "threading":
        assert all(name.startswith("mesa-llm-parallel-worker") for name in threads)
        assert len(threads) > 1


def test_a_respond_hook_chooses_the_arguments():
    """A hook answers the tool-call request itself and leaves the rest to the default."""
    seen: list[ChatRequest] = []

    def respond(request: ChatRequest):
        seen.append(request)
        if request.tools and request.tool_choice != "none":
            return ToolCall("cast_ballot", {"choice": "park", "weight": 3})
        return default_reply(request)

    mlp.enable_automatic_parallel_stepping(mode="asyncio")
    with LoopbackLLMServer(respond=respond, latency=0.2) as server:
        model = Election(4, server.base_url)
        model.step()
        assert server.stats().peak_concurrency == 4
    assert sorted(b[:3] for b in model.ballots) == [
        (a.unique_id, "park", 3) for a in sorted(model.agents, key=lambda a: a.unique_id)
    ]
    reasoning = [r for r in seen if r.response_format is not None]
    assert len(reasoning) == 4
    schema = reasoning[0].response_format["json_schema"]["schema"]
    assert set(schema["required"]) == {"reasoning", "action"}
    assert {r.tool_choice for r in reasoning} == {"none"}
    executions = [r for r in seen if r.tool_choice == "auto"]
    assert [r.tool_names for r in executions] == [("cast_ballot",)] * 4
    reply = json.loads(default_reply(reasoning[0]).content)
    assert set(reply) == {"reasoning", "action"}
