"""What the front ends show of parallel steps: figures with their units, and the chart.

Core objects: :class:`StepTime` (one point of a step-time history), :func:`figures`
(a :class:`StepReport` and the recent history turned into labelled rows),
:func:`figures_html` / :func:`figures_text` (those rows as an HTML table or as plain
lines) and :func:`chart_svg` (the step-time chart).

The ipywidgets panel (:mod:`mesa_llm_parallel.widgets`), the Solara component
(:mod:`mesa_llm_parallel.visualization`) and the ``%parallel_stepping status`` magic all
show steps through this module, so a figure reads the same wherever it is shown. It
imports neither ipywidgets nor Solara: its output is plain strings.

Rules the figures follow:

* The last step comes first. The report of the last *parallel* step is shown under its
  own heading; when later steps ran sequentially, that heading says how many steps ago
  it was, so an old speedup is never read as the current one.
* The chart has a logarithmic time axis (one slow step does not flatten the others)
  with its decades labelled, the model's step numbers on the other axis, and a fixed
  size, so it does not jump when the figures beside it change.
* A step that spent much of its time waiting for a busy event loop (a notebook cell
  that blocked the kernel's loop while the step was sent there; see
  :attr:`StepReport.stalled_time <mesa_llm_parallel.StepReport.stalled_time>`) is
  marked as stalled, in the chart and in the figures, instead of passing for a slow
  parallel step.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Sequence
from typing import Final, NamedTuple

from mesa_llm_parallel._placement import HOME_LOOP, POOL
from mesa_llm_parallel._report import StepReport

__all__ = [
    "CHART_HEIGHT",
    "CHART_WIDTH",
    "COLOURS",
    "HISTORY_LENGTH",
    "Figures",
    "Row",
    "StepTime",
    "chart_svg",
    "figures",
    "figures_html",
    "figures_text",
    "format_seconds",
    "pool_use",
]

#: How many recent steps the front ends keep and chart.
HISTORY_LENGTH: Final = 50

#: Size of the step-time chart, in CSS pixels (legend included).
CHART_WIDTH: Final = 360
CHART_HEIGHT: Final = 150

#: Colours of the chart's marks, by kind of step (also used in the legend).
COLOURS: Final = {
    "asyncio": "#1565c0",
    "threading": "#2e7d32",
    "sequential": "#ef6c00",
    "failed": "#c62828",
    "stalled": "#757575",
}

_MUTED: Final = "#666"
#: Figures of an older step: clearly lighter than the current ones.
_OLD: Final = "#9e9e9e"


class StepTime(NamedTuple):
    """One step of a step-time history (a point of the chart).

    Attributes:
        seconds: Wall time of the step, in seconds; NaN for a step known only by its
            number (a sequential step that no front end timed).
        parallel: True for a parallel step (its figures come from its
            :class:`~mesa_llm_parallel.StepReport`), False for a sequential step
            (timed around ``model.step()``).
        step: The model's step number after the step (Mesa 3's ``model.steps``, Mesa
            4's ``model.time``), or None when the model has neither.
        mode: ``"asyncio"`` or ``"threading"`` for a parallel step, None otherwise.
        failures: How many agents failed in the step (0 for a sequential step).
        stalled_time: Seconds of ``seconds`` the step waited for a busy event loop
            (:attr:`StepReport.stalled_time <mesa_llm_parallel.StepReport.stalled_time>`).
        stalled: Whether that wait was a large part of the step
            (:attr:`StepReport.stalled <mesa_llm_parallel.StepReport.stalled>`).
    """

    seconds: float
    parallel: bool
    step: int | None = None
    mode: str | None = None
    failures: int = 0
    stalled_time: float = 0.0
    stalled: bool = False

    @classmethod
    def of_report(cls, report: StepReport, step: int | None) -> StepTime:
        """The point of a parallel step, from its report and the model's step number."""
        return cls(
            seconds=report.wall_time,
            parallel=True,
            step=step,
            mode=report.mode,
            failures=len(report.failures),
            stalled_time=report.stalled_time,
            stalled=report.stalled,
        )

    @property
    def kind(self) -> str:
        """``"asyncio"``, ``"threading"`` or ``"sequential"`` (the chart's colour)."""
        return (self.mode or "asyncio") if self.parallel else "sequential"

    def describe(self) -> str:
        """One line: step number, time, kind, and a stall or failures if any."""
        kind = (self.mode or "parallel") if self.parallel else "sequential"
        parts = [kind] if math.isnan(self.seconds) else [format_seconds(self.seconds), kind]
        if self.stalled:
            parts.append(f"stalled {format_seconds(self.stalled_time)} by a busy event loop")
        if self.failures:
            parts.append(f"{self.failures} failed")
        head = f"step {self.step}: " if self.step is not None else ""
        return head + ", ".join(parts)


# -- units --------------------------------------------------------------------------------


def format_seconds(seconds: float) -> str:
    """A duration for people: ``0.42 ms``, ``12.3 ms``, ``123 ms``, ``1.23 s``, ``12.3 s``.

    Three significant figures at most, in milliseconds below one second.
    """
    if seconds < 0.01:
        return f"{seconds * 1000:.2f} ms"
    if seconds < 0.1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1.0:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10.0:
        return f"{seconds:.2f} s"
    if seconds < 100.0:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s"


def _tick_label(seconds: float) -> str:
    """A tick of the time axis: ``10 µs``, ``1 ms``, ``200 ms``, ``1 s``, ``10 s``."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.0f} s"


def pool_use(report: StepReport) -> str:
    """What the step's thread pool was used for, in a few words.

    In threading mode every agent's ``step`` runs in the pool, except agents with only an
    ``astep``, which run on the model's home loop. In asyncio mode agents' ``astep`` run
    on the event loop and the pool only runs sync agents (those without ``astep``,
    unless they run inline). The figure counts them from
    :attr:`StepReport.placement <mesa_llm_parallel.StepReport.placement>`.
    """
    size = f"{report.pool_size} thread{'s' if report.pool_size != 1 else ''}"
    in_pool = sum(p.agents for p in report.placement if p.where == POOL)
    if report.mode == "threading":
        on_loop = sum(p.agents for p in report.placement if p.where == HOME_LOOP)
        if not on_loop:
            return f"{size}: every agent's step"
        loop_part = f"{on_loop} async agent{'s' if on_loop != 1 else ''} on the model's loop"
        if not in_pool:
            return f"{size}, not used ({loop_part})"
        return f"{size}: {in_pool} agent{'s' if in_pool != 1 else ''}' step ({loop_part})"
    if in_pool:
        return f"{size}: {in_pool} sync agent{'s' if in_pool != 1 else ''}"
    return f"{size}, not used (astep ran on the event loop)"


def _cap(report: StepReport) -> str:
    cap = report.max_concurrency
    return "no cap" if cap is None else f"cap {cap}"


# -- figures ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One labelled figure.

    Attributes:
        label: What the figure is (``"Speedup"``).
        value: The figure with its unit (``"36.9x (agent time / wall time)"``).
        key: A stable name for tests and CSS classes (``"speedup"``).
        alert: Whether the figure needs attention (failures, a stall, an interrupt).
    """

    label: str
    value: str
    key: str
    alert: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Figures:
    """What to show of a model's recent steps.

    Attributes:
        last_step: Rows about the last step the front end saw (parallel or not);
            empty before any.
        heading: The heading of the report rows: ``"Last parallel step"``, or, when
            later steps ran sequentially, ``"Earlier parallel step (step 9, 3 steps
            ago)"``.
        current: Whether the report belongs to the last step (False: it is older).
        report: Rows of the last parallel step's report; empty before any.
        note: A line shown instead of the report rows when there are none.
    """

    last_step: tuple[Row, ...]
    heading: str
    current: bool
    report: tuple[Row, ...]
    note: str | None = None


def figures(
    report: StepReport | None,
    history: Sequence[StepTime] = (),
    *,
    steps: int | None = None,
    report_step: int | None = None,
    empty_note: str = "none yet",
) -> Figures:
    """The figures of a model's recent steps, as labelled rows.

    Args:
        report: The model's latest step report
            (:func:`~mesa_llm_parallel.last_step_report`), or None.
        history: Recent steps, oldest first, as the front end recorded them; it may
            hold parallel steps only (then sequential steps are found from ``steps``).
        steps: The model's step number now, or None when unknown.
        report_step: The model's step number when ``report`` was stored, for a front
            end without a history (the magic); the history's last parallel step wins.
        empty_note: What to say when there is no report.

    Returns:
        The rows, with the report's rows under a heading that says whether the report
        is the last step's.
    """
    parallel_points = [p for p in history if p.parallel]
    if parallel_points:
        report_step = parallel_points[-1].step
    last = history[-1] if history else None
    if last is None and report is not None and report_step is not None and steps is not None:
        # No history: the report's step, or the steps after it, which ran sequentially.
        if steps > report_step:
            last = StepTime(float("nan"), parallel=False, step=steps)
        else:
            last = StepTime.of_report(report, report_step)
    elif last is not None and last.step is not None and steps is not None and steps > last.step:
        # Steps the history does not hold (a history of parallel steps only, or steps
        # run elsewhere) ran sequentially: no parallel step reported them.
        last = StepTime(float("nan"), parallel=False, step=steps)
    last_rows: list[Row] = []
    if last is not None:
        last_rows.append(Row("Last step", last.describe(), "last-step", alert=last.stalled))
    if steps is not None:
        last_rows.append(Row("Model steps so far", str(steps), "steps"))
    if report is None:
        return Figures(tuple(last_rows), "Last parallel step", True, (), empty_note)

    later = 0
    if report_step is not None and steps is not None and steps > report_step:
        later = steps - report_step
    elif last is not None and not last.parallel:
        later = len(history) - 1 - max((i for i, p in enumerate(history) if p.parallel), default=-1)
    if later:
        where = f"step {report_step}, " if report_step is not None else ""
        heading = f"Earlier parallel step ({where}{later} step{'s' if later != 1 else ''} ago)"
    else:
        heading = "Last parallel step"

    failed = len(report.failures)
    if failed:
        first = report.failures[0].exception
        timed_out = f", {len(report.timed_out)} timed out" if report.timed_out else ""
        failures = f"{failed}{timed_out}; first: {type(first).__name__}: {first}"
    else:
        failures = "none"
    step_note = f" (step {report_step})" if report_step is not None else ""
    rows = [
        Row("Wall time", f"{format_seconds(report.wall_time)}{step_note}", "time"),
        Row("Speedup", f"{report.speedup:.1f}x (agent time / wall time)", "speedup"),
        Row(
            "Agents",
            f"{report.completed}/{report.agents} done, peak {report.peak_in_flight} in flight",
            "agents",
        ),
        Row("Mode", f"{report.mode}, {_cap(report)}", "config"),
        Row("Thread pool", pool_use(report), "pool"),
        Row("Failures", failures, "failures", alert=bool(failed)),
    ]
    if report.stalled:
        rows.append(
            Row(
                "Stalled",
                f"{format_seconds(report.stalled_time)} of it waiting for a busy event loop "
                "(a running cell?)",
                "stalled",
                alert=True,
            )
        )
    if report.interrupted:
        unfinished = report.started - report.completed - failed
        rows.append(
            Row(
                "Interrupted",
                f"yes: {unfinished} unfinished, {report.not_started} never started",
                "interrupted",
                alert=True,
            )
        )
    if report.stuck_threads:
        rows.append(Row("Stuck threads", str(report.stuck_threads), "stuck", alert=True))
    return Figures(tuple(last_rows), heading, not later, tuple(rows))


def figures_html(shown: Figures, *, width: int = 330) -> str:
    """The figures as one HTML table of a fixed width: last step, heading, report rows.

    Each row is ``<tr class="mlp-row-KEY"><td>label</td><td>value</td></tr>``; the
    report rows of an older step are greyed under their "Earlier parallel step"
    heading.
    """
    colour = "" if shown.current else f"color:{_OLD};"
    out = [
        f"<table class='mlp-figures-table' style='font-size:90%;width:{width}px;"
        "table-layout:fixed;border-collapse:collapse'>"
        "<colgroup><col style='width:38%'><col></colgroup>"
    ]
    out += [_row_html(row) for row in shown.last_step]
    out.append(
        f"<tr class='mlp-heading'><th colspan='2' style='text-align:left;padding-top:6px;"
        f"border-bottom:1px solid #ddd;{colour}'>{html.escape(shown.heading)}</th></tr>"
    )
    if shown.note is not None:
        out.append(
            f"<tr class='mlp-row-note'><td colspan='2' style='color:{_MUTED}'>"
            f"{html.escape(shown.note)}</td></tr>"
        )
    out += [_row_html(row, muted=not shown.current) for row in shown.report]
    out.append("</table>")
    return "".join(out)


def _row_html(row: Row, *, muted: bool = False) -> str:
    style = f"color:{COLOURS['failed']};" if row.alert else (f"color:{_OLD};" if muted else "")
    return (
        f"<tr class='mlp-row-{row.key}'><td style='padding-right:8px;color:#555;"
        f"vertical-align:top'>{html.escape(row.label)}</td>"
        f"<td style='overflow-wrap:anywhere;{style}'>{html.escape(row.value)}</td></tr>"
    )


def figures_text(shown: Figures, *, indent: str = "  ") -> str:
    """The figures as plain lines (``label: value``), the heading between the sections."""
    lines = [f"{row.label}: {row.value}" for row in shown.last_step]
    lines.append(f"{shown.heading}:")
    if shown.note is not None:
        lines.append(f"{indent}{shown.note}")
    lines += [f"{indent}{row.label}: {row.value}" for row in shown.report]
    return "\n".join(lines)


# -- the chart ----------------------------------------------------------------------------


def chart_svg(
    points: Sequence[StepTime],
    *,
    capacity: int = HISTORY_LENGTH,
    width: int = CHART_WIDTH,
    height: int = CHART_HEIGHT,
) -> str:
    """The step-time chart: one mark per step, time on a log scale, steps across.

    Args:
        points: The steps to draw, oldest first (at most ``capacity`` are drawn: the
            newest).
        capacity: How many steps the chart shows at most (the newest).
        width: Width in CSS pixels (fixed: the chart never resizes with its content).
        height: Height in CSS pixels, legend included.

    Returns:
        An ``<svg>`` element as a string. Without points, the empty axes and the words
        "no steps yet".
    """
    points = list(points)[-capacity:]
    left, right, top, legend_h, axis_h = 60, 10, 8, 18, 30
    bottom = height - legend_h - axis_h
    plot_w = width - left - right
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' role='img' aria-label='step times' "
        "style='font-family:sans-serif;display:block'>",
        f"<rect x='{left}' y='{top}' width='{plot_w}' height='{bottom - top}' "
        "fill='#fafafa' stroke='#ccc'/>",
        f"<text x='{left + plot_w / 2:.1f}' y='{bottom + axis_h - 4}' font-size='11' "
        f"fill='{_MUTED}' text-anchor='middle'>step</text>",
        f"<text x='10' y='{(top + bottom) / 2:.1f}' font-size='11' fill='{_MUTED}' "
        f"text-anchor='middle' transform='rotate(-90 10 {(top + bottom) / 2:.1f})'>"
        "time (log)</text>",
    ]
    if not points:
        parts.append(
            f"<text x='{left + plot_w / 2:.1f}' y='{(top + bottom) / 2 + 4:.1f}' "
            f"font-size='12' fill='{_MUTED}' text-anchor='middle'>no steps yet</text></svg>"
        )
        return "".join(parts)

    floor = 1e-6  # a step shorter than a microsecond is drawn at 1 us
    values = [max(p.seconds, floor) for p in points]
    low = 10 ** math.floor(math.log10(min(values)))
    high = 10 ** math.ceil(math.log10(max(values)))
    if high <= low:
        high = low * 10
    span = math.log10(high) - math.log10(low)

    def y_of(seconds: float) -> float:
        share = (math.log10(max(seconds, floor)) - math.log10(low)) / span
        return bottom - share * (bottom - top)

    decades = round(span)
    every = 1 if decades <= 4 else 2
    # Decades, labelled; within a single decade also 2x and 5x, so the axis reads finely.
    ticks = [(low * 10**k, True) for k in range(0, decades + 1, every)]
    if decades == 1:
        ticks += [(low * 2, True), (low * 5, True)]
    for value, labelled in ticks:
        y = y_of(value)
        parts.append(
            f"<line x1='{left}' y1='{y:.1f}' x2='{left + plot_w}' y2='{y:.1f}' stroke='#e4e4e4'/>"
        )
        if labelled:
            parts.append(
                f"<text x='{left - 4}' y='{y + 4:.1f}' font-size='10' fill='{_MUTED}' "
                f"text-anchor='end'>{_tick_label(value)}</text>"
            )

    # The points spread over the whole width, the oldest at the left edge and the newest
    # at the right edge (a single point sits at the right).
    inset = 6
    dx = (plot_w - 2 * inset) / max(len(points) - 1, 1)
    x0 = left + inset if len(points) > 1 else left + plot_w - inset

    def x_of(i: int) -> float:
        return x0 + i * dx

    coords = [(x_of(i), y_of(p.seconds)) for i, p in enumerate(points)]
    if len(coords) > 1:
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        parts.append(f"<polyline points='{line}' fill='none' stroke='#b0bec5' stroke-width='1'/>")
    for (x, y), point in zip(coords, points, strict=True):
        parts.append(_mark(x, y, point))
    # Step numbers of the oldest and the newest point.
    for i in {0, len(points) - 1}:
        step = points[i].step
        if step is not None:
            anchor = "end" if i == len(points) - 1 else "start"
            parts.append(
                f"<text x='{x_of(i):.1f}' y='{bottom + 13}' font-size='10' fill='{_MUTED}' "
                f"text-anchor='{anchor}'>{step}</text>"
            )
    parts.append(_legend(points, height))
    parts.append("</svg>")
    return "".join(parts)


def _mark(x: float, y: float, point: StepTime) -> str:
    title = f"<title>{html.escape(point.describe())}</title>"
    colour = COLOURS["failed"] if point.failures else COLOURS.get(point.kind, "#555")
    if point.stalled:  # hollow, in the stall colour, ringed by the kind's colour
        return (
            f"<circle class='mlp-mark mlp-stalled' cx='{x:.1f}' cy='{y:.1f}' r='4' "
            f"fill='white' stroke='{COLOURS['stalled']}' stroke-width='2' "
            f"stroke-dasharray='2 1.5'>{title}</circle>"
        )
    return (
        f"<circle class='mlp-mark mlp-{point.kind}' cx='{x:.1f}' cy='{y:.1f}' r='3' "
        f"fill='{colour}'>{title}</circle>"
    )


def _legend(points: Sequence[StepTime], height: int) -> str:
    present = {p.kind for p in points if not p.stalled}  # a stalled mark is hollow
    names = [k for k in ("asyncio", "threading", "sequential") if k in present]
    if any(p.failures for p in points):
        names.append("failed")
    if any(p.stalled for p in points):
        names.append("stalled")
    y = height - 5
    x = 8
    out = []
    for name in names:
        label = "stalled (loop busy)" if name == "stalled" else name
        fill, stroke = (
            ("white", COLOURS["stalled"]) if name == "stalled" else (COLOURS[name], "none")
        )
        out.append(
            f"<circle cx='{x + 4}' cy='{y - 4}' r='4' fill='{fill}' stroke='{stroke}' "
            f"stroke-width='2'/><text x='{x + 12}' y='{y}' font-size='11' "
            f"fill='#555'>{label}</text>"
        )
        x += 24 + 6 * len(label)
    return "".join(out)
