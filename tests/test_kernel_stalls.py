"""Steps of a panel's background thread, held up by a busy notebook cell, in a real kernel.

A model whose home is the kernel's loop has the steps of a background thread (a live
panel's) sent to that loop. While a cell runs synchronous code the loop is blocked, and
the step waits: its report says so (``stalled_time``, ``stalled``) instead of showing a
slow parallel step.
"""

from __future__ import annotations

import json

import pytest
from jupyter_client import KernelManager
from test_kernel import SETUP, Kernel

BLOCK = 1.5  # how long a busy cell blocks the kernel's loop, in seconds

BACKGROUND = """
mlp.enable_automatic_parallel_stepping(mode="asyncio")
m = Calls(n=5, latency=0.3)
m.step()  # in a cell: the kernel's loop becomes the model's home
reports = []


def step_in_background():  # what a live panel's thread does
    m.step()
    reports.append(mlp.last_step_report(m))


def start_background_step():
    reports.clear()
    threading.Thread(target=step_in_background, daemon=True).start()


async def all_started(before):
    while sum(a.runs for a in m.agents) < before + len(m.agents):
        await asyncio.sleep(0.01)


async def show_background_report():
    while not reports:
        await asyncio.sleep(0.05)
    r = reports[0]
    figures = [r.stalled_time, r.stalled, r.wall_time, r.completed, r.summary()]
    print("REPORT " + json.dumps(figures))
"""


@pytest.fixture
def kernel(jupyter_env, tmp_path):
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(cwd=str(tmp_path))  # not the repository: import the installed package
    try:
        started = Kernel(manager)
    except BaseException:
        manager.shutdown_kernel(now=True)
        raise
    yield started
    started.close()


def background_report(kernel: Kernel, cell: str) -> dict[str, object]:
    """Run ``cell`` (which starts a background step), then the report of that step."""
    kernel.run(cell)
    output = kernel.run("await show_background_report()")
    lines = [line for line in output.splitlines() if line.startswith("REPORT ")]
    assert lines, f"no report printed; the cell printed:\n{output}"
    stalled_time, stalled, wall_time, completed, summary = json.loads(lines[-1][len("REPORT ") :])
    assert completed == 5
    return {"stalled_time": stalled_time, "stalled": stalled, "wall": wall_time, "line": summary}


def test_a_background_step_waiting_for_a_busy_cell_is_reported_stalled(kernel):
    kernel.run(SETUP + BACKGROUND)

    idle = background_report(kernel, "start_background_step()")  # the cell ends at once
    assert idle["stalled"] is False
    assert idle["stalled_time"] < 0.5  # at most a few poll intervals misread
    assert "stalled" not in idle["line"]

    # Sent while the cell sleeps: the kernel's loop starts the step once the cell ends.
    sent_to_busy = background_report(kernel, f"start_background_step()\ntime.sleep({BLOCK})")
    assert sent_to_busy["stalled"] is True
    assert sent_to_busy["stalled_time"] >= BLOCK - 0.5
    assert "stalled" in sent_to_busy["line"]

    # Blocked while the step's agents wait on the kernel's loop.
    blocked_midway = background_report(
        kernel,
        "before = sum(a.runs for a in m.agents)\n"
        "start_background_step()\n"
        "await all_started(before)\n"
        f"time.sleep({BLOCK})",
    )
    assert blocked_midway["stalled"] is True
    assert blocked_midway["stalled_time"] >= BLOCK - 0.5


PANEL = """
from mesa_llm_parallel.widgets import ParallelSteppingPanel

panel = ParallelSteppingPanel(m)


async def show_panel_after_step():
    while panel.running:
        await asyncio.sleep(0.05)
    point = panel.step_times[-1]
    rows = panel.figures_html.value
    print("PANEL " + json.dumps([
        point.stalled,
        "mlp-row-stalled" in rows,
        "waiting for a busy event loop" in rows,
        "mlp-stalled" in panel.chart_html.value,
        "stalled (loop busy)" in panel.chart_html.value,
    ]))
"""


def test_the_panel_marks_a_step_stalled_by_a_busy_cell(kernel):
    """The panel's own step, held up by a busy cell, is marked in its table and chart."""
    kernel.run(SETUP + BACKGROUND + PANEL)

    def shown_after(cell: str) -> list[bool]:
        kernel.run(cell)
        output = kernel.run("await show_panel_after_step()")
        lines = [line for line in output.splitlines() if line.startswith("PANEL ")]
        assert lines, f"nothing printed; the cell printed:\n{output}"
        return json.loads(lines[-1][len("PANEL ") :])

    assert shown_after("panel.step()") == [False] * 5  # an idle kernel: not stalled
    assert shown_after(f"panel.step()\ntime.sleep({BLOCK})") == [True] * 5
