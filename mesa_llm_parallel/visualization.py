"""Live parallel-stepping controls for Mesa's SolaraViz.

Core objects: :func:`ParallelSteppingControls` (a Solara component called with the live
model), :func:`ParallelSteppingSidebar` (the same card, placed in the sidebar) and
:data:`panel_choices` (what the panel's user chose, re-applied to every new model).

Add it to a dashboard as any other Mesa component::

    from mesa.visualization import SolaraViz
    from mesa_llm_parallel.visualization import ParallelSteppingControls

    page = SolaraViz(model, components=[ParallelSteppingControls])

The panel changes the model's ``parallel_stepping`` flag and the live
:data:`~mesa_llm_parallel.settings` (mode, thread-pool size, concurrency cap); a step
reads them once when it starts, so a change applies from the next step and never
disturbs a step in progress. Mesa's Reset button builds a new model instance: the panel
keeps its choices outside the model and applies them to each new model it is called
with.

Importing :mod:`mesa_llm_parallel` never imports this module, Solara or
``mesa.visualization``; importing this module needs them (``pip install
"mesa_llm_parallel[solara]"``).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Final

try:
    import solara
    from mesa.visualization.utils import update_counter
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "mesa_llm_parallel.visualization needs Solara and Mesa's visualization "
        f"({exc.name or exc}); install them with: "
        'pip install "mesa_llm_parallel[solara]"'
    ) from exc

from mesa_llm_parallel._display import (
    CHART_HEIGHT,
    COLOURS,
    StepTime,
    chart_svg,
    figures,
)
from mesa_llm_parallel._display import HISTORY_LENGTH as _HISTORY_LENGTH
from mesa_llm_parallel._report import (
    StepReport,
    add_step_callback,
    last_report_step,
    last_step_report,
    step_number,
)
from mesa_llm_parallel._settings import MODES, SettingsSnapshot, settings
from mesa_llm_parallel.parallel_stepping import (
    is_automatic_parallel_stepping_enabled,
    set_parallel_stepping,
    wants_parallel_stepping,
)

__all__ = [
    "PanelChoices",
    "ParallelSteppingControls",
    "ParallelSteppingSidebar",
    "apply_panel_choices",
    "panel_choices",
]

#: How many recent parallel steps the chart shows.
HISTORY_LENGTH: Final = _HISTORY_LENGTH

_FAILURE_COLOUR: Final = COLOURS["failed"]
#: The chart's width in the card, in CSS pixels: a Mesa card's content is about 320 px wide.
_CHART_WIDTH: Final = 310


@dataclasses.dataclass(frozen=True, slots=True)
class PanelChoices:
    """What the user chose in the panel; applied to every new model.

    Attributes:
        parallel_stepping: The flag set on each model, or None while the user has not
            touched the toggle (each model keeps its own value).
        settings: The settings chosen in the panel, by name (a subset of ``mode``,
            ``max_workers``, ``max_concurrency``); never mutated, replaced as a whole.
    """

    parallel_stepping: bool | None = None
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def with_setting(self, name: str, value: object) -> PanelChoices:
        """A copy with one more (or a changed) setting."""
        return dataclasses.replace(self, settings={**self.settings, name: value})


#: The panel's choices. A module-level Solara reactive variable holds one value per
#: Solara kernel context (each browser page of a server, each notebook kernel), and it
#: holds no model: a reset model does not take the choices with it.
panel_choices: solara.Reactive[PanelChoices] = solara.reactive(PanelChoices())


def apply_panel_choices(model: Any, choices: PanelChoices | None = None) -> None:
    """Apply the panel's choices to ``model`` and to the live settings.

    The settings go first (all or nothing), then the model's ``parallel_stepping``
    flag. Turning the flag on installs the ``shuffle_do`` patch if it is missing,
    keeping the current mode. The panel calls this once for each new model it is
    rendered with, which is how Mesa's Reset keeps the panel's choices.

    Args:
        model: The Mesa model to configure.
        choices: What to apply; the current value of :data:`panel_choices` by default.
    """
    if choices is None:
        choices = panel_choices.value
    if choices.settings:
        settings.update(**choices.settings)
    if choices.parallel_stepping is not None:
        set_parallel_stepping(model, choices.parallel_stepping)


# -- per-model panel state (never keeps a model alive) ---------------------------------


@dataclasses.dataclass(slots=True)
class _ModelState:
    history: collections.deque[StepTime] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=HISTORY_LENGTH)
    )
    choices_applied: bool = False


_states_lock = threading.Lock()
_states: weakref.WeakKeyDictionary[Any, _ModelState] = weakref.WeakKeyDictionary()
_callback_added = False


def _reset_after_fork() -> None:
    """In a forked child: the history stays, with a lock no parent thread can hold."""
    global _states_lock  # noqa: PLW0603
    _states_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def _record_step(model: Any, report: StepReport) -> None:
    """Step callback: remember the step for the chart, for models shown in a panel."""
    with _states_lock:
        try:
            state = _states.get(model)
        except TypeError:  # a model that cannot be a weak key
            return
    if state is not None:
        state.history.append(StepTime.of_report(report, step_number(model)))


def _state_of(model: Any) -> _ModelState:
    """The panel state of ``model``, created on first use; adds the step callback once."""
    global _callback_added  # noqa: PLW0603 - one process-wide callback, added lazily
    with _states_lock:
        if not _callback_added:
            add_step_callback(_record_step)
            _callback_added = True
        try:
            state = _states.get(model)
            if state is None:
                state = _states[model] = _ModelState()
        except TypeError:  # not weak-referenceable or unhashable: no history kept
            state = _ModelState()
    return state


# -- the components (Solara components are PascalCase, hence the N802 exemptions) --------


@solara.component
def ParallelSteppingControls(  # noqa: N802
    model: Any, *, sidebar: bool = False, title: str = "Parallel stepping"
) -> None:
    """Live controls and the step report of parallel stepping, for ``SolaraViz``.

    Use it as an entry of ``SolaraViz(..., components=[ParallelSteppingControls])``:
    SolaraViz calls it with the live model, and it re-renders after every step. The
    card shows:

    - a switch for the model's ``parallel_stepping`` flag (turning it on installs the
      ``shuffle_do`` patch if needed);
    - the mode (``asyncio`` / ``threading``), the thread-pool size (``max_workers``) and
      the concurrency cap (``max_concurrency``; 0 means no cap), which are the live,
      process-wide :data:`~mesa_llm_parallel.settings`;
    - the report of the last parallel step (wall time, speedup, failures, peak in
      flight) and a chart of the recent step times.

    Threads and loops:
        Every change applies from the next step. A step reads the flag and one settings
        snapshot when it starts, so changing anything while a step runs (Play runs steps
        on a worker thread; the Step button runs one inside the server's event loop)
        never disturbs that step.

    Reset:
        Mesa's Reset builds a new model. The panel's choices are kept in
        :data:`panel_choices`, outside the model, and applied to each new model the
        component is called with, after the model's own ``__init__`` ran.

    Note:
        With ipyvuetify 3 (Solara 1.64's default), SolaraViz's main area, where its
        ``components`` go, does not load in a browser; :func:`ParallelSteppingSidebar`
        is not affected. See the "Solara dashboards" page of the documentation.

    Args:
        model: The live Mesa model (SolaraViz passes it).
        sidebar: Put the card into the app's sidebar (``solara.Sidebar``) instead of
            in place.
        title: The card's title.
    """
    update_counter.get()  # subscribe: SolaraViz bumps it after every step
    choices = panel_choices.value  # subscribe: re-render on the panel's own changes
    _, set_revision = solara.use_state(0)  # re-render after a change made here
    error, set_error = solara.use_state(None)
    state = _state_of(model)
    if not state.choices_applied:
        state.choices_applied = True
        apply_panel_choices(model, choices)

    def changed() -> None:
        set_revision(lambda n: n + 1)

    def set_parallel(value: bool) -> None:
        new = dataclasses.replace(panel_choices.value, parallel_stepping=bool(value))
        apply_panel_choices(model, dataclasses.replace(new, settings={}))
        panel_choices.set(new)
        changed()

    def set_setting(name: str, value: object) -> None:
        try:
            settings.update(**{name: value})
        except (TypeError, ValueError) as exc:
            set_error(str(exc))
            return
        set_error(None)
        panel_choices.set(panel_choices.value.with_setting(name, value))
        changed()

    def set_cap(value: int | None) -> None:
        if value is not None and value < 0:
            set_error(f"the concurrency cap must be 0 (no cap) or a positive number, got {value}")
            return
        set_setting("max_concurrency", value or None)

    # Everything shown is read here and passed down as plain values, so the children
    # re-render exactly when something they show has changed.
    snap = settings.snapshot()
    steps = step_number(model)
    props: dict[str, Any] = {
        "title": title,
        "flag": wants_parallel_stepping(model),
        "patched": is_automatic_parallel_stepping_enabled(),
        "snap": snap,
        "error": error,
        "on_parallel": set_parallel,
        "on_mode": lambda mode: set_setting("mode", mode),
        "on_workers": lambda n: set_setting("max_workers", n),
        "on_cap": set_cap,
        "report": last_step_report(model),
        "steps": steps,
        "history": tuple(state.history),
        "report_step": last_report_step(model),
    }
    if sidebar:
        _SidebarCard(props=props)
    else:
        _Card(**props)


@solara.component
def _SidebarCard(props: dict[str, Any]) -> None:  # noqa: N802
    # One component level deeper than the caller: Solara orders sidebar content by
    # depth, so the card goes below SolaraViz's own cards (Controls, Model Parameters)
    # when both are rendered from the same level.
    with solara.Sidebar():
        _Card(**props, margin=2)  # as SolaraViz's own sidebar cards


@solara.component
def ParallelSteppingSidebar(model: Any) -> None:  # noqa: N802
    """:func:`ParallelSteppingControls` as a card in the app's sidebar.

    Use it as an entry of ``SolaraViz(..., components=[ParallelSteppingSidebar])``: the
    card goes below SolaraViz's own sidebar cards (Controls, Model Parameters,
    Information), with the Play, Step and Reset buttons. In a notebook the sidebar is
    the menu behind the app bar's menu button.

    Args:
        model: The live Mesa model (SolaraViz passes it).
    """
    ParallelSteppingControls(model, sidebar=True)


@solara.component
def _Card(  # noqa: N802
    *,
    title: str,
    flag: bool,
    patched: bool,
    snap: SettingsSnapshot,
    error: str | None,
    on_parallel: Callable[[bool], None],
    on_mode: Callable[[str], None],
    on_workers: Callable[[int], None],
    on_cap: Callable[[int | None], None],
    report: StepReport | None,
    steps: int | None,
    history: tuple[StepTime, ...],
    report_step: int | None = None,
    margin: int = 0,
) -> None:
    with solara.Card(title, margin=margin, classes=["mlp-parallel-controls"]):
        solara.Switch(
            label="Step agents in parallel",
            value=flag,
            on_value=on_parallel,
            classes=["mlp-parallel-switch"],
        )
        if flag and not patched:
            solara.Warning(
                "Mesa's shuffle_do is not patched, so the model steps sequentially: "
                "turn the switch off and on, or call enable_automatic_parallel_stepping().",
                dense=True,
            )
        with solara.Row(style={"align-items": "center"}, gap="8px"):
            solara.Text("Mode", style={"min-width": "3.5em"})
            solara.ToggleButtonsSingle(
                value=snap.mode,
                values=list(MODES),
                on_value=on_mode,
                dense=True,
                classes=["mlp-mode"],
            )
        solara.InputInt(
            "Thread-pool size (max_workers)",
            value=snap.max_workers,
            on_value=on_workers,
            dense=True,
            classes=["mlp-max-workers"],
        )
        solara.InputInt(
            "Concurrency cap, 0 = no cap (max_concurrency)",
            value=snap.max_concurrency or 0,
            on_value=on_cap,
            dense=True,
            classes=["mlp-max-concurrency"],
        )
        if error:
            solara.Error(error, dense=True, classes=["mlp-error"])
        solara.Text(
            "Changes apply from the next step; a step in progress keeps its settings.",
            style={"font-size": "0.8em", "opacity": "0.7"},
        )
        _ReportView(report=report, flag=flag, steps=steps, history=history, report_step=report_step)


@solara.component
def _ReportView(  # noqa: N802
    *,
    report: StepReport | None,
    flag: bool,
    steps: int | None,
    history: tuple[StepTime, ...],
    report_step: int | None = None,
) -> None:
    with solara.Column(gap="4px", classes=["mlp-step-report"], style={"margin-top": "12px"}):
        empty = "none yet: press Step or Play" if flag else "none: parallel stepping is off"
        shown = figures(report, history, steps=steps, report_step=report_step, empty_note=empty)
        grid = {"display": "grid", "grid-template-columns": "auto 1fr", "gap": "2px 12px"}
        with solara.Div(style=grid):
            for row in shown.last_step:
                solara.Text(row.label, style={"opacity": "0.7"})
                colour = {"color": _FAILURE_COLOUR} if row.alert else {}
                solara.Text(row.value, classes=[f"mlp-report-{row.key}"], style=colour)
        muted = {} if shown.current else {"opacity": "0.6"}
        solara.Text(
            shown.heading, style={"font-weight": "bold", **muted}, classes=["mlp-report-heading"]
        )
        if shown.note is not None:
            solara.Text(shown.note, classes=["mlp-report-empty"])
            return
        with solara.Div(style={**grid, **muted}):
            for row in shown.report:
                solara.Text(row.label, style={"opacity": "0.7"})
                colour = {"color": _FAILURE_COLOUR} if row.alert else {}
                solara.Text(row.value, classes=[f"mlp-report-{row.key}"], style=colour)
        if history and steps is not None and history[-1].step is not None:
            behind = steps - history[-1].step
            if behind > 0:
                solara.Text(
                    f"The last {behind} step{'s' if behind > 1 else ''} ran sequentially.",
                    classes=["mlp-report-sequential"],
                    style={"font-style": "italic"},
                )
        if history:
            count = len(history)
            solara.Text(
                "Wall time of the last parallel step"
                if count == 1
                else f"Wall time of the last {count} parallel steps",
                style={"font-size": "0.85em", "opacity": "0.7", "margin-top": "6px"},
            )
            solara.HTML(
                tag="div",
                unsafe_innerHTML=chart_svg(history, capacity=HISTORY_LENGTH, width=_CHART_WIDTH),
                classes=["mlp-chart"],
                style={"width": f"{_CHART_WIDTH}px", "height": f"{CHART_HEIGHT}px"},
            )
