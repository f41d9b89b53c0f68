"""One import-order scenario in a fresh process; prints what it saw as JSON.

``python import_order_child.py SCENARIO``, run by ``test_import_order.py``. Importing
``mesa_llm`` patches Mesa for the whole process, so every scenario needs a process of
its own. The facts are plain values for the test to compare:

* the state of both agent-set classes: ``"mesa"`` (Mesa's own function, the very object
  it had before anything was imported), ``"ours"`` (mesa_llm_parallel's, wrapping
  Mesa's own) or ``"mesa_llm"`` (``mesa_llm.parallel_stepping._enhanced_shuffle_do``);
* for each ``shuffle_do("step")`` call: whether our patch ran it (a new
  ``last_step_report``), how often mesa_llm's parallel stepping ran, the requests the
  loopback server got and how many it served at once, which agent method answered,
  and the RuntimeWarnings raised.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).parent))  # llm_support

from mesa.agentset import AgentSet, _HardKeyAgentSet

#: Mesa's own functions, before mesa_llm (or anything else) replaced them.
PRISTINE = {cls: cls.__dict__["shuffle_do"] for cls in (AgentSet, _HardKeyAgentSet)}

import mesa_llm_parallel as mlp  # noqa: E402  (imports nothing of mesa_llm)
from mesa_llm_parallel.testing import LoopbackLLMServer  # noqa: E402

AGENTS = 8
EVEN = AGENTS // 2  # the agents of model.agents.select(even): a plain AgentSet


def describe(function: Any, cls: type) -> str:
    if function is PRISTINE[cls]:
        return "mesa"
    stepping = sys.modules.get("mesa_llm.parallel_stepping")
    if stepping is not None and function is stepping._enhanced_shuffle_do:
        return "mesa_llm"
    code = getattr(function, "__code__", None)
    if (
        code is not None
        and Path(code.co_filename).parent.name == "mesa_llm_parallel"
        and getattr(function, "__wrapped__", None) is PRISTINE[cls]
    ):
        return "ours"
    return f"other: {function!r}"


def state() -> dict[str, Any]:
    return {
        "AgentSet": describe(AgentSet.__dict__["shuffle_do"], AgentSet),
        "_HardKeyAgentSet": describe(_HardKeyAgentSet.__dict__["shuffle_do"], _HardKeyAgentSet),
        "enabled": mlp.is_automatic_parallel_stepping_enabled(),
    }


def runtime_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


class Scenario:
    """The loopback server, a model of Voters, and a spy on mesa_llm's stepping."""

    def __init__(self) -> None:
        # Long enough that every agent's request is in flight at once on a loaded machine
        # (litellm spends milliseconds of CPU on each call before it is sent).
        self.server = LoopbackLLMServer(latency=1.0).start()
        self.mesa_llm_steps = 0
        self.model: Any = None

    def import_mesa_llm(self) -> Any:
        import llm_support  # imports mesa_llm: its import patches AgentSet.shuffle_do

        stepping = importlib.import_module("mesa_llm.parallel_stepping")
        real = stepping.step_agents_parallel_sync

        def spy(agents: Any) -> None:  # what mesa_llm's patched shuffle_do calls
            self.mesa_llm_steps += 1
            real(agents)

        stepping.step_agents_parallel_sync = spy
        self.model = llm_support.Town(AGENTS, self.server.base_url)
        return stepping

    def even(self) -> AgentSet:
        return self.model.agents.select(lambda agent: agent.unique_id % 2 == 0)

    def step(self, agents: Any, call: Any = None) -> dict[str, Any]:
        """``agents.shuffle_do("step")`` (or ``call(agents, "step")``) with the flag on."""
        for agent in self.model.agents:
            agent.replies.clear()
        self.server.reset_stats()
        report, spied = mlp.last_step_report(self.model), self.mesa_llm_steps
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if call is None:
                agents.shuffle_do("step")
            else:
                call(agents, "step")
        stats = self.server.stats()
        return {
            "set": type(agents).__name__,
            "ours": mlp.last_step_report(self.model) is not report,
            "mesa_llm": self.mesa_llm_steps - spied,
            "requests": stats.requests,
            "peak": stats.peak_concurrency,
            "methods": sorted({r[0] for agent in self.model.agents for r in agent.replies}),
            "warnings": runtime_warnings(caught),
        }

    def enable(self, mode: str) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mlp.enable_automatic_parallel_stepping(mode=mode)
        return runtime_warnings(caught)


def mesa_llm_first(s: Scenario) -> dict[str, Any]:
    """The recommended order: import mesa_llm, then enable ours."""
    facts: dict[str, Any] = {}
    s.import_mesa_llm()
    facts["after_import"] = state()
    facts["enable_warnings"] = s.enable("asyncio")
    facts["after_enable"] = state()
    facts["steps"] = [s.step(s.model.agents), s.step(s.even())]
    mlp.disable_automatic_parallel_stepping()
    facts["after_disable"] = state()
    facts["do_async_kept"] = "do_async" in AgentSet.__dict__
    facts["steps_after_disable"] = [s.step(s.even())]
    return facts


def ours_first(s: Scenario) -> dict[str, Any]:
    """Enable ours, then import mesa_llm, which patches AgentSet on top of ours."""
    facts: dict[str, Any] = {}
    facts["enable_warnings"] = s.enable("asyncio")
    facts["after_enable"] = state()
    stepping = s.import_mesa_llm()
    facts["after_import"] = state()
    facts["mesa_llm_keeps"] = describe(stepping._original_shuffle_do, AgentSet)
    facts["steps"] = [
        s.step(s.even()),  # AgentSet: mesa_llm's method, until ours notices
        s.step(s.model.agents),  # ours notices and takes AgentSet back
        s.step(s.even()),
        s.step(s.model.agents),
    ]
    facts["after_steps"] = state()
    mlp.disable_automatic_parallel_stepping()
    facts["after_disable"] = state()
    # mesa_llm kept our function as "the original"; with ours disabled it is Mesa's.
    facts["kept_function_step"] = [s.step(s.even(), call=stepping._original_shuffle_do)]
    stepping.disable_automatic_parallel_stepping()  # puts that kept function on AgentSet
    facts["after_mesa_llm_disable"] = state()
    facts["steps_after_mesa_llm_disable"] = [s.step(s.even())]
    facts["reenable_warnings"] = s.enable("threading")
    facts["after_reenable"] = state()
    facts["steps_after_reenable"] = [s.step(s.even())]
    mlp.disable_automatic_parallel_stepping()
    facts["after_second_disable"] = state()
    return facts


def mesa_llm_calls_after_ours(s: Scenario) -> dict[str, Any]:
    """Import mesa_llm, enable ours, then call mesa_llm's own enable and disable."""
    facts: dict[str, Any] = {}
    stepping = s.import_mesa_llm()
    s.enable("asyncio")
    stepping.enable_automatic_parallel_stepping("threading")
    facts["after_mesa_llm_enable"] = state()
    facts["reenable_warnings"] = s.enable("asyncio")  # our enable again: no warning
    facts["after_reenable"] = state()
    facts["steps_after_reenable"] = [s.step(s.even())]
    stepping.enable_automatic_parallel_stepping("threading")
    facts["steps_after_second_mesa_llm_enable"] = [s.step(s.model.agents), s.step(s.even())]
    stepping.disable_automatic_parallel_stepping()  # puts Mesa's own back on AgentSet
    facts["after_mesa_llm_disable"] = state()
    facts["steps_after_mesa_llm_disable"] = [
        s.step(s.even()),  # Mesa's own method: sequential
        s.step(s.model.agents),  # ours takes AgentSet back
        s.step(s.even()),
    ]
    mlp.disable_automatic_parallel_stepping()
    facts["after_disable"] = state()
    return facts


SCENARIOS = {f.__name__: f for f in (mesa_llm_first, ours_first, mesa_llm_calls_after_ours)}


def main(name: str) -> None:
    scenario = Scenario()
    try:
        facts = SCENARIOS[name](scenario)
    finally:
        scenario.server.stop()
    print(json.dumps(facts))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: litellm's exit hooks only add noise here


if __name__ == "__main__":
    main(sys.argv[1])
