"""The live panel, driven without a browser or kernel: set ``.value``, call ``.click()``.

Runs happen on the panel's background thread; every test waits for them with
``panel.wait(timeout=...)``. Concurrency is shown by structure (events that can only be
set while two runs are in flight at once), never by wall-clock timing.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import html
import re
import threading
import weakref

import mesa
import pytest
import traitlets
from models import AsyncAgent, SyncAgent, ToyModel
from support import run_python, steps_of

import mesa_llm_parallel as mlp
from mesa_llm_parallel import _patch, _report, _settings
from mesa_llm_parallel._display import format_seconds
from mesa_llm_parallel.widgets import CHART_LENGTH, THREAD_PRESETS, ParallelSteppingPanel

WAIT = 30  # seconds; only reached when something is broken

PARALLEL_DOT = "class='mlp-mark mlp-asyncio'"
SEQUENTIAL_DOT = "class='mlp-mark mlp-sequential'"


# -- models -----------------------------------------------------------------------------
class GatedAgent(SyncAgent):
    """Blocks inside the parallel step until the test opens the model's gate."""

    def step(self, *args, **kwargs) -> None:
        self.model.entered.set()
        if not self.model.gate.wait(WAIT):
            raise TimeoutError("the test never opened the gate")
        super().step(*args, **kwargs)


class GatedModel(ToyModel):
    """A ToyModel of GatedAgents: ``entered`` is set once a step is in flight."""

    def __init__(self, n: int = 4, **kwargs) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        super().__init__(n, GatedAgent, **kwargs)


class ExplodingAgent(AsyncAgent):
    async def astep(self, *args, **kwargs) -> None:
        raise ValueError("agent exploded")


class ExplodingSyncAgent(SyncAgent):
    def step(self, *args, **kwargs) -> None:
        raise KeyError("sequential agent exploded")


# -- fixtures and helpers -------------------------------------------------------------------
class PanelFactory:
    """Makes panels and closes them at teardown, opening every gate first."""

    def __init__(self) -> None:
        self.panels: list[ParallelSteppingPanel] = []
        self.models: list[object] = []

    def __call__(self, model) -> ParallelSteppingPanel:
        self.models.append(model)
        panel = ParallelSteppingPanel(model)
        self.panels.append(panel)
        return panel

    def close(self) -> None:
        for model in self.models:
            gate = getattr(model, "gate", None)
            if gate is not None:
                gate.set()
        for panel in self.panels:
            panel.close(timeout=WAIT)


@pytest.fixture
def make_panel():
    factory = PanelFactory()
    yield factory
    factory.close()
    factory.models.clear()


@pytest.fixture
def patched():
    mlp.enable_automatic_parallel_stepping()


def figures(panel: ParallelSteppingPanel) -> dict[str, str]:
    """The panel's figures as {label: shown value}."""
    value = panel.figures_html.value
    rows = re.findall(r"<tr[^>]*><td[^>]*>(.*?)</td><td[^>]*>(.*?)</td></tr>", value)
    shown = {html.unescape(label): html.unescape(value) for label, value in rows}
    headings = re.findall(r"<th[^>]*>(.*?)</th>", value)
    notes = re.findall(r"<tr class='mlp-row-note'><td[^>]*>(.*?)</td>", value)
    shown["heading"] = html.unescape(" ".join(headings))
    shown["note"] = html.unescape(" ".join(notes))
    return shown


def text_of(widget) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", widget.value))


def status(panel: ParallelSteppingPanel) -> str:
    return text_of(panel.status_html)


def notice(panel: ParallelSteppingPanel) -> str:
    return text_of(panel.notice_html)


def finish(panel: ParallelSteppingPanel) -> None:
    assert panel.wait(timeout=WAIT), "the run did not finish"
    assert not panel.running


def assert_idle_buttons(panel: ParallelSteppingPanel) -> None:
    assert not panel.run_button.disabled
    assert not panel.step_button.disabled
    assert panel.pause_button.disabled


# -- layout -------------------------------------------------------------------------------
def test_controls_have_plain_labels_and_visible_explanations(make_panel):
    panel = make_panel(ToyModel(2))
    assert panel.parallel_toggle.description == "Parallel stepping"
    assert panel.mode_selector.description == "Mode"
    assert tuple(panel.mode_selector.options) == mlp.MODES
    assert panel.threads_slider.description == "Threads"
    assert panel.cap_input.description == "Max in flight (0 = no cap)"
    assert [b.description for b in (panel.run_button, panel.pause_button, panel.step_button)] == [
        "Run",
        "Pause",
        "Step",
    ]
    # What the checkbox and the modes do is written on the panel, not in a tooltip
    # (ipywidgets 8 shows a checkbox's label as its hover text).
    shown = " ".join(text_of(child) for child in panel.children if hasattr(child, "value"))
    assert "model.parallel_stepping for this model only" in shown
    assert "the thread pool runs only sync agents" in shown
    assert "All models in this process" in shown
    assert panel.traceback_html.layout.display == "none"
    assert status(panel) == "Ready."
    assert "mlp-panel" in panel._dom_classes
    for name in ("parallel", "mode", "threads", "cap", "run", "pause", "figures", "chart"):
        found = [w for w in panel._widgets() if f"mlp-{name}" in w._dom_classes]
        assert len(found) == 1, name


def test_threads_slider_offers_doubling_presets_and_keeps_a_size_set_elsewhere(make_panel):
    panel = make_panel(ToyModel(2))
    assert tuple(panel.threads_slider.options) == THREAD_PRESETS
    assert THREAD_PRESETS == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    mlp.settings.max_workers = 12
    panel.refresh()
    assert panel.threads_slider.value == 12
    assert tuple(panel.threads_slider.options) == (1, 2, 4, 8, 12, 16, 32, 64, 128, 256)
    panel.threads_slider.value = 16
    assert mlp.settings.max_workers == 16
    assert tuple(panel.threads_slider.options) == THREAD_PRESETS  # 12 is no longer the setting


# -- the parallel stepping switch ----------------------------------------------------------
def test_toggle_switches_this_model_only_and_installs_the_patch(make_panel):
    model = ToyModel(5, parallel=None)
    other = ToyModel(5, parallel=None)
    panel = make_panel(model)
    assert panel.parallel_toggle.value is False  # parallel_by_default is False
    assert not mlp.is_automatic_parallel_stepping_enabled()

    panel.parallel_toggle.value = True
    assert model.parallel_stepping is True
    assert mlp.is_automatic_parallel_stepping_enabled()
    assert not hasattr(other, "parallel_stepping")
    assert "parallel" in panel._state_html.value
    model.step()
    assert mlp.last_step_report(model) is not None

    panel.parallel_toggle.value = False
    assert model.parallel_stepping is False
    assert mlp.is_automatic_parallel_stepping_enabled()  # other models may still use it
    assert "one agent at a time" in panel._state_html.value


def test_toggle_starts_from_the_model_flag_or_the_default(make_panel):
    mlp.settings.parallel_by_default = True
    assert make_panel(ToyModel(2, parallel=None)).parallel_toggle.value is True
    assert make_panel(ToyModel(2, parallel=False)).parallel_toggle.value is False
    mlp.settings.parallel_by_default = False
    assert make_panel(ToyModel(2, parallel=True)).parallel_toggle.value is True


def test_toggle_on_with_the_patch_missing_says_so(make_panel):
    panel = make_panel(ToyModel(2, parallel=True))
    assert panel.parallel_toggle.value is True
    assert "not patched" in panel._state_html.value
    panel.parallel_toggle.value = False
    panel.parallel_toggle.value = True
    assert mlp.is_automatic_parallel_stepping_enabled()
    assert "not patched" not in panel._state_html.value


def test_toggle_failure_is_shown_reverted_and_changes_nothing(make_panel, monkeypatch):
    # As if Mesa had no such class.
    monkeypatch.setattr(_patch, "patchable_classes", lambda name="shuffle_do": [])
    model = ToyModel(2, parallel=None)
    panel = make_panel(model)
    panel.parallel_toggle.value = True
    assert panel.parallel_toggle.value is False
    assert not hasattr(model, "parallel_stepping")
    assert not mlp.is_automatic_parallel_stepping_enabled()
    assert "RuntimeError" in notice(panel)
    assert "no agent-set class" in notice(panel)


# -- process-wide settings ---------------------------------------------------------------------
def test_mode_selector_sets_the_mode(make_panel):
    panel = make_panel(ToyModel(2))
    assert panel.mode_selector.value == "asyncio"
    panel.mode_selector.value = "threading"
    assert mlp.settings.mode == "threading"
    assert "every model" in notice(panel)
    panel.mode_selector.value = "asyncio"
    assert mlp.settings.mode == "asyncio"
    with pytest.raises(traitlets.TraitError):
        panel.mode_selector.value = "processes"
    assert mlp.settings.mode == "asyncio"


def test_threads_slider_sets_the_pool_size_used_by_the_next_step(make_panel, patched):
    model = ToyModel(6, SyncAgent)
    panel = make_panel(model)
    assert panel.threads_slider.value == mlp.settings.max_workers
    panel.threads_slider.value = 8
    assert mlp.settings.max_workers == 8
    panel.step_button.click()
    finish(panel)
    assert mlp.last_step_report(model).pool_size == 8
    with pytest.raises(traitlets.TraitError):
        panel.threads_slider.value = 1000  # not one of the slider's sizes
    assert mlp.settings.max_workers == 8


def test_cap_sets_max_concurrency_and_zero_removes_it(make_panel, patched):
    model = ToyModel(10, SyncAgent, delay=0.001)
    panel = make_panel(model)
    assert panel.cap_input.value == 0
    panel.cap_input.value = 3
    assert mlp.settings.max_concurrency == 3
    panel.step()
    finish(panel)
    report = mlp.last_step_report(model)
    assert report.max_concurrency == 3
    assert report.peak_in_flight <= 3
    assert model.tracker.peak <= 3

    panel.cap_input.value = 0
    assert mlp.settings.max_concurrency is None
    assert "no cap" in notice(panel)
    panel.step()
    finish(panel)
    assert mlp.last_step_report(model).max_concurrency is None


def test_a_negative_cap_is_refused_not_taken_for_no_cap(make_panel):
    panel = make_panel(ToyModel(2))
    panel.cap_input.value = 50
    assert mlp.settings.max_concurrency == 50
    panel.cap_input.value = -4  # a typo must not remove the cap
    assert mlp.settings.max_concurrency == 50
    assert panel.cap_input.value == 50  # put back
    assert notice(panel).startswith(
        "Max in flight not changed: it must be 0 (no cap) or a whole number >= 1, got -4"
    )
    assert "color:#c62828" in panel.notice_html.value
    panel.cap_input.value = 1_000_000  # no upper bound of the panel's own
    assert mlp.settings.max_concurrency == 1_000_000


def test_a_rejected_value_is_shown_and_reverted_and_nothing_else_changes(make_panel, monkeypatch):
    def refuse(value):
        raise ValueError(f"max_workers {value} refused by this test")

    monkeypatch.setitem(_settings._VALIDATORS, "max_workers", refuse)
    panel = make_panel(ToyModel(2))
    before = mlp.settings.snapshot()
    panel.threads_slider.value = 8
    assert panel.threads_slider.value == before.max_workers
    assert mlp.settings.snapshot() == before
    text = notice(panel)
    assert "Threads not changed" in text
    assert "ValueError" in text
    assert "max_workers 8 refused by this test" in text
    assert "color:#c62828" in panel.notice_html.value
    assert panel.mode_selector.value == before.mode
    assert panel.cap_input.value == 0


def test_controls_changed_during_a_run_apply_from_the_next_step(make_panel, patched):
    model = GatedModel(4)
    reports = []

    def collect(stepped, report):
        if stepped is model:
            reports.append(report)

    mlp.add_step_callback(collect)
    try:
        panel = make_panel(model)
        panel.run(2)
        assert model.entered.wait(WAIT)  # step 1 is in flight with the settings it read
        panel.cap_input.value = 2
        assert mlp.settings.max_concurrency == 2
        model.gate.set()
        finish(panel)
    finally:
        mlp.remove_step_callback(collect)
    assert [r.max_concurrency for r in reports] == [None, 2]


def test_settings_changed_elsewhere_show_after_the_next_step(make_panel, patched):
    model = ToyModel(3)
    panel = make_panel(model)
    mlp.settings.update(mode="threading", max_workers=5, max_concurrency=2)
    assert 5 not in panel.threads_slider.options
    model.parallel_stepping = False
    assert panel.mode_selector.value == "asyncio"  # not yet: nothing has happened
    panel.step()
    finish(panel)
    assert panel.mode_selector.value == "threading"
    assert panel.threads_slider.value == 5
    assert panel.cap_input.value == 2
    assert panel.parallel_toggle.value is False

    # A parallel step run elsewhere (a notebook cell) refreshes the panel too.
    model.parallel_stepping = True
    mlp.settings.max_workers = 300  # beyond the slider's sizes: the slider shows it
    model.step()
    assert panel.parallel_toggle.value is True
    assert panel.threads_slider.value == 300


def test_a_change_in_one_panel_shows_at_once_in_the_others(make_panel):
    first = make_panel(ToyModel(2))
    second = make_panel(ToyModel(2))
    first.threads_slider.value = 16
    first.mode_selector.value = "threading"
    assert second.threads_slider.value == 16
    assert second.mode_selector.value == "threading"
    assert "Threads" not in notice(second)  # the other panel only shows the value


# -- running ------------------------------------------------------------------------------
def test_steps_input_sets_how_many_steps_run_runs(make_panel, patched):
    model = ToyModel(3)
    panel = make_panel(model)
    panel.steps_input.value = 3
    panel.run_button.click()
    finish(panel)
    assert steps_of(model) == 3
    assert "Done: 3 steps" in status(panel)
    panel.steps_input.value = 0
    assert panel.steps_input.value == 1  # at least one step
    panel.run_button.click()
    finish(panel)
    assert steps_of(model) == 4


REQUEST = contextvars.ContextVar("request", default="none")


@pytest.mark.parametrize("mode", ["asyncio", "threading"])
def test_a_background_run_carries_the_context_of_the_code_that_started_it(make_panel, mode):
    mlp.enable_automatic_parallel_stepping(mode=mode)
    seen: list[str] = []

    class Reader(mesa.Agent):
        def step(self):
            seen.append(REQUEST.get())

    model = ToyModel(0)
    Reader.create_agents(model, 4)
    panel = make_panel(model)
    token = REQUEST.set("cell-7")
    try:
        panel.run(2)  # from this "cell": its context reaches the run's agents
    finally:
        REQUEST.reset(token)
    finish(panel)
    panel.step()  # started where the variable is unset
    finish(panel)
    assert seen == ["cell-7"] * 8 + ["none"] * 4


def test_step_button_runs_one_step(make_panel, patched):
    model = ToyModel(3)
    panel = make_panel(model)
    panel.step_button.click()
    finish(panel)
    panel.step_button.click()
    finish(panel)
    assert steps_of(model) == 2
    assert "Done: 1 step." in status(panel)
    assert_idle_buttons(panel)


def test_run_and_pause_buttons_stop_after_the_current_step(make_panel, patched):
    model = GatedModel(4)
    panel = make_panel(model)
    assert_idle_buttons(panel)
    panel.steps_input.value = 100
    panel.run_button.click()
    assert model.entered.wait(WAIT)
    assert panel.running
    assert panel.run_button.disabled
    assert panel.step_button.disabled
    assert not panel.pause_button.disabled
    assert not panel.wait(timeout=0)

    panel.run_button.click()  # one run at a time: a click says so and does nothing
    assert "already running" in status(panel)
    with pytest.raises(RuntimeError, match="already running"):
        panel.run(5)
    with pytest.raises(RuntimeError, match="already running"):
        panel.step()

    panel.pause_button.click()
    model.gate.set()
    finish(panel)
    assert steps_of(model) == 1
    assert "Paused after 1 of 100 steps" in status(panel)
    assert_idle_buttons(panel)

    panel.run(2)  # the same runner takes the next run
    finish(panel)
    assert steps_of(model) == 3


def test_run_checks_its_argument(make_panel):
    panel = make_panel(ToyModel(1))
    with pytest.raises(ValueError, match=">= 1"):
        panel.run(0)
    with pytest.raises(TypeError, match="must be an int"):
        panel.run(True)
    with pytest.raises(TypeError, match="must be an int"):
        panel.run(2.0)
    assert not panel.running
    assert panel.wait(timeout=0)
    panel.pause()  # idle: nothing to do
    assert not panel.running


def test_the_runner_thread_is_one_and_the_same_across_runs(make_panel, patched):
    model = ToyModel(3)
    panel = make_panel(model)
    panel.run(1)
    finish(panel)
    first = panel._thread
    panel.run(1)
    finish(panel)
    assert panel._thread is first
    assert first.daemon
    assert first.is_alive()  # idle, waiting for the next run (its event loop persists)


# -- figures and chart ------------------------------------------------------------------
def test_figures_show_the_last_step_report(make_panel, patched):
    model = ToyModel(8, SyncAgent, delay=0.001)
    panel = make_panel(model)
    shown = figures(panel)
    assert shown["heading"] == "Last parallel step"
    assert shown["note"] == "none yet"
    panel.run(2)
    finish(panel)
    report = mlp.last_step_report(model)
    shown = figures(panel)
    assert shown["heading"] == "Last parallel step"
    assert shown["Wall time"] == f"{format_seconds(report.wall_time)} (step 2)"
    assert shown["Last step"] == f"step 2: {format_seconds(report.wall_time)}, asyncio"
    assert shown["Speedup"] == f"{report.speedup:.1f}x (agent time / wall time)"
    assert shown["Agents"] == f"8/8 done, peak {report.peak_in_flight} in flight"
    assert shown["Failures"] == "none"
    assert shown["Mode"] == "asyncio, no cap"
    # What the pool was used for: these sync agents (not inline yet) ran in it.
    assert shown["Thread pool"] == f"{report.pool_size} threads: 8 sync agents"
    assert shown["Model steps so far"] == "2"


def test_the_pool_is_said_unused_when_every_agent_awaited_on_the_loop(make_panel, patched):
    model = ToyModel(4, AsyncAgent)
    panel = make_panel(model)
    panel.step()
    finish(panel)
    pool = mlp.last_step_report(model).pool_size
    unused = f"{pool} threads, not used (astep ran on the event loop)"
    assert figures(panel)["Thread pool"] == unused
    mlp.settings.mode = "threading"
    panel.step()
    finish(panel)
    # In threading mode, agents with only an astep run on the model's loop, not the pool.
    on_loop = f"{pool} threads, not used (4 async agents on the model's loop)"
    assert figures(panel)["Thread pool"] == on_loop
    sync_model = ToyModel(3, SyncAgent)
    sync_panel = make_panel(sync_model)
    sync_panel.step()
    finish(sync_panel)
    assert figures(sync_panel)["Thread pool"] == f"{pool} threads: every agent's step"


def test_an_older_parallel_step_is_headed_as_such_after_sequential_steps(make_panel, patched):
    model = ToyModel(3)
    panel = make_panel(model)
    panel.run(2)
    finish(panel)
    assert figures(panel)["heading"] == "Last parallel step"
    assert (
        "color:#9e9e9e" not in panel.figures_html.value.split("mlp-row-time")[1].split("</tr>")[0]
    )
    panel.parallel_toggle.value = False
    panel.run(3)
    finish(panel)
    shown = figures(panel)
    assert shown["heading"] == "Earlier parallel step (step 2, 3 steps ago)"
    assert shown["Last step"].startswith("step 5: ")
    assert shown["Last step"].endswith(", sequential")
    # The old figures are greyed.
    assert "color:#9e9e9e" in panel.figures_html.value.split("mlp-row-time")[1].split("</tr>")[0]


def test_timeouts_are_counted(make_panel, patched):
    class Slow(AsyncAgent):
        async def astep(self, *args, **kwargs):
            await asyncio.Event().wait()  # never set: only the timeout ends it

    mlp.settings.update(timeout=0.01, on_error="collect")
    model = ToyModel(3, Slow)
    panel = make_panel(model)
    panel.step()
    finish(panel)
    assert panel.last_error is None  # collected, not raised
    report = mlp.last_step_report(model)
    assert len(report.timed_out) == 3
    assert figures(panel)["Failures"].startswith("3, 3 timed out; first: TimeoutError")


def test_sparkline_grows_marks_sequential_steps_and_keeps_the_last_50(make_panel, patched):
    model = ToyModel(3)
    panel = make_panel(model)
    assert "no steps yet" in panel.chart_html.value
    assert "<circle" not in panel.chart_html.value
    panel.run(3)
    finish(panel)
    chart = panel.chart_html.value
    assert chart.count("mlp-mark") == 3
    assert chart.count(PARALLEL_DOT) == 3
    assert [t.parallel for t in panel.step_times] == [True] * 3
    assert [t.seconds for t in panel.step_times][-1] == mlp.last_step_report(model).wall_time

    panel.parallel_toggle.value = False
    panel.run(2)
    finish(panel)
    chart = panel.chart_html.value
    assert chart.count("mlp-mark") == 5
    assert chart.count(SEQUENTIAL_DOT) == 2
    assert ">sequential</text>" in chart  # in the legend
    assert [t.parallel for t in panel.step_times] == [True] * 3 + [False] * 2
    assert figures(panel)["Last step"].endswith("sequential")
    assert figures(panel)["Model steps so far"] == "5"

    panel.run(CHART_LENGTH)
    finish(panel)
    assert len(panel.step_times) == CHART_LENGTH
    assert panel.chart_html.value.count("mlp-mark") == CHART_LENGTH


def test_parallel_steps_of_other_models_are_ignored(make_panel, patched):
    model, other = ToyModel(3), ToyModel(3)
    panel = make_panel(model)
    other.step()
    other.step()
    assert panel.step_times == ()
    model.step()  # stepped outside the panel: still this panel's model
    assert len(panel.step_times) == 1


# -- errors ---------------------------------------------------------------------------------
def test_a_failing_parallel_step_stops_the_run_and_is_shown(make_panel, patched):
    model = ToyModel(4, ExplodingAgent)
    panel = make_panel(model)
    panel.steps_input.value = 5
    panel.run_button.click()
    finish(panel)
    assert steps_of(model) == 1
    assert isinstance(panel.last_error, ValueError)
    text = status(panel)
    assert "error in step 1 of 5" in text
    assert "ValueError: agent exploded" in text
    assert panel.traceback_html.layout.display is None
    assert "Traceback" in panel.traceback_html.value
    assert "agent exploded" in panel.traceback_html.value
    failed = len(mlp.last_step_report(model).failures)
    assert figures(panel)["Failures"].startswith(f"{failed}; first: ValueError: agent exploded")
    assert_idle_buttons(panel)

    model.agents.do("remove")  # fixed: the next run starts clean
    panel.run(1)
    finish(panel)
    assert panel.last_error is None
    assert panel.traceback_html.layout.display == "none"
    assert "Done" in status(panel)


def test_a_failing_sequential_step_is_shown_too(make_panel):
    model = ToyModel(2, ExplodingSyncAgent, parallel=False)
    panel = make_panel(model)
    panel.step_button.click()
    finish(panel)
    assert isinstance(panel.last_error, KeyError)
    assert "KeyError" in status(panel)
    assert "sequential agent exploded" in html.unescape(panel.traceback_html.value)


# -- several panels ----------------------------------------------------------------------
def test_two_panels_run_two_models_at_once(make_panel, patched):
    small, large = GatedModel(3), GatedModel(5)
    first, second = make_panel(small), make_panel(large)
    first.run(2)
    second.run(3)
    # Both steps are in flight at once: each is blocked until its own gate opens.
    assert small.entered.wait(WAIT)
    assert large.entered.wait(WAIT)
    assert first.running
    assert second.running
    small.gate.set()
    finish(first)
    assert second.running  # still blocked on its own gate
    large.gate.set()
    finish(second)
    assert (steps_of(small), steps_of(large)) == (2, 3)
    assert len(first.step_times) == 2
    assert len(second.step_times) == 3
    assert figures(first)["Agents"].startswith("3/3 done")
    assert figures(second)["Agents"].startswith("5/5 done")


# -- closing ------------------------------------------------------------------------------
def test_close_releases_the_model(patched):
    model = ToyModel(4, ExplodingAgent)
    panel = ParallelSteppingPanel(model)
    callback = panel._callback
    panel.run(1)
    finish(panel)
    assert panel.last_error is not None  # its traceback refers to the model
    thread = panel._thread
    panel.close()
    assert callback not in _report._callbacks
    assert not thread.is_alive()
    assert panel.model is None
    assert panel.last_error is None
    assert all(child.comm is None for child in panel.children)
    assert panel.comm is None

    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    panel.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        panel.run(1)


def test_close_during_a_run_stops_after_the_current_step(patched):
    model = GatedModel(3)
    panel = ParallelSteppingPanel(model)
    panel.run(50)
    assert model.entered.wait(WAIT)
    thread = panel._thread
    model.gate.set()
    panel.close(timeout=WAIT)
    assert not thread.is_alive()
    assert steps_of(model) < 50

    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_an_unclosed_panel_keeps_no_model_in_module_state(patched):
    model = ToyModel(2)
    panel = ParallelSteppingPanel(model)
    try:
        model.step()
        callback = panel._callback
        assert callback in _report._callbacks
        cells = [c.cell_contents for c in callback.__closure__]
        assert all(isinstance(c, weakref.ref) for c in cells)
    finally:
        panel.close()


# -- imports -------------------------------------------------------------------------------
def test_importing_the_package_does_not_import_ipywidgets():
    code = (
        "import sys, mesa_llm_parallel, mesa_llm_parallel.parallel_stepping; "
        "print('ipywidgets' in sys.modules)"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_importing_the_panel_without_ipywidgets_says_what_to_install():
    code = (
        "import sys\n"
        "sys.modules['ipywidgets'] = None\n"
        "try:\n"
        "    import mesa_llm_parallel.widgets\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert 'pip install "mesa_llm_parallel[jupyter]"' in result.stdout
