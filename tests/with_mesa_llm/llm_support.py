"""mesa-llm agents and models for the integration tests (imports ``mesa_llm``).

Agents talk to a :class:`~mesa_llm_parallel.testing.LoopbackLLMServer` through
mesa-llm's own ``ModuleLLM`` (litellm): ``openai/`` model names, the server's base URL as
``api_base``, any API key. Used by the test modules and by ``import_order_child.py``.
"""

from __future__ import annotations

import os
import threading

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm imports offline
os.environ.setdefault("OPENAI_API_KEY", "sk-loopback")  # ModuleLLM requires a key

import mesa
from mesa_llm.llm_agent import LLMAgent
from mesa_llm.reasoning.cot import CoTReasoning
from mesa_llm.reasoning.react import ReActReasoning
from mesa_llm.tools.tool_decorator import tool

#: litellm's "openai/" provider speaks the OpenAI protocol to any ``api_base``.
LLM_MODEL = "openai/loopback-chat"


class _Asker(LLMAgent):
    """Shared set-up: ``replies`` records ``(method, prompt, reply, thread name)``."""

    def __init__(self, model: mesa.Model, api_base: str) -> None:
        super().__init__(model, reasoning=CoTReasoning, llm_model=LLM_MODEL, api_base=api_base)
        self.memory.display = False  # no rich panel per agent and step
        self.replies: list[tuple[str, str, str, str]] = []

    def prompt(self) -> str:
        return f"Agent {self.unique_id}, step {self.model.steps}: do you agree?"

    def record(self, method: str, prompt: str, response) -> None:
        reply = response.choices[0].message.content
        self.replies.append((method, prompt, reply, threading.current_thread().name))


class Voter(_Asker):
    """Asks one question per step: awaited in ``astep``, blocking in ``step``."""

    async def astep(self) -> None:
        prompt = self.prompt()
        self.record("astep", prompt, await self.llm.agenerate(prompt))

    def step(self) -> None:
        prompt = self.prompt()
        self.record("step", prompt, self.llm.generate(prompt))


class Citizen(Voter):
    """Two agent types, for a model that steps each type on its own."""


class Cop(Voter):
    pass


class StepOnly(_Asker):
    """Defines only ``step``; it inherits mesa-llm's ``LLMAgent.astep``, which calls it."""

    def step(self) -> None:
        prompt = self.prompt()
        self.record("step", prompt, self.llm.generate(prompt))


class Planner(LLMAgent):
    """Plans with mesa-llm's chain-of-thought reasoning: two requests per step.

    ``aplan``/``plan`` ask for the reasoning, then for the tool calls that carry it out;
    the plan is applied through the agent's tool manager.
    """

    def __init__(self, model: mesa.Model, api_base: str) -> None:
        super().__init__(
            model,
            reasoning=CoTReasoning,
            llm_model=LLM_MODEL,
            api_base=api_base,
            step_prompt="Decide whether to stay or to move.",
        )
        self.memory.display = False
        self.plans: list[tuple[str, str]] = []

    async def astep(self) -> None:
        plan = await self.reasoning.aplan(obs=await self.agenerate_obs(), selected_tools=[])
        await self.aapply_plan(plan)
        self.plans.append(("astep", plan.llm_plan.content))

    def step(self) -> None:
        plan = self.reasoning.plan(obs=self.generate_obs(), selected_tools=[])
        self.apply_plan(plan)
        self.plans.append(("step", plan.llm_plan.content))


class Town(mesa.Model):
    """``n`` agents of ``agent_class``, stepped with plain Mesa code."""

    def __init__(
        self,
        n: int,
        api_base: str,
        agent_class: type[LLMAgent] = Voter,
        *,
        parallel: bool = True,
        seed: int = 1,
    ) -> None:
        super().__init__(rng=seed)
        self.parallel_stepping = parallel
        for _ in range(n):
            agent_class(self, api_base)

    def step(self) -> None:
        self.agents.shuffle_do("step")


# -- tools that really run ------------------------------------------------------------
@tool
def cast_ballot(agent: LLMAgent, choice: str, weight: int) -> str:
    """Cast the agent's ballot in the model's election.

    Args:
        agent: The voting agent (given by mesa-llm, not by the language model).
        choice: What the agent votes for.
        weight: How strongly it holds that view.

    Returns:
        What was recorded.
    """
    agent.model.ballots.append((agent.unique_id, choice, weight, threading.current_thread().name))
    return f"agent {agent.unique_id} voted {choice!r}"


class Elector(LLMAgent):
    """Plans with mesa-llm's ReAct reasoning and acts through the ``cast_ballot`` tool.

    ``aplan``/``plan`` ask for the ReAct reasoning (a JSON answer to mesa-llm's
    ``ReActOutput`` schema), then for the tool calls that carry out its action;
    ``aapply_plan``/``apply_plan`` run those calls through the agent's tool manager.
    """

    def __init__(self, model: mesa.Model, api_base: str) -> None:
        super().__init__(
            model,
            reasoning=ReActReasoning,
            llm_model=LLM_MODEL,
            api_base=api_base,
            step_prompt="The election is today. Decide how to vote, then vote.",
        )
        self.memory.display = False

    async def astep(self) -> None:
        obs = await self.agenerate_obs()
        plan = await self.reasoning.aplan(obs=obs, selected_tools=["cast_ballot"])
        await self.aapply_plan(plan)

    def step(self) -> None:
        plan = self.reasoning.plan(obs=self.generate_obs(), selected_tools=["cast_ballot"])
        self.apply_plan(plan)


class Election(Town):
    """``n`` :class:`Elector` s; ``ballots`` holds what ``cast_ballot`` recorded."""

    def __init__(self, n: int, api_base: str, **kwargs) -> None:
        self.ballots: list[tuple[int, str, int, str]] = []
        super().__init__(n, api_base, Elector, **kwargs)
