"""The live panel (``ParallelSteppingPanel``) in a real JupyterLab, driven in Chromium.

A ``jupyter lab`` server (a subprocess: see ``jupyter_lab.py``) serves a copy of the
repository's ``notebooks/``. The page opens ``panel.ipynb`` and runs every cell, which
leaves a panel on screen with a long background run in progress. The test then uses the
panel as a person would (the toggle, the mode, the thread-pool slider, the cap, Pause, Run
and Step) and checks each change in the notebook's own kernel, through a second client of
that kernel, and in the panel's figures.

The panel's parts are found by their CSS classes (``mlp-panel``, ``mlp-parallel``,
``mlp-mode``, ``mlp-threads``, ``mlp-cap``, ``mlp-steps``, ``mlp-run``, ``mlp-pause``,
``mlp-step``, ``mlp-figures``, ``mlp-chart``, ``mlp-status``, ``mlp-notice``). Screenshots
of the page after Run All and at the end (and at a failure) are saved in the test's
output folder (``test-results/...``), whose path the test prints.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_lab import JupyterLab, KernelDriver, wait_until
from playwright.sync_api import Locator, Page, expect

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = "panel.ipynb"
# The thread-pool slider's options (a SelectionSlider): an arrow key moves one option.
THREAD_OPTIONS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# A step in progress ends before a pause or a new setting takes effect: a sequential
# step of the notebook's model can take seconds, and more on a loaded 2-core machine.
STEP_TIMEOUT = 90
ERROR_OUTPUT = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'


@pytest.fixture
def notebooks_dir() -> Path:
    """The folder whose copy the server serves."""
    return ROOT / "notebooks"


@pytest.fixture
def lab(tmp_path: Path, notebooks_dir: Path) -> Iterator[JupyterLab]:
    root = tmp_path / "notebooks"
    shutil.copytree(notebooks_dir, root)
    server = JupyterLab(root, tmp_path / "jupyter", pythonpath=ROOT)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def shots(output_path: str, capsys: pytest.CaptureFixture[str]) -> Path:
    """pytest-playwright's output folder for this test (emptied at each session start)."""
    folder = Path(output_path)
    folder.mkdir(parents=True, exist_ok=True)
    with capsys.disabled():
        print(f"\nscreenshots of the JupyterLab panel test: {folder}")
    return folder


def code_cells(notebook: Path) -> int:
    return sum(cell["cell_type"] == "code" for cell in json.loads(notebook.read_text())["cells"])


def run_all_cells(page: Page, cells: int, timeout: float) -> None:
    """Run > Run All Cells, then wait until cells 1..n have run with no error output."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.locator('#jp-mainmenu-run .lm-Menu-item[data-command="runmenu:run-all"]').click()
    prompts = page.locator(".jp-Notebook .jp-CodeCell .jp-InputArea-prompt")
    errors = page.locator(ERROR_OUTPUT).filter(has_text=re.compile("Traceback|Error"))
    expected = [f"[{n}]:" for n in range(1, cells + 1)]

    def done() -> bool:
        if errors.count():
            pytest.fail(f"a cell failed during Run All:\n{errors.first.inner_text()}")
        return [text.strip() for text in prompts.all_inner_texts()] == expected

    wait_until(done, f"Run All to run the {cells} code cells", timeout)


def move_pool_size(slider: Locator, current: int) -> int:
    """Press an arrow key on the slider's handle; return the pool size it should select."""
    handle = slider.locator(".noUi-handle")
    handle.focus()
    if current < THREAD_OPTIONS[-1]:
        handle.press("ArrowRight")
        return min(n for n in THREAD_OPTIONS if n > current)
    handle.press("ArrowLeft")
    return max(n for n in THREAD_OPTIONS if n < current)


def pause(panel: Locator, kernel: KernelDriver) -> None:
    panel.locator(".mlp-pause").click()
    kernel.wait_for("panel.running", expected=False, timeout=STEP_TIMEOUT)
    expect(panel.locator(".mlp-status")).to_contain_text(re.compile("paused", re.IGNORECASE))
    expect(panel.locator(".mlp-run")).to_be_enabled()
    expect(panel.locator(".mlp-pause")).to_be_disabled()


def test_panel_drives_the_notebook_kernel(lab: JupyterLab, page: Page, shots: Path) -> None:
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(lab.url(f"lab/tree/{NOTEBOOK}"))
    indicator = page.locator(".jp-NotebookPanel-toolbar .jp-Notebook-ExecutionIndicator")
    expect(indicator).to_have_attribute("data-status", "idle", timeout=120_000)
    # More room for the notebook: close the file browser (View > Show Left Sidebar).
    page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").click()
    kernel = lab.connect(NOTEBOOK)
    try:
        drive_the_panel(page, kernel, shots, cells=code_cells(lab.root_dir / NOTEBOOK))
    except BaseException:
        page.screenshot(path=shots / "failure.png")
        raise
    finally:
        kernel.close()


def drive_the_panel(page: Page, kernel: KernelDriver, shots: Path, cells: int) -> None:
    # The kernel is this interpreter, importing this checkout's package.
    assert kernel.value("__import__('sys').executable") == sys.executable
    package = kernel.value("__import__('mesa_llm_parallel').__file__")
    assert Path(package).resolve().is_relative_to(ROOT)

    run_all_cells(page, cells, timeout=240)
    panel = page.locator(".mlp-panel").last
    expect(panel).to_be_visible()
    panel.scroll_into_view_if_needed()
    expect(panel.locator(".mlp-chart svg")).to_be_visible()
    page.screenshot(path=shots / "after-run-all.png")
    kernel.run("import mesa_llm_parallel as _t_mlp")
    assert kernel.value("panel.running") is True, "the notebook should end with a run going"

    # The toggle is model.parallel_stepping, both ways.
    toggle = panel.locator(".mlp-parallel input[type=checkbox]")
    flag = kernel.value("model.parallel_stepping")
    expect(toggle).to_be_checked(checked=flag)
    toggle.click()
    kernel.wait_for("model.parallel_stepping", expected=not flag)
    toggle.click()
    kernel.wait_for("model.parallel_stepping", expected=flag)
    if not flag:  # the figures below need parallel steps
        toggle.click()
        kernel.wait_for("model.parallel_stepping", expected=True)

    # The mode, the pool size and the cap are the process-wide settings. The mode ends
    # on threading, where every agent's step runs in the pool whose size is set next.
    mode = "threading"
    modes = [mode] if kernel.value("_t_mlp.settings.mode") == "asyncio" else ["asyncio", mode]
    for name in modes:
        button = panel.locator(".mlp-mode button", has_text=re.compile(f"^{name}$"))
        button.click()
        expect(button).to_have_class(re.compile(r"\bmod-active\b"))
        kernel.wait_for("_t_mlp.settings.mode", expected=name)

    threads = panel.locator(".mlp-threads")
    pool = move_pool_size(threads, kernel.value("_t_mlp.settings.max_workers"))
    kernel.wait_for("_t_mlp.settings.max_workers", expected=pool)
    expect(threads.locator(".widget-readout")).to_have_text(str(pool))

    cap = panel.locator(".mlp-cap input")
    cap.fill("40")
    cap.press("Enter")
    kernel.wait_for("_t_mlp.settings.max_concurrency", expected=40)
    notice = panel.locator(".mlp-notice")
    expect(notice).to_contain_text("Max in flight set to 40 for every model")

    # What the switch and the modes do is written on the panel, not hidden in tooltips.
    expect(panel.get_by_text("for this model only", exact=False)).to_be_visible()
    expect(panel.get_by_text("the thread pool runs only sync agents", exact=False)).to_be_visible()

    # Pause stops the notebook's run after the step in progress.
    pause(panel, kernel)

    # Run starts again; its steps use the new settings, and the figures show them.
    kernel.run("_t_before = _t_mlp.last_step_report(model)")
    steps = panel.locator(".mlp-steps input")
    steps.fill("500")
    steps.press("Enter")
    panel.locator(".mlp-run").click()
    kernel.wait_for("panel.running", expected=True)
    expect(panel.locator(".mlp-pause")).to_be_enabled()
    new_report = "_t_mlp.last_step_report(model) is not _t_before"
    kernel.wait_for(new_report, expected=True, timeout=STEP_TIMEOUT)
    report = kernel.value(
        "(lambda r: [r.mode, r.pool_size, r.max_concurrency])(_t_mlp.last_step_report(model))"
    )
    assert report == [mode, pool, 40]
    # The figures' rows carry their keys as classes (mesa_llm_parallel._display.Row).
    figures = panel.locator(".mlp-figures")
    config = figures.locator("tr.mlp-row-config td").last
    expect(config).to_contain_text(re.compile(rf"^{mode}\b.*\b40\b"))
    pool_use = figures.locator("tr.mlp-row-pool td").last
    expect(pool_use).to_contain_text(re.compile(rf"^{pool} threads: every agent's step"))
    expect(figures.locator("tr.mlp-row-failures td").last).to_have_text("none")
    expect(panel.locator(".mlp-chart svg circle").first).to_be_attached()
    # The confirmation is still readable after the run's steps updated the status line.
    expect(notice).to_contain_text("Max in flight set to 40 for every model")
    # The chart: labelled axes, and a width that the figures beside it do not change.
    chart = panel.locator(".mlp-chart svg")
    expect(chart.locator("text", has_text="time (log)")).to_have_count(1)
    expect(chart.locator("text", has_text=re.compile(r"^step$"))).to_have_count(1)
    box = chart.bounding_box()
    assert box is not None
    assert round(box["width"]) == 360

    pause(panel, kernel)

    # Step runs exactly one more step, then the panel is idle again.
    steps = "(model.steps if hasattr(model, 'steps') else int(model.time))"  # Mesa 4: time
    steps_before = kernel.value(steps)
    panel.locator(".mlp-step").click()
    kernel.wait_for(steps, expected=steps_before + 1, timeout=STEP_TIMEOUT)
    kernel.wait_for("panel.running", expected=False, timeout=STEP_TIMEOUT)
    expect(panel.locator(".mlp-run")).to_be_enabled()
    assert kernel.value(steps) == steps_before + 1
    page.screenshot(path=shots / "end.png")
    panel.screenshot(path=shots / "panel.png")
    kernel.run("del _t_before, _t_mlp")
