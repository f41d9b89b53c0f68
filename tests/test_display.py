"""The figures and the step-time chart that the panel, the Solara card and the magic show."""

from __future__ import annotations

import re

import pytest

from mesa_llm_parallel import AgentFailure, Placement, StepReport
from mesa_llm_parallel._display import (
    CHART_WIDTH,
    StepTime,
    chart_svg,
    figures,
    figures_html,
    figures_text,
    format_seconds,
    pool_use,
)


def report(**changes) -> StepReport:
    values = {
        "mode": "asyncio",
        "agents": 10,
        "started": 10,
        "completed": 10,
        "skipped": 0,
        "failures": (),
        "wall_time": 0.2,
        "busy_time": 1.6,
        "peak_in_flight": 8,
        "pool_size": 32,
        "max_concurrency": None,
    }
    return StepReport(**{**values, **changes})


def marks(svg: str) -> list[tuple[float, float, str]]:
    """Every step's mark as (x, y, class)."""
    found = re.findall(r"<circle class='mlp-mark ([\w-]+)' cx='([\d.]+)' cy='([\d.]+)'", svg)
    return [(float(x), float(y), kind) for kind, x, y in found]


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.0004, "0.40 ms"),
        (0.0123, "12.3 ms"),
        (0.123, "123 ms"),
        (1.234, "1.23 s"),
        (12.34, "12.3 s"),
        (1234.0, "1234 s"),
    ],
)
def test_durations_have_three_figures_and_a_unit(seconds, shown):
    assert format_seconds(seconds) == shown


# -- the chart -------------------------------------------------------------------------------
def test_one_slow_step_does_not_flatten_the_others():
    points = [StepTime(0.010, True, step=1), StepTime(0.020, True, step=2)]
    points.append(StepTime(10.0, True, step=3))  # one step 1,000 times slower
    (x1, y1, _), (x2, y2, _), (_, y3, _) = marks(chart_svg(points))
    # On a log axis, 10 ms and 20 ms stay apart by a visible distance (a linear axis
    # topped at 10 s would put them within a tenth of a pixel).
    assert y1 - y2 > 5
    assert y3 < y2
    assert x1 < x2


def test_the_chart_has_labelled_axes_and_decade_ticks():
    svg = chart_svg([StepTime(0.05, True, step=7), StepTime(0.5, True, step=8)])
    assert ">time (log)</text>" in svg
    assert ">step</text>" in svg
    assert ">10 ms</text>" in svg
    assert ">100 ms</text>" in svg
    assert ">1 s</text>" in svg
    assert ">7</text>" in svg  # the oldest step's number
    assert ">8</text>" in svg  # the newest step's number


def test_the_chart_keeps_its_size_and_the_newest_step_at_the_right():
    few = chart_svg([StepTime(0.1, True, step=1)], capacity=50)
    many = chart_svg([StepTime(0.1 * (i + 1), True, step=i) for i in range(80)], capacity=50)
    for svg in (few, many, chart_svg([])):
        assert f"width='{CHART_WIDTH}'" in svg
    assert "no steps yet" in chart_svg([])
    assert len(marks(many)) == 50  # only the newest 50
    (x_few, _, _) = marks(few)[0]
    x_many = marks(many)[-1][0]
    assert x_few == x_many  # the newest step sits at the same place


def test_stalled_failed_and_sequential_steps_are_marked_and_in_the_legend():
    points = [
        StepTime(0.1, True, step=1, mode="asyncio"),
        StepTime(0.1, True, step=2, mode="threading"),
        StepTime(0.1, False, step=3),
        StepTime(0.1, True, step=4, mode="asyncio", failures=2),
        StepTime(1.5, True, step=5, mode="asyncio", stalled_time=1.4, stalled=True),
    ]
    svg = chart_svg(points)
    kinds = [kind for _, _, kind in marks(svg)]
    assert kinds == ["mlp-asyncio", "mlp-threading", "mlp-sequential", "mlp-asyncio", "mlp-stalled"]
    assert "step 5: 1.50 s, asyncio, stalled 1.40 s by a busy event loop" in svg
    assert "step 4: 100 ms, asyncio, 2 failed" in svg
    for name in ("asyncio", "threading", "sequential", "failed", "stalled (loop busy)"):
        assert f">{name}</text>" in svg
    only_async = chart_svg(points[:1])
    assert ">threading</text>" not in only_async  # the legend names what is drawn
    only_stalled = chart_svg(points[-1:])
    assert ">asyncio</text>" not in only_stalled  # the stalled mark is hollow, not blue


# -- the figures -----------------------------------------------------------------------------
def test_what_the_pool_was_used_for():
    assert pool_use(report(mode="threading")) == "32 threads: every agent's step"
    assert pool_use(report()) == "32 threads, not used (astep ran on the event loop)"
    placement = (
        Placement("Thinker", "event loop", 6, "it has astep"),
        Placement("Clerk", "thread pool", 4, "being observed in the pool"),
    )
    assert pool_use(report(placement=placement)) == "32 threads: 4 sync agents"
    # Threading mode: agents with only an astep run on the model's loop, not in the pool.
    on_loop = (Placement("Thinker", "home loop", 6, "it has only astep"),)
    assert pool_use(report(mode="threading", placement=on_loop)) == (
        "32 threads, not used (6 async agents on the model's loop)"
    )
    mixed = (*on_loop, Placement("Clerk", "thread pool", 4, "sync"))
    assert pool_use(report(mode="threading", placement=mixed)) == (
        "32 threads: 4 agents' step (6 async agents on the model's loop)"
    )


def test_a_report_older_than_the_last_step_is_headed_as_such():
    history = [StepTime(0.2, True, step=4, mode="asyncio"), StepTime(0.9, False, step=5)]
    shown = figures(report(), history, steps=5)
    assert not shown.current
    assert shown.heading == "Earlier parallel step (step 4, 1 step ago)"
    assert shown.last_step[0].value == "step 5: 900 ms, sequential"
    # Steps the history does not hold (run elsewhere) ran sequentially too.
    shown = figures(report(), history, steps=7)
    assert shown.heading == "Earlier parallel step (step 4, 3 steps ago)"
    assert shown.last_step[0].value == "step 7: sequential"
    table = figures_html(shown)
    assert "Earlier parallel step (step 4, 3 steps ago)" in table
    assert "color:#9e9e9e" in table.split("mlp-row-speedup")[1]  # greyed

    current = figures(report(), history[:1], steps=4)
    assert current.current
    assert current.heading == "Last parallel step"
    assert (
        "color:#9e9e9e" not in figures_html(current).split("mlp-row-speedup")[1].split("</tr>")[0]
    )


def test_a_stalled_step_says_so_and_is_not_a_plain_slow_step():
    stalled = report(wall_time=1.5, busy_time=0.2, stalled_time=1.3)
    assert stalled.stalled
    shown = figures(stalled, [StepTime.of_report(stalled, 3)], steps=3)
    rows = {row.key: row for row in shown.report}
    assert rows["stalled"].alert
    assert rows["stalled"].value.startswith("1.30 s of it waiting for a busy event loop")
    assert shown.last_step[0].alert
    assert "stalled" not in {row.key for row in figures(report(), steps=1).report}


def test_failures_and_interrupts_are_alerts_with_the_first_error():
    failure = AgentFailure(agent=None, exception=ValueError("no"), position=3)
    shown = figures(report(failures=(failure,), completed=6, interrupted=True, started=8))
    rows = {row.key: row for row in shown.report}
    assert rows["failures"].value == "1; first: ValueError: no"
    assert rows["failures"].alert
    assert rows["interrupted"].value == "yes: 1 unfinished, 2 never started"


def test_text_and_html_show_the_same_rows():
    shown = figures(report(), [StepTime(0.2, True, step=1, mode="asyncio")], steps=1)
    text = figures_text(shown)
    table = figures_html(shown)
    for row in (*shown.last_step, *shown.report):
        assert f"{row.label}: {row.value}" in text
        assert f"mlp-row-{row.key}" in table
    assert figures_text(figures(None, steps=0)) == (
        "Model steps so far: 0\nLast parallel step:\n  none yet"
    )
