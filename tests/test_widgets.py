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
from mesa_llm_parallel.widgets import CHART_LENGTH, ParallelSteppingPanel, _format_seconds

WAIT = 30  # seconds; only reached when something is broken

PARALLEL_DOT = "fill='#1f77b4'"
SEQUENTIAL_DOT = "fill='#ff7f0e'"


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
    rows = re.findall(r"<tr><td[^>]*>(.*?)</td><td[^>]*>(.*?)</td></tr>", panel.figures_html.value)
    return {html.unescape(label): html.unescape(value) for label, value in rows}


def status(panel: ParallelSteppingPanel) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", panel.status_html.value))


def finish(panel: ParallelSteppingPanel) -> None:
    assert panel.wait(timeout=WAIT), "the run did not finish"
    assert not panel.running


def assert_idle_buttons(panel: ParallelSteppingPanel) -> None:
    assert not panel.run_button.disabled
    assert not panel.step_button.disabled
    assert panel.pause_button.disabled


# -- layout -------------------------------------------------------------------------------
def test_controls_have_plain_labels_and_say_which_are_process_wide(make_panel):
    panel = make_panel(ToyModel(2))
    assert panel.parallel_toggle.description == "Parallel stepping"
    assert "This model only" in panel.parallel_toggle.tooltip
    assert panel.mode_selector.description == "Mode"
    assert tuple(panel.mode_selector.options) == mlp.MODES
    assert panel.threads_slider.description == "Threads"
    assert (panel.threads_slider.min, panel.threads_slider.max) == (1, 256)
    assert panel.cap_input.description == "Max in flight (0 = no cap)"
    assert (panel.cap_input.min, panel.cap_input.max) == (0, 100_000)
    for tip in (
        panel.threads_slider.tooltip,
        panel.cap_input.tooltip,
        *panel.mode_selector.tooltips,
    ):
        assert "Process-wide" in tip
    assert [b.description for b in (panel.run_button, panel.pause_button, panel.step_button)] == [
        "Run",
        "Pause",
        "Step",
    ]
    assert panel.traceback_html.layout.display == "none"
    assert status(panel) == "Ready."


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
    assert "RuntimeError" in status(panel)
    assert "no agent-set class" in status(panel)


# -- process-wide settings ---------------------------------------------------------------------
def test_mode_selector_sets_the_mode(make_panel):
    panel = make_panel(ToyModel(2))
    assert panel.mode_selector.value == "asyncio"
    panel.mode_selector.value = "threading"
    assert mlp.settings.mode == "threading"
    assert "every model" in status(panel)
    panel.mode_selector.value = "asyncio"
    assert mlp.settings.mode == "asyncio"
    with pytest.raises(traitlets.TraitError):
        panel.mode_selector.value = "processes"
    assert mlp.settings.mode == "asyncio"


def test_threads_slider_sets_the_pool_size_used_by_the_next_step(make_panel, patched):
    model = ToyModel(6, SyncAgent)
    panel = make_panel(model)
    assert panel.threads_slider.value == mlp.settings.max_workers
    panel.threads_slider.value = 7
    assert mlp.settings.max_workers == 7
    panel.step_button.click()
    finish(panel)
    assert mlp.last_step_report(model).pool_size == 7
    panel.threads_slider.value = 1000  # clamped by the slider
    assert mlp.settings.max_workers == 256


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
    assert "no cap" in status(panel)
    panel.step()
    finish(panel)
    assert mlp.last_step_report(model).max_concurrency is None


def test_a_rejected_value_is_shown_and_reverted_and_nothing_else_changes(make_panel, monkeypatch):
    def refuse(value):
        raise ValueError(f"max_workers {value} refused by this test")

    monkeypatch.setitem(_settings._VALIDATORS, "max_workers", refuse)
    panel = make_panel(ToyModel(2))
    before = mlp.settings.snapshot()
    panel.threads_slider.value = 9
    assert panel.threads_slider.value == before.max_workers
    assert mlp.settings.snapshot() == before
    text = status(panel)
    assert "Threads not changed" in text
    assert "ValueError" in text
    assert "max_workers 9 refused by this test" in text
    assert "color:#c62828" in panel.status_html.value
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
    mlp.settings.max_workers = 300  # beyond the slider's range: the range widens
    model.step()
    assert panel.parallel_toggle.value is True
    assert panel.threads_slider.value == 300


def test_a_change_in_one_panel_shows_at_once_in_the_others(make_panel):
    first = make_panel(ToyModel(2))
    second = make_panel(ToyModel(2))
    first.threads_slider.value = 12
    first.mode_selector.value = "threading"
    assert second.threads_slider.value == 12
    assert second.mode_selector.value == "threading"
    assert "Threads" not in status(second)  # the other panel only shows the value


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
    assert figures(panel)["Last parallel step"] == "none yet"
    panel.run(2)
    finish(panel)
    report = mlp.last_step_report(model)
    shown = figures(panel)
    assert shown["Last parallel step"] == _format_seconds(report.wall_time)
    assert shown["Last step"] == f"{_format_seconds(report.wall_time)} (parallel)"
    assert shown["Speedup"] == f"{report.speedup:.1f}x"
    assert shown["Peak agents in flight"] == str(report.peak_in_flight)
    assert shown["Completed"] == f"{report.completed} of {report.agents}" == "8 of 8"
    assert shown["Failed"] == "0"
    assert shown["Timed out"] == "0"
    assert shown["Ran with"] == f"asyncio, {report.pool_size} threads"
    assert shown["Model steps so far"] == "2"


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
    assert figures(panel)["Timed out"] == "3"
    assert figures(panel)["Failed"] == "3"


def test_sparkline_grows_marks_sequential_steps_and_keeps_the_last_50(make_panel, patched):
    model = ToyModel(3)
    panel = make_panel(model)
    assert "<svg" not in panel.chart_html.value
    panel.run(3)
    finish(panel)
    chart = panel.chart_html.value
    assert chart.count("<circle") == 3
    assert chart.count(PARALLEL_DOT) == 3
    assert [t.parallel for t in panel.step_times] == [True] * 3
    assert [t.seconds for t in panel.step_times][-1] == mlp.last_step_report(model).wall_time

    panel.parallel_toggle.value = False
    panel.run(2)
    finish(panel)
    chart = panel.chart_html.value
    assert chart.count("<circle") == 5
    assert chart.count(SEQUENTIAL_DOT) == 2
    assert [t.parallel for t in panel.step_times] == [True] * 3 + [False] * 2
    assert figures(panel)["Last step"].endswith("(sequential)")
    assert figures(panel)["Model steps so far"] == "5"

    panel.run(CHART_LENGTH)
    finish(panel)
    assert len(panel.step_times) == CHART_LENGTH
    assert panel.chart_html.value.count("<circle") == CHART_LENGTH


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
    assert figures(panel)["Failed"] == str(len(mlp.last_step_report(model).failures))
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
    assert figures(first)["Completed"] == "3 of 3"
    assert figures(second)["Completed"] == "5 of 5"


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
