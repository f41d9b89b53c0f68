"""Which ``shuffle_do`` runs, whatever the order of importing mesa_llm and enabling ours.

Importing ``mesa_llm`` replaces ``AgentSet.shuffle_do`` (not ``_HardKeyAgentSet``'s, the
class of ``model.agents`` on Mesa 3.5) for the whole process, so each scenario runs in a
fresh interpreter (``import_order_child.py``); the three start together. A scenario
reports which function each class holds ("mesa" is the very function object Mesa had
before anything was imported) and, for each step, whether our patch ran it, whether
mesa_llm's parallel stepping ran, and what the loopback server saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("import_order_child.py")
SCENARIOS = ("mesa_llm_first", "ours_first", "mesa_llm_calls_after_ours")
AGENTS, EVEN = 8, 4  # model.agents, and model.agents.select(even) (a plain AgentSet)

MESA = {"AgentSet": "mesa", "_HardKeyAgentSet": "mesa", "enabled": False}
OURS = {"AgentSet": "ours", "_HardKeyAgentSet": "ours", "enabled": True}
#: What replaced our AgentSet.shuffle_do, as the take-back warning names it.
MESA_LLMS = "mesa_llm.parallel_stepping._enhanced_shuffle_do"
MESAS = "mesa.agentset.AgentSet.shuffle_do"


def ours(agents: int, method: str = "astep", warnings: Sequence[str] = ()) -> dict:
    """A step our patch ran: every agent's request on the server at once."""
    return _step(agents, ours=True, mesa_llm=0, peak=agents, method=method, warnings=warnings)


def sequential(agents: int) -> dict:
    """A step Mesa's own method ran: ``step()`` one agent after another."""
    return _step(agents, ours=False, mesa_llm=0, peak=1, method="step", warnings=())


def by_mesa_llm(agents: int) -> dict:
    """A step mesa_llm's patched method ran (its asyncio mode, ``astep`` concurrently)."""
    return _step(agents, ours=False, mesa_llm=1, peak=agents, method="astep", warnings=())


def _named(message: str) -> str:
    """A take-back warning, reduced to the replacement it names (else kept whole)."""
    if f"replaced by {MESA_LLMS} " in message:
        return MESA_LLMS
    if "set back to Mesa's own method" in message:
        return MESAS
    return message


def steps(facts: dict, key: str) -> list[dict]:
    return [{**step, "warnings": [_named(w) for w in step["warnings"]]} for step in facts[key]]


def _step(agents, *, ours, mesa_llm, peak, method, warnings) -> dict:
    return {
        "set": "_HardKeyAgentSet" if agents == AGENTS else "AgentSet",
        "ours": ours,
        "mesa_llm": mesa_llm,
        "requests": agents,
        "peak": peak,
        "methods": [method],
        "warnings": list(warnings),
    }


@pytest.fixture(scope="module")
def facts() -> dict[str, dict]:
    """Run every scenario, each in its own fresh interpreter, all at once."""
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONWARNINGS": ""}
    children = {
        name: subprocess.Popen(  # noqa: S603 - this interpreter, our own script
            [sys.executable, str(CHILD), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in SCENARIOS
    }
    results = {}
    for name, child in children.items():
        out, err = child.communicate(timeout=180)
        assert child.returncode == 0, f"{name} failed:\n{err[-4000:]}"
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


def test_mesa_llm_first_then_enable(facts):
    """The recommended order: ours patches both classes on top of Mesa's own functions."""
    f = facts["mesa_llm_first"]
    # mesa_llm's import patched AgentSet only; model.agents is a _HardKeyAgentSet.
    assert f["after_import"] == {**MESA, "AgentSet": "mesa_llm"}
    assert f["enable_warnings"] == []
    assert f["after_enable"] == OURS  # both wrap Mesa's own function, not mesa_llm's
    assert steps(f, "steps") == [ours(AGENTS), ours(EVEN)]  # mesa_llm's stepping never ran
    assert f["after_disable"] == MESA  # Mesa's exact functions, not mesa_llm's patch
    assert f["do_async_kept"]  # mesa_llm's other addition to AgentSet is left alone
    assert steps(f, "steps_after_disable") == [sequential(EVEN)]


def test_enable_then_mesa_llm(facts):
    """mesa_llm imported after enable: ours takes AgentSet back at the next step it runs."""
    f = facts["ours_first"]
    assert f["enable_warnings"] == []
    assert f["after_enable"] == OURS
    assert f["after_import"] == {**OURS, "AgentSet": "mesa_llm"}
    assert f["mesa_llm_keeps"] == "ours"  # mesa_llm's "original" is our function
    assert steps(f, "steps") == [
        by_mesa_llm(EVEN),  # a plain AgentSet, before ours has run a step
        ours(AGENTS, warnings=[MESA_LLMS]),
        ours(EVEN),  # AgentSet is ours again
        ours(AGENTS),  # one warning only
    ]
    assert f["after_steps"] == OURS
    assert f["after_disable"] == MESA
    # mesa_llm's kept reference to our function, called with the flag on: Mesa's method.
    assert steps(f, "kept_function_step") == [sequential(EVEN)]
    # mesa_llm's own disable puts that function back on AgentSet: still sequential, and
    # enable recognises it as ours (no warning) and wraps Mesa's own function again.
    assert f["after_mesa_llm_disable"] == {**MESA, "AgentSet": "ours"}
    assert steps(f, "steps_after_mesa_llm_disable") == [sequential(EVEN)]
    assert f["reenable_warnings"] == []
    assert f["after_reenable"] == OURS
    assert steps(f, "steps_after_reenable") == [ours(EVEN, method="step")]  # threading mode
    assert f["after_second_disable"] == MESA


def test_mesa_llm_enable_and_disable_after_ours(facts):
    """mesa_llm's own enable/disable while ours is enabled: ours keeps precedence."""
    f = facts["mesa_llm_calls_after_ours"]
    assert f["after_mesa_llm_enable"] == {**OURS, "AgentSet": "mesa_llm"}
    # Enabling ours again takes AgentSet back at once, without a warning.
    assert f["reenable_warnings"] == []
    assert f["after_reenable"] == OURS
    assert steps(f, "steps_after_reenable") == [ours(EVEN)]
    # Without that: the next step through ours takes it back, with the warning.
    assert steps(f, "steps_after_second_mesa_llm_enable") == [
        ours(AGENTS, warnings=[MESA_LLMS]),
        ours(EVEN),
    ]
    # mesa_llm's disable puts back what it had replaced on import: Mesa's own function.
    # Plain AgentSets then step sequentially until ours runs a step and takes it back.
    assert f["after_mesa_llm_disable"] == {**OURS, "AgentSet": "mesa"}
    assert steps(f, "steps_after_mesa_llm_disable") == [
        sequential(EVEN),
        ours(AGENTS, warnings=[MESAS]),
        ours(EVEN),
    ]
    assert f["after_disable"] == MESA
