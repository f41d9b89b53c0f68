"""The example dashboard in a real Chromium: the panel drives the live, server-side model.

The Solara server runs in this process (pytest-ipywidgets' ``solara_app`` fixture), so
the test reads the model the page is showing (``model.latest_model()``, a weak
reference the example keeps) and the live settings directly.

The dashboard test saves a screenshot in its temporary folder; with
``MESA_LLM_PARALLEL_UPDATE_SCREENSHOT=1`` it also refreshes ``docs/_static/dashboard.png``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect
from support import steps_of

import mesa_llm_parallel as mlp

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "llm_dashboard" / "app.py"
SCREENSHOT = ROOT / "docs" / "_static" / "dashboard.png"
# The screenshot of the documentation is refreshed when this is "1" (or missing), not on
# every run: its figures differ each time, and a test run should not leave a diff.
UPDATE_SCREENSHOT = "MESA_LLM_PARALLEL_UPDATE_SCREENSHOT"


def wait_until(condition: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    """Poll server-side state until ``condition()`` is true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for: {what}")
        time.sleep(0.05)


def live_model():
    """The model the dashboard shows: example's model.py keeps a weak reference."""
    return sys.modules["model"].latest_model()


def app_namespace():
    """The module Solara made of the app script running in this process."""
    import solara.server.app

    return solara.server.app.apps["__default__"].routes[0].module


class StepLog:
    """Every parallel step that finished: its mode and whether it ran inside an event loop.

    For asyncio steps, also the path the step took and the model's home loop then.
    """

    def __init__(self) -> None:
        self.steps: list[tuple[str, bool]] = []
        self.homes: list[tuple[str | None, object]] = []

    def __call__(self, model, report) -> None:  # a step callback, in the stepping thread
        try:
            asyncio.get_running_loop()
            in_loop = True
        except RuntimeError:
            in_loop = False
        self.steps.append((report.mode, in_loop))
        if report.mode == "asyncio":
            self.homes.append((mlp.last_loop_path(), mlp.home_loop(model)))


@pytest.fixture
def step_log():
    log = StepLog()
    mlp.add_step_callback(log)
    yield log
    mlp.remove_step_callback(log)


def pause(page: Page, model, log: StepLog) -> None:
    """Press pause and wait until the play thread has finished its last step.

    Every step of the model so far is parallel, so the play thread is done when every
    started step (``steps_of(model)``) has reported its end to the step log.
    """
    page.get_by_role("button", name="❚❚").click()
    expect(page.get_by_role("button", name="▶")).to_be_enabled()
    wait_until(lambda: len(log.steps) == steps_of(model), "the play thread's last step")
    time.sleep(0.2)  # the rest of model.step() after the agents (data collection)


@pytest.fixture
def dashboard(solara_app, solara_server, page_session: Page):
    with solara_app(str(APP)):
        page_session.set_viewport_size({"width": 1400, "height": 900})
        page_session.goto(solara_server.base_url)
        expect(page_session.locator(".mlp-parallel-controls")).to_be_visible()
        yield page_session
        # Stop a run that a failing assertion left playing.
        pause = page_session.get_by_role("button", name="❚❚")
        if pause.count():
            pause.click()


def test_panel_drives_the_live_model_and_survives_reset(
    dashboard: Page, step_log: StepLog, tmp_path: Path
):
    page = dashboard
    panel = page.locator(".mlp-parallel-controls")
    model = live_model()
    assert model is not None
    assert model.parallel_stepping is True  # the example model opts in

    # The switch flips the flag on the live model, both ways.
    switch = panel.locator(".mlp-parallel-switch").get_by_text("Step agents in parallel")
    switch.click()
    wait_until(lambda: model.parallel_stepping is False, "parallel_stepping off")
    switch.click()
    wait_until(lambda: model.parallel_stepping is True, "parallel_stepping on")

    # Mode, pool size and concurrency cap are the live settings.
    panel.locator(".mlp-mode").get_by_role("button", name="threading").click()
    wait_until(lambda: mlp.settings.mode == "threading", "mode threading")
    workers = panel.locator(".mlp-max-workers input")
    workers.fill("8")
    workers.press("Enter")
    wait_until(lambda: mlp.settings.max_workers == 8, "max_workers 8")
    cap = panel.locator(".mlp-max-concurrency input")
    cap.fill("25")
    cap.press("Enter")
    wait_until(lambda: mlp.settings.max_concurrency == 25, "max_concurrency 25")

    # Play on the worker thread: the report in the page follows the steps.
    page.get_by_role("button", name="▶").click()
    wait_until(lambda: steps_of(model) >= 3, "three played steps")
    pause(page, model, step_log)
    report = panel.locator(".mlp-step-report")
    expect(report.locator(".mlp-report-heading")).to_have_text("Last parallel step")
    expect(report.locator(".mlp-report-config")).to_have_text("threading, cap 25")
    # What the pool was used for, not just its size.
    expect(report.locator(".mlp-report-pool")).to_have_text("8 threads: every agent's step")
    expect(report.locator(".mlp-report-failures")).to_have_text("none")
    chart = report.locator(".mlp-chart svg")
    expect(chart.locator("circle.mlp-mark").first).to_be_visible()
    # The chart has labelled axes (log time, step numbers) and a fixed size.
    expect(chart.locator("text", has_text="time (log)")).to_have_count(1)
    expect(chart.locator("text", has_text="step")).not_to_have_count(0)
    box = chart.bounding_box()
    assert box is not None
    assert round(box["width"]) == 310
    assert mlp.last_step_report(model).mode == "threading"
    assert mlp.last_step_report(model).pool_size == 8
    # Play ran its steps on a worker thread without an event loop.
    assert set(step_log.steps) == {("threading", False)}

    # The Step button runs a step inside the server's event loop (asyncio mode here).
    panel.locator(".mlp-mode").get_by_role("button", name="asyncio").click()
    wait_until(lambda: mlp.settings.mode == "asyncio", "mode asyncio")
    steps = steps_of(model)
    page.get_by_role("button", name="Step", exact=True).click()
    wait_until(lambda: len(step_log.steps) == steps + 1, "one more step")
    assert steps_of(model) == steps + 1
    expect(report.locator(".mlp-report-config")).to_have_text("asyncio, cap 25")
    expect(report.locator(".mlp-report-time")).to_contain_text(f"(step {steps + 1})")
    assert step_log.steps[-1] == ("asyncio", True)  # inside the server's running loop

    page.screenshot(path=tmp_path / "dashboard.png", full_page=True)
    if os.environ.get(UPDATE_SCREENSHOT) == "1" or not SCREENSHOT.exists():
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "dashboard.png", SCREENSHOT)

    # A sequential step after it: the figures shown are now an older step's, and say so.
    switch.click()
    wait_until(lambda: model.parallel_stepping is False, "parallel_stepping off")
    page.get_by_role("button", name="Step", exact=True).click()
    expect(report.locator(".mlp-report-heading")).to_have_text(
        f"Earlier parallel step (step {steps + 1}, 1 step ago)"
    )
    expect(report.locator(".mlp-report-sequential")).to_have_text(
        "The last 1 step ran sequentially."
    )
    switch.click()
    wait_until(lambda: model.parallel_stepping is True, "parallel_stepping on")

    # Reset builds a new model whose __init__ turns parallel stepping on and sets the
    # mode to asyncio: the panel's choices (flag off, threading, pool 8) win.
    panel.locator(".mlp-mode").get_by_role("button", name="threading").click()
    switch.click()
    wait_until(lambda: model.parallel_stepping is False, "parallel_stepping off")
    page.get_by_role("button", name="Reset").click()
    wait_until(lambda: live_model() is not model, "a new model")
    fresh = live_model()
    wait_until(lambda: fresh.parallel_stepping is False, "the flag re-applied to the new model")
    assert mlp.settings.mode == "threading"
    assert mlp.settings.max_workers == 8
    assert mlp.settings.max_concurrency == 25
    expect(panel.locator(".mlp-report-empty")).to_be_visible()  # a new model: no report yet
    expect(panel.locator(".mlp-parallel-switch input")).not_to_be_checked()

    # And the switch acts on the new model.
    switch.click()
    wait_until(lambda: fresh.parallel_stepping is True, "parallel_stepping on (new model)")
    page.get_by_role("button", name="Step", exact=True).click()
    expect(report.locator(".mlp-report-config")).to_have_text("threading, cap 25")
    expect(report.locator(".mlp-report-pool")).to_have_text("8 threads: every agent's step")


def test_sidebar_card_sits_below_solaraviz_cards(
    solara_app, solara_server, page_session: Page, tmp_path: Path
):
    """``components=[ParallelSteppingSidebar]``: the card goes to the sidebar, last."""
    with solara_app(str(Path(__file__).with_name("sidebar_app.py"))):
        page_session.goto(solara_server.base_url)
        sidebar = page_session.locator("nav")
        card = sidebar.locator(".mlp-parallel-controls")
        expect(card).to_be_visible()
        titles = sidebar.locator(".v-card-title").all_inner_texts()
        assert titles[-1] == "Parallel stepping", titles
        assert titles.index("Controls") < titles.index("Parallel stepping")

        model = app_namespace().latest()
        card.locator(".mlp-parallel-switch").get_by_text("Step agents in parallel").click()
        wait_until(lambda: model.parallel_stepping is False, "parallel_stepping off")
        page_session.screenshot(path=tmp_path / "sidebar.png", full_page=True)


def test_play_step_play_in_asyncio_mode_all_run_on_the_models_home_loop(
    dashboard: Page, step_log: StepLog
):
    """Each Play is a new worker thread and Step runs on the server's loop: one home loop."""
    page = dashboard
    model = live_model()
    assert mlp.settings.mode == "asyncio"  # the example model's choice

    page.get_by_role("button", name="▶").click()
    wait_until(lambda: steps_of(model) >= 2, "two played steps")
    pause(page, model, step_log)
    steps = steps_of(model)
    page.get_by_role("button", name="Step", exact=True).click()
    wait_until(lambda: len(step_log.steps) == steps + 1, "the Step button's step")
    page.get_by_role("button", name="▶").click()
    wait_until(lambda: steps_of(model) >= steps + 3, "two more played steps")
    pause(page, model, step_log)

    home = mlp.home_loop(model)
    assert home is not None
    assert not home.is_closed()
    paths = [path for path, _ in step_log.homes]
    assert len(paths) == steps_of(model)
    assert {loop for _, loop in step_log.homes} == {home}  # one loop for every step
    assert paths[0] == "thread_loop"  # the first Play thread's loop became the home
    assert paths[steps] == "home_loop"  # Step, inside the server's loop, ran it there
    assert paths[-1] == "home_loop"  # and so did the second Play thread
    assert mlp.last_step_report(model).failures == ()
