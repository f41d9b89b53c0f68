"""Helpers shared by the test modules (not a test module itself)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) in a fresh interpreter of this venv; never raises on failure."""
    return subprocess.run(  # noqa: S603 - this interpreter, fixed code
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def create_agents(agent_class, model, n: int) -> list:
    """``n`` agents of ``agent_class`` in ``model`` (``Agent.create_agents`` is Mesa >= 3.1)."""
    return [agent_class(model) for _ in range(n)]


def steps_of(model) -> int:
    """How many steps ``model`` has taken: ``model.steps``, or ``model.time`` on Mesa 4."""
    steps = getattr(model, "steps", None)
    return int(model.time) if steps is None else steps


def agent_set_classes() -> tuple[type, type]:
    """(the class of ``select()`` sets, the class of ``model.agents``) on this Mesa.

    Found from what a model uses, as their modules differ between releases; the two are
    the same class (``AgentSet``) before Mesa 3.5.
    """
    import mesa

    model = mesa.Model()
    return type(model.agents.select()), type(model.agents)
