"""Dashboard: language-model agents on a grid, with live parallel-stepping controls.

Run it from the repository root::

    .venv/bin/solara run examples/llm_dashboard/app.py

or display ``page`` in a notebook cell (see ``notebooks/dashboard.ipynb``). No network
or model server is needed: the agents call a simulated language model whose latency is
drawn from the model's random generator.

Layout: Mesa's ``SolaraViz`` provides the sidebar (Play, Step, Reset, the model
parameters); the main area shows the parallel-stepping card, the grid of agents and the
step-time chart. The model lives in a ``solara.reactive`` that SolaraViz
updates on Reset, so every part of the page follows the new model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import solara
from mesa.visualization import SolaraViz, SpaceRenderer, make_plot_component
from mesa.visualization.components import AgentPortrayalStyle
from mesa.visualization.solara_viz import SpaceRendererComponent

# `solara run` puts this folder on sys.path; a notebook importing this file by path
# needs it too, to find model.py next to it.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from model import NeighbourhoodModel  # noqa: E402

from mesa_llm_parallel.visualization import ParallelSteppingControls  # noqa: E402

__all__ = ["Dashboard", "model", "model_params", "page"]


def agent_portrayal(agent):
    """Colour each agent by its opinion (0 blue, 1 orange)."""
    return AgentPortrayalStyle(
        color=agent.opinion,
        size=140,
        marker="s",
        tooltip={"agent": agent.unique_id, "opinion": round(agent.opinion, 2)},
    )


def make_renderer(model):
    """Mesa's space renderer for one model instance (Altair: drawn in the browser)."""
    renderer = SpaceRenderer(model, backend="altair").setup_agents(
        agent_portrayal, cmap="blueorange", vmin=0.0, vmax=1.0
    )
    renderer.render()
    # A compact square chart without Mesa's default legends (the colour is the opinion).
    renderer.post_process = lambda chart: chart.properties(width=340, height=340).configure_legend(
        disable=True
    )
    return renderer


model_params = {
    "width": {
        "type": "SliderInt",
        "value": 10,
        "label": "Grid side (agents = side²)",
        "min": 3,
        "max": 20,
        "step": 1,
    },
    "latency_ms": {
        "type": "SliderInt",
        "value": 30,
        "label": "Mean LLM latency (ms)",
        "min": 5,
        "max": 200,
        "step": 5,
    },
    "error_rate": {
        "type": "SliderFloat",
        "value": 0.0,
        "label": "LLM error rate",
        "min": 0.0,
        "max": 0.2,
        "step": 0.01,
    },
    "rng": 42,
}

#: The live model. SolaraViz's Reset replaces its value with a new model instance.
model = solara.reactive(NeighbourhoodModel())

StepTimePlot, _ = make_plot_component(
    "Step time (ms)",
    backend="altair",
    post_process=lambda chart: chart.properties(width=340, height=200).configure_legend(
        disable=True
    ),
)


@solara.component
def Dashboard():  # noqa: N802
    """The whole page: SolaraViz's sidebar and our own main area."""
    current = model.value
    renderer = solara.use_memo(lambda: make_renderer(current), [current])
    # Components are placed here rather than passed to SolaraViz(components=...):
    # SolaraViz lays those out with Solara's GridDraggable, whose front end does not
    # load with ipyvuetify 3 (Vue 3) in Solara 1.64, leaving the main area empty.
    SolaraViz(model, model_params=model_params, name="LLM agents: parallel stepping")
    with solara.Row(style={"flex-wrap": "wrap", "align-items": "flex-start"}):
        with solara.Column(style={"width": "360px"}):
            ParallelSteppingControls(current)
        with solara.Column():
            with solara.Card("Agents (colour = opinion)", margin=0):
                SpaceRendererComponent(current, renderer)
            with solara.Card("Time per step (ms), parallel or not", margin=0):
                StepTimePlot(current)


page = Dashboard()
page  # noqa: B018
