"""The Solara panel without a browser: every control, Reset, changes during a step, laziness.

Components render with ``solara.render`` (widgets in this process, no front end); the
tests set the widgets' ``v_model`` as the browser would.
"""

from __future__ import annotations

import asyncio
import threading

import mesa
import pytest

solara = pytest.importorskip("solara")
ipyvuetify = pytest.importorskip("ipyvuetify")

from mesa.visualization import SolaraViz  # noqa: E402
from mesa.visualization.solara_viz import ModelController  # noqa: E402
from mesa.visualization.utils import update_counter  # noqa: E402
from support import run_python  # noqa: E402

import mesa_llm_parallel as mlp  # noqa: E402
from mesa_llm_parallel import visualization as viz  # noqa: E402

v = ipyvuetify
WORKERS_LABEL = "Thread-pool size (max_workers)"
CAP_LABEL = "Concurrency cap, 0 = no cap (max_concurrency)"


class Quick(mesa.Agent):
    """Both step kinds, returning at once."""

    async def astep(self) -> None:
        await asyncio.sleep(0)

    def step(self) -> None:
        pass


class Failing(Quick):
    async def astep(self) -> None:
        raise ValueError("model server said no")

    def step(self) -> None:
        raise ValueError("model server said no")


class Gate(mesa.Agent):
    """A sync agent that blocks its step until the test opens the gate."""

    def __init__(self, model: mesa.Model, started: threading.Event, release: threading.Event):
        super().__init__(model)
        self.started = started
        self.release = release

    def step(self) -> None:
        self.started.set()
        assert self.release.wait(10), "the test never released the gate"


class Model(mesa.Model):
    """What a user writes: opts in and installs the patch in ``__init__``."""

    def __init__(self, n: int = 4, failing: int = 0, rng: int | None = None) -> None:
        super().__init__(rng=rng)
        self.parallel_stepping = True
        mlp.enable_automatic_parallel_stepping(mode="asyncio")
        Quick.create_agents(self, n)
        Failing.create_agents(self, failing)

    def step(self) -> None:
        self.agents.shuffle_do("step")


class Plain(mesa.Model):
    """A model that does not mention parallel stepping at all."""

    def __init__(self, n: int = 3) -> None:
        super().__init__()
        Quick.create_agents(self, n)

    def step(self) -> None:
        self.agents.shuffle_do("step")


@pytest.fixture(autouse=True)
def fresh_panel():
    """The panel's choices are module state (one value per Solara kernel context)."""
    viz.panel_choices.set(viz.PanelChoices())
    yield
    viz.panel_choices.set(viz.PanelChoices())


def render(element):
    _box, rc = solara.render(element, handle_error=False)
    return rc


def switch(rc):
    return rc.find(v.Switch, label="Step agents in parallel").widget


def enter(rc, label: str, text: str) -> None:
    """Type into a number field and press Enter (the field commits on Enter or blur)."""
    field = rc.find(v.TextField, label=label).widget
    field.v_model = text
    field.fire_event("keyup.enter", None)


def text_of(rc, css_class: str) -> str:
    (widget,) = rc.find(v.Html, class_=css_class).widgets
    return "".join(str(child) for child in widget.children)


def redraw() -> None:
    """What SolaraViz does after every step (``force_update``)."""
    update_counter.set(update_counter.value + 1)


# -- the controls ------------------------------------------------------------------------


def test_switch_sets_the_flag_installs_the_patch_and_is_remembered():
    model = Plain()
    rc = render(viz.ParallelSteppingControls(model))
    assert len(rc.find(v.Switch).widgets) == 1  # one card, rendered once
    assert switch(rc).v_model is False  # no attribute, parallel_by_default is False
    assert not mlp.is_automatic_parallel_stepping_enabled()

    switch(rc).v_model = True
    assert model.parallel_stepping is True
    assert mlp.is_automatic_parallel_stepping_enabled()
    assert viz.panel_choices.value.parallel_stepping is True
    model.step()
    assert mlp.last_step_report(model) is not None  # it really stepped in parallel

    switch(rc).v_model = False
    assert model.parallel_stepping is False
    assert viz.panel_choices.value.parallel_stepping is False
    before = mlp.last_step_report(model)
    model.step()
    assert mlp.last_step_report(model) is before  # sequential: no new report


def test_switch_turned_on_keeps_the_current_mode():
    mlp.settings.mode = "threading"
    model = Plain()
    rc = render(viz.ParallelSteppingControls(model))
    switch(rc).v_model = True
    assert mlp.settings.mode == "threading"
    model.step()
    assert mlp.last_step_report(model).mode == "threading"


def test_mode_buttons_set_the_live_mode():
    model = Model()
    rc = render(viz.ParallelSteppingControls(model))
    toggle = rc.find(v.BtnToggle).widget
    assert toggle.v_model == "asyncio"
    toggle.v_model = "threading"
    assert mlp.settings.mode == "threading"
    assert viz.panel_choices.value.settings == {"mode": "threading"}
    model.step()
    assert mlp.last_step_report(model).mode == "threading"
    toggle.v_model = "asyncio"
    model.step()
    assert mlp.last_step_report(model).mode == "asyncio"


def test_pool_size_field_resizes_the_pool_and_rejects_bad_values():
    model = Model()
    rc = render(viz.ParallelSteppingControls(model))
    assert rc.find(v.TextField, label=WORKERS_LABEL).widget.v_model == str(mlp.DEFAULT_MAX_WORKERS)
    enter(rc, WORKERS_LABEL, "3")
    assert mlp.settings.max_workers == 3
    mlp.settings.mode = "threading"
    model.step()
    assert mlp.last_step_report(model).pool_size == 3

    enter(rc, WORKERS_LABEL, "0")
    assert mlp.settings.max_workers == 3  # refused, kept
    (alert,) = rc.find(v.Alert).widgets
    assert "max_workers" in str(alert.children)
    assert viz.panel_choices.value.settings == {"max_workers": 3}

    enter(rc, WORKERS_LABEL, "5")  # a good value clears the error
    assert mlp.settings.max_workers == 5
    assert not rc.find(v.Alert).widgets


def test_concurrency_cap_field_zero_means_no_cap():
    model = Model(n=6)
    rc = render(viz.ParallelSteppingControls(model))
    assert rc.find(v.TextField, label=CAP_LABEL).widget.v_model == "0"
    enter(rc, CAP_LABEL, "2")
    assert mlp.settings.max_concurrency == 2
    model.step()
    assert mlp.last_step_report(model).peak_in_flight <= 2
    assert mlp.last_step_report(model).max_concurrency == 2

    enter(rc, CAP_LABEL, "0")
    assert mlp.settings.max_concurrency is None
    assert viz.panel_choices.value.settings == {"max_concurrency": None}

    enter(rc, CAP_LABEL, "-1")
    assert mlp.settings.max_concurrency is None
    assert "0 (no cap) or a positive number" in str(rc.find(v.Alert).widget.children)


def test_fields_show_settings_changed_elsewhere_after_a_redraw():
    model = Model()
    rc = render(viz.ParallelSteppingControls(model))
    mlp.settings.update(mode="threading", max_workers=7, max_concurrency=9)
    redraw()
    assert rc.find(v.BtnToggle).widget.v_model == "threading"
    assert rc.find(v.TextField, label=WORKERS_LABEL).widget.v_model == "7"
    assert rc.find(v.TextField, label=CAP_LABEL).widget.v_model == "9"


# -- the step report ---------------------------------------------------------------------


def test_report_rerenders_when_the_update_counter_changes():
    model = Model(n=5)
    rc = render(viz.ParallelSteppingControls(model))
    assert text_of(rc, "mlp-report-empty") == "none yet: press Step or Play"

    model.step()
    assert rc.find(v.Html, class_="mlp-report-empty").widgets  # not re-rendered yet
    redraw()
    assert not rc.find(v.Html, class_="mlp-report-empty").widgets
    assert text_of(rc, "mlp-report-time").endswith("ms (step 1)")
    assert text_of(rc, "mlp-report-agents") == "5/5 done, peak 5 in flight"
    assert text_of(rc, "mlp-report-config") == "asyncio, no cap"
    assert text_of(rc, "mlp-report-pool") == "64 threads, not used (astep ran on the event loop)"
    assert text_of(rc, "mlp-report-failures") == "none"
    assert text_of(rc, "mlp-report-heading") == "Last parallel step"
    assert text_of(rc, "mlp-report-speedup").endswith("x (agent time / wall time)")

    for _ in range(3):
        model.step()
    redraw()
    assert text_of(rc, "mlp-report-time").endswith("(step 4)")
    (chart,) = rc.find(solara.widgets.HTML).widgets
    svg = chart.unsafe_innerHTML
    assert svg.count("<title>step ") == 4  # one dot per parallel step
    assert "<title>step 4: " in svg


def test_report_shows_failures_and_sequential_steps():
    mlp.settings.on_error = "collect"
    model = Model(n=3, failing=1)
    rc = render(viz.ParallelSteppingControls(model))
    model.step()
    redraw()
    failures = text_of(rc, "mlp-report-failures")
    assert failures == "1; first: ValueError: model server said no"
    assert text_of(rc, "mlp-report-agents").startswith("3/4 done")
    assert "#c62828" in rc.find(solara.widgets.HTML).widget.unsafe_innerHTML  # a red dot

    switch(rc).v_model = False
    mlp.settings.on_error = "raise"
    model.remove_all_agents()
    Quick.create_agents(model, 2)
    model.step()
    model.step()
    redraw()
    assert text_of(rc, "mlp-report-sequential") == "The last 2 steps ran sequentially."
    # The figures shown are an older step's, and say so.
    assert text_of(rc, "mlp-report-heading") == "Earlier parallel step (step 1, 2 steps ago)"


def test_report_when_parallel_stepping_is_off():
    model = Plain()
    rc = render(viz.ParallelSteppingControls(model))
    assert text_of(rc, "mlp-report-empty") == "none: parallel stepping is off"


def test_warning_when_the_flag_is_on_but_the_patch_is_missing():
    model = Model()
    mlp.disable_automatic_parallel_stepping()
    rc = render(viz.ParallelSteppingControls(model))
    (alert,) = rc.find(v.Alert).widgets
    assert "not patched" in str(alert.children)
    switch(rc).v_model = False
    switch(rc).v_model = True
    assert mlp.is_automatic_parallel_stepping_enabled()
    assert not rc.find(v.Alert).widgets


# -- Reset and SolaraViz -------------------------------------------------------------------


def test_choices_survive_mesa_reset():
    """Mesa's own Reset builds a new model whose __init__ resets flag and mode."""
    live = solara.reactive(Model(n=4))

    @solara.component
    def Host():  # noqa: N802
        ModelController(
            live,
            model_parameters={"n": 6},
            play_interval=solara.use_reactive(1),
            render_interval=solara.use_reactive(1),
            use_threads=solara.use_reactive(False),
        )
        viz.ParallelSteppingControls(live.value)

    rc = render(Host())
    switch(rc).v_model = False
    rc.find(v.BtnToggle).widget.v_model = "threading"
    enter(rc, WORKERS_LABEL, "6")
    enter(rc, CAP_LABEL, "3")
    old = live.value

    rc.find(v.Btn, children=["Reset"]).widget.click()
    new = live.value
    assert new is not old
    assert len(new.agents) == 6  # built from the parameters by Mesa
    assert new.parallel_stepping is False  # __init__ set True: the panel's choice won
    assert mlp.settings.mode == "threading"  # __init__ set "asyncio"
    assert (mlp.settings.max_workers, mlp.settings.max_concurrency) == (6, 3)
    assert switch(rc).v_model is False
    assert rc.find(v.BtnToggle).widget.v_model == "threading"

    switch(rc).v_model = True  # and the switch now drives the new model
    assert new.parallel_stepping is True
    assert old.parallel_stepping is False
    rc.find(v.Btn, children=["Step"]).widget.click()
    report = mlp.last_step_report(new)
    assert (report.mode, report.pool_size, report.max_concurrency) == ("threading", 6, 3)
    assert text_of(rc, "mlp-report-config") == "threading, cap 3"
    assert text_of(rc, "mlp-report-pool") == "6 threads: every agent's step"


def test_untouched_choices_leave_each_new_model_alone():
    live = solara.reactive(Model())

    @solara.component
    def Host():  # noqa: N802
        viz.ParallelSteppingControls(live.value)

    rc = render(Host())
    mlp.settings.mode = "threading"  # not through the panel
    live.value = Model()  # __init__ sets asyncio again, the panel does not interfere
    assert mlp.settings.mode == "asyncio"
    assert live.value.parallel_stepping is True
    assert switch(rc).v_model is True


def test_works_as_a_solaraviz_component_with_the_live_model():
    live = solara.reactive(Model(n=2))
    rc = render(SolaraViz(live, components=[viz.ParallelSteppingControls], model_params={"n": 2}))
    switch(rc).v_model = False
    assert live.value.parallel_stepping is False
    live.value = Model(n=3)  # what SolaraViz's Reset does
    assert live.value.parallel_stepping is False
    switch(rc).v_model = True
    live.value.step()
    redraw()
    assert text_of(rc, "mlp-report-agents") == "3/3 done, peak 3 in flight"


def test_sidebar_variant_applies_choices_and_renders_no_card_in_place():
    viz.panel_choices.set(viz.PanelChoices(parallel_stepping=False, settings={"mode": "threading"}))
    model = Model()
    rc = render(viz.ParallelSteppingSidebar(model))
    assert model.parallel_stepping is False
    assert mlp.settings.mode == "threading"
    # Without a Solara app layout there is no sidebar to show it in (the browser test
    # checks the sidebar); in place there is only the empty portal marker.
    assert not rc.find(v.Switch).widgets


def test_the_panel_keeps_no_model_alive():
    import gc
    import weakref

    model = Model()
    rc = render(viz.ParallelSteppingControls(model))
    model.step()
    ref = weakref.ref(model)
    rc.close()
    del rc, model
    gc.collect()
    assert ref() is None


# -- changes while a step runs -------------------------------------------------------------


def test_changes_made_during_a_step_apply_from_the_next_step():
    started, release = threading.Event(), threading.Event()
    model = Model(n=0)
    Gate.create_agents(model, 3, started, release)
    mlp.settings.mode = "threading"
    rc = render(viz.ParallelSteppingControls(model))

    errors: list[BaseException] = []

    def run() -> None:
        try:
            model.step()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    stepper = threading.Thread(target=run)
    stepper.start()
    try:
        assert started.wait(10), "the step never started"
        # The step is blocked inside an agent: change everything from the panel.
        rc.find(v.BtnToggle).widget.v_model = "asyncio"
        enter(rc, WORKERS_LABEL, "2")
        enter(rc, CAP_LABEL, "1")
        switch(rc).v_model = False
    finally:
        release.set()
        stepper.join(10)
    assert not stepper.is_alive()
    assert not errors, errors

    during = mlp.last_step_report(model)
    # The running step kept the flag and the settings it started with.
    assert (during.mode, during.pool_size, during.max_concurrency) == ("threading", 64, None)
    assert during.peak_in_flight == 3
    assert during.completed == 3

    model.step()  # flag off now: sequential, no new report
    assert mlp.last_step_report(model) is during
    switch(rc).v_model = True
    model.step()
    after = mlp.last_step_report(model)
    assert (after.mode, after.pool_size, after.max_concurrency) == ("asyncio", 2, 1)
    assert after.peak_in_flight == 1


# -- imports -------------------------------------------------------------------------------


def test_importing_the_package_imports_no_front_end():
    done = run_python(
        """
        import sys
        import mesa_llm_parallel
        import mesa_llm_parallel.parallel_stepping
        mesa_llm_parallel.enable_automatic_parallel_stepping()
        loaded = sorted(
            name for name in sys.modules
            if name.split(".")[0] in {"solara", "reacton", "ipyvuetify", "altair"}
            or name.startswith("mesa.visualization")
        )
        assert not loaded, loaded
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_missing_solara_names_the_extra_to_install():
    done = run_python(
        """
        import sys
        sys.modules["solara"] = None  # as if Solara were not installed
        try:
            import mesa_llm_parallel.visualization
        except ImportError as exc:
            print(exc)
        else:
            raise SystemExit("no ImportError")
        """
    )
    assert done.returncode == 0, done.stderr
    assert 'pip install "mesa_llm_parallel[solara]"' in done.stdout
