"""A live Jupyter panel to run one Mesa model and steer parallel stepping.

Core object: :class:`ParallelSteppingPanel`, an ipywidgets ``VBox``::

    from mesa_llm_parallel.widgets import ParallelSteppingPanel

    panel = ParallelSteppingPanel(model)
    panel          # the last expression of a cell displays it

The panel switches ``model.parallel_stepping`` (this model only), sets the process-wide
``mode``, ``max_workers`` and ``max_concurrency`` settings, shows the figures of the
latest step report with a chart of recent step times, and runs steps in a background
thread of its own so that the notebook, and the panel's controls, stay responsive while
the model runs.

Needs ipywidgets (``pip install "mesa_llm_parallel[jupyter]"``); the rest of the
package never imports it.
"""

from __future__ import annotations

import contextlib
import contextvars
import html
import os
import queue
import threading
import time
import traceback
import weakref
from collections import deque
from typing import Any, Final

try:
    import ipywidgets as widgets
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "mesa_llm_parallel.widgets needs ipywidgets, which is not installed; "
        'install it with: pip install "mesa_llm_parallel[jupyter]"'
    ) from exc

from mesa_llm_parallel._display import (
    CHART_WIDTH,
    COLOURS,
    HISTORY_LENGTH,
    StepTime,
    chart_svg,
    figures,
    figures_html,
)
from mesa_llm_parallel._loops import wait_event
from mesa_llm_parallel._report import (
    StepReport,
    add_step_callback,
    last_report_step,
    last_step_report,
    remove_step_callback,
    step_number,
)
from mesa_llm_parallel._settings import MODES, settings
from mesa_llm_parallel.parallel_stepping import (
    is_automatic_parallel_stepping_enabled,
    set_parallel_stepping,
    wants_parallel_stepping,
)

__all__ = ["THREAD_PRESETS", "ParallelSteppingPanel", "StepTime"]

#: How many recent step times the chart shows.
CHART_LENGTH: Final = HISTORY_LENGTH

#: The pool sizes the "Threads" slider offers, on a doubling scale (a size set elsewhere,
#: such as ``settings.max_workers = 12``, is added to them while it is the setting).
THREAD_PRESETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: Largest number of steps one run may be asked for.
_STEPS_MAX: Final = 10_000_000

_PARALLEL_COLOUR: Final = COLOURS["asyncio"]
_ERROR_COLOUR: Final = "#c62828"

# Every open panel, so that a setting changed in one shows at once in the others.
# Weak: a panel that is no longer referenced anywhere is not kept alive by this set.
_open_panels: weakref.WeakSet[ParallelSteppingPanel] = weakref.WeakSet()
_open_panels_lock = threading.Lock()


def _reset_after_fork() -> None:
    """In a forked child: no panel runs there (their threads are the parent's)."""
    global _open_panels, _open_panels_lock  # noqa: PLW0603
    _open_panels = weakref.WeakSet()
    _open_panels_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def _refresh_other_panels(changed: ParallelSteppingPanel) -> None:
    """Refresh every open panel but ``changed`` (which must not hold its lock)."""
    with _open_panels_lock:
        others = [panel for panel in _open_panels if panel is not changed]
    for panel in others:
        panel.refresh()


def _make_step_callback(panel: ParallelSteppingPanel, model: Any) -> Any:
    """A step callback that forwards ``model``'s reports to ``panel``.

    It holds both only weakly: the library keeps callbacks in module state until they
    are removed, and a strong reference there would keep the model alive.
    """
    panel_ref = weakref.ref(panel)
    model_ref = weakref.ref(model)

    def on_parallel_step(stepped_model: Any, report: StepReport) -> None:
        if stepped_model is not model_ref():
            return  # another model's step
        owner = panel_ref()
        if owner is not None:
            owner._on_step_report(report)

    return on_parallel_step


class ParallelSteppingPanel(widgets.VBox):
    """A live panel for one model: parallel stepping switch, settings, figures, runs.

    Controls:

    * **Parallel stepping** sets ``model.parallel_stepping`` for this model only;
      switching it on also patches Mesa's ``shuffle_do`` if that is not done yet.
    * **Mode**, **Threads** and **Max in flight (0 = no cap)** set
      ``settings.mode``, ``settings.max_workers`` and ``settings.max_concurrency``.
      These are process-wide: they apply to every model, from the next step on.
    * **Steps**, **Run**, **Pause**, **Step** run the model in the background.

    The figures come from :func:`~mesa_llm_parallel.last_step_report`, under a heading
    that says whether they are the last step's or an earlier parallel step's. The chart
    shows the last 50 step times on a logarithmic time axis (parallel steps from their
    reports, sequential steps run by the panel timed around ``model.step()``); a step
    that mostly waited for a busy event loop, such as the kernel's during a running
    cell, is drawn hollow and marked "stalled". Both are drawn by the same code as the
    Solara component's (``mesa_llm_parallel._display``). After every step, and whenever one of its
    controls changes, the panel re-reads the settings and the model's flag, so several
    panels and the ``%parallel_stepping`` magic stay in agreement.

    Example:
        >>> panel = ParallelSteppingPanel(model)  # doctest: +SKIP
        >>> panel                                 # display it (last line of a cell)
        >>> panel.run(100); panel.wait()          # or drive it from code

    Note:
        Runs happen on one daemon thread per panel, created at the first run and kept
        until :meth:`close`, so an asyncio-mode model keeps the same event loop from one
        run to the next. A blocking notebook cell cannot receive widget changes until it
        ends; a run in the background can: controls changed during a run apply from the
        next step. :meth:`pause` stops a run after the current step; a step already
        running is never interrupted. Do not step the same model from a cell while the
        panel runs it.

    Args:
        model: The Mesa model to show and run. The panel keeps a reference to it
            until :meth:`close`.
        **kwargs: Passed on to :class:`ipywidgets.VBox` (``layout`` and the like).

    Raises:
        TypeError: When ``model`` cannot be referenced weakly.

    Attributes:
        parallel_toggle: The "Parallel stepping" checkbox (this model).
        mode_selector: The "Mode" buttons (process-wide).
        threads_slider: The "Threads" slider (process-wide): a ``SelectionSlider`` over
            :data:`THREAD_PRESETS`, plus the current ``settings.max_workers`` when it is
            not one of them.
        cap_input: The "Max in flight (0 = no cap)" box (process-wide).
        steps_input: How many steps "Run" runs.
        run_button: Runs ``steps_input.value`` steps.
        pause_button: Stops the run after the current step.
        step_button: Runs one step.
        figures_html: The figures of the latest steps.
        chart_html: The chart of recent step times (inline SVG).
        status_html: One line: what the panel is doing, or the latest error.
        notice_html: One line: the latest change made with a control, and when (runs
            do not overwrite it).
        traceback_html: The traceback of a failed run (hidden when there is none).
    """

    def __init__(self, model: Any, **kwargs: Any) -> None:
        try:
            weakref.ref(model)
        except TypeError:
            raise TypeError(
                f"ParallelSteppingPanel needs a model that supports weak references, "
                f"got {type(model).__name__}"
            ) from None
        super().__init__(**kwargs)
        self._callback: Any = None
        self._model: Any = model
        self._ui_lock = threading.RLock()  # serialises reading and writing the widgets
        self._syncing = False  # True while the panel sets its own controls
        self._closed = False
        self._history: deque[StepTime] = deque(maxlen=CHART_LENGTH)
        self._reports_seen = 0
        self._last_error: BaseException | None = None
        # The runner: one persistent daemon thread fed through a queue.
        self._run_lock = threading.Lock()
        self._busy = False
        self._idle = threading.Event()
        self._idle.set()
        self._pause_requested = threading.Event()
        # A run request: its step count and the context of the code that asked for it
        # (a cell's context variables reach the agents, as in a step run in the cell).
        self._requests: queue.SimpleQueue[tuple[int, contextvars.Context] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None

        self._build()
        self.refresh()
        self._callback = add_step_callback(_make_step_callback(self, model))
        with _open_panels_lock:
            _open_panels.add(self)

    # -- layout -----------------------------------------------------------------------
    def _build(self) -> None:
        wide = {"description_width": "initial"}
        self.parallel_toggle = widgets.Checkbox(
            value=False,
            description="Parallel stepping",
            indent=False,
            layout=widgets.Layout(width="auto", margin="0 12px 0 0"),
        )
        self._state_html = widgets.HTML()
        explain = "<span style='color:#666;font-size:90%'>{}</span>".format
        self.mode_selector = widgets.ToggleButtons(
            options=list(MODES),
            description="Mode",
            tooltips=[
                "async def astep runs on an event loop; sync agents in the thread pool",
                "every agent's step runs in the thread pool",
            ],
            style={**wide, "button_width": "90px"},
        )
        self.threads_slider = widgets.SelectionSlider(
            options=list(THREAD_PRESETS),
            value=THREAD_PRESETS[0],
            description="Threads",
            continuous_update=False,
            style=wide,
            layout=widgets.Layout(width="340px"),
        )
        # Not bounded: a bounded box would turn a mistyped -4 into 0, which means no cap.
        self.cap_input = widgets.IntText(
            description="Max in flight (0 = no cap)",
            style=wide,
            layout=widgets.Layout(width="250px"),
        )
        self.steps_input = widgets.BoundedIntText(
            value=10,
            min=1,
            max=_STEPS_MAX,
            description="Steps",
            style=wide,
            layout=widgets.Layout(width="150px"),
        )
        self.run_button = widgets.Button(
            description="Run", icon="play", tooltip="Run that many steps in the background"
        )
        self.pause_button = widgets.Button(
            description="Pause",
            icon="pause",
            tooltip="Stop the run after the current step",
            disabled=True,
        )
        self.step_button = widgets.Button(
            description="Step", icon="step-forward", tooltip="Run one step in the background"
        )
        for button in (self.run_button, self.pause_button, self.step_button):
            button.layout = widgets.Layout(width="auto")
        # Fixed widths: the chart stays in place whatever the figures beside it say.
        self.figures_html = widgets.HTML(layout=widgets.Layout(width="340px", margin="0 16px 0 0"))
        self.chart_html = widgets.HTML(layout=widgets.Layout(width=f"{CHART_WIDTH + 4}px"))
        self.status_html = widgets.HTML()
        self.notice_html = widgets.HTML()
        self.traceback_html = widgets.HTML(layout=widgets.Layout(display="none"))

        heading = "<b>{}</b> <span style='color:#666'>{}</span>".format
        children = [
            widgets.HTML(heading("This model", "")),
            widgets.HBox([self.parallel_toggle, self._state_html]),
            widgets.HTML(
                explain(
                    "Sets <code>model.parallel_stepping</code> for this model only; switching "
                    "it on also patches Mesa's <code>shuffle_do</code> if that is not done yet."
                )
            ),
            widgets.HTML(heading("All models in this process", "(from the next step on)")),
            self.mode_selector,
            widgets.HTML(
                explain(
                    "asyncio: agents' <code>astep</code> run on an event loop, and the thread "
                    "pool runs only sync agents. threading: every agent's <code>step</code> "
                    "runs in the thread pool."
                )
            ),
            widgets.HBox([self.threads_slider, self.cap_input]),
            self.notice_html,
            widgets.HTML(heading("Run", "(in the background; the notebook stays usable)")),
            widgets.HBox([self.steps_input, self.run_button, self.pause_button, self.step_button]),
            self.status_html,
            widgets.HBox(
                [self.figures_html, self.chart_html],
                layout=widgets.Layout(align_items="flex-start"),
            ),
            self.traceback_html,
        ]
        self.children = children
        self.add_class("mlp-panel")
        for widget, name in (
            (self.parallel_toggle, "parallel"),
            (self.mode_selector, "mode"),
            (self.threads_slider, "threads"),
            (self.cap_input, "cap"),
            (self.steps_input, "steps"),
            (self.run_button, "run"),
            (self.pause_button, "pause"),
            (self.step_button, "step"),
            (self.figures_html, "figures"),
            (self.chart_html, "chart"),
            (self.status_html, "status"),
            (self.notice_html, "notice"),
        ):
            widget.add_class(f"mlp-{name}")

        self.parallel_toggle.observe(self._on_toggle, names="value")
        self.mode_selector.observe(self._on_mode, names="value")
        self.threads_slider.observe(self._on_threads, names="value")
        self.cap_input.observe(self._on_cap, names="value")
        self.run_button.on_click(self._on_run_click)
        self.pause_button.on_click(self._on_pause_click)
        self.step_button.on_click(self._on_step_click)
        self._set_status("Ready.")

    def _widgets(self) -> list[widgets.Widget]:
        """Every widget the panel made (for closing), containers last."""
        found: list[widgets.Widget] = []

        def walk(widget: widgets.Widget) -> None:
            for child in getattr(widget, "children", ()):
                walk(child)
            found.append(widget)

        for child in self.children:
            walk(child)
        return found

    # -- public API -------------------------------------------------------------------
    @property
    def model(self) -> Any:
        """The model the panel shows, or None once the panel is closed."""
        return self._model

    @property
    def running(self) -> bool:
        """Whether a run is in progress."""
        return self._busy

    @property
    def last_error(self) -> BaseException | None:
        """The exception that stopped the latest run, or None.

        Cleared when the next run starts, and by :meth:`close` (an exception's
        traceback refers to the model).
        """
        return self._last_error

    @property
    def step_times(self) -> tuple[StepTime, ...]:
        """The recent step times the chart shows, oldest first."""
        with self._ui_lock:
            return tuple(self._history)

    def run(self, steps: int | None = None) -> None:
        """Start running ``steps`` steps in the background and return at once.

        Args:
            steps: How many steps; None runs the number in the "Steps" box.

        Raises:
            TypeError: ``steps`` is not an int.
            ValueError: ``steps`` is less than 1.
            RuntimeError: A run is already in progress, or the panel is closed.
        """
        if steps is None:
            steps = self.steps_input.value
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"steps must be an int, got {steps!r} ({type(steps).__name__})")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps!r}")
        with self._run_lock:
            if self._closed:
                raise RuntimeError("the panel is closed; make a new ParallelSteppingPanel")
            if self._busy:
                raise RuntimeError(
                    "the panel is already running; pause() or wait() before starting another run"
                )
            self._busy = True
            self._idle.clear()
            self._pause_requested.clear()
            self._last_error = None
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._runner, name="mesa-llm-parallel-panel", daemon=True
                )
                self._thread.start()
        if steps > 1 and steps != self.steps_input.value and steps <= _STEPS_MAX:
            self.steps_input.value = steps  # the box shows what this run runs (not Step's 1)
        self._show_running(True)
        self._show_traceback(None)
        self._set_status(f"Running {steps} step{'s' if steps != 1 else ''}…")
        self._requests.put((steps, contextvars.copy_context()))

    def step(self) -> None:
        """Run one step in the background (``run(1)``).

        Raises:
            RuntimeError: A run is already in progress, or the panel is closed.
        """
        self.run(1)

    def pause(self) -> None:
        """Stop the current run after the step in progress; does nothing when idle."""
        with self._run_lock:
            if self._busy:
                self._pause_requested.set()
                self._set_status("Pausing after the current step…")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the current run ends (at once when idle).

        Args:
            timeout: Most seconds to wait; None waits for as long as it takes.

        Returns:
            True if no run is in progress any more, False if ``timeout`` ran out.
        """
        return wait_event(self._idle, timeout)

    def refresh(self) -> None:
        """Re-read the settings, the model's flag and its latest report now.

        The panel does this by itself after every step and whenever one of its
        controls changes.
        """
        with self._ui_lock:
            self._refresh_controls()
            self._refresh_figures()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the runner, remove the step callback, close the widgets, drop the model.

        Args:
            timeout: Most seconds to wait for a step in progress to end. A step that
                is still running after that finishes in the background; its thread then
                ends and lets go of the model.
        """
        if getattr(self, "_closed", True):  # closed already, or __init__ did not finish
            with contextlib.suppress(Exception):
                super().close()
            return
        with self._run_lock:
            self._closed = True
        self._pause_requested.set()
        wait_event(self._idle, timeout)
        self._requests.put(None)
        thread, self._thread = self._thread, None
        if thread is not None and self._idle.is_set():
            thread.join(timeout)
        remove_step_callback(self._callback)
        self._callback = None
        with _open_panels_lock:
            _open_panels.discard(self)
        with self._ui_lock:
            self._model = None
            self._last_error = None
            self._history.clear()
        for widget in self._widgets():
            widget.close()
        super().close()

    def __del__(self) -> None:
        # Never block the garbage collector (or interpreter exit) on a running step.
        with contextlib.suppress(Exception):
            self.close(timeout=0)

    # -- the runner -------------------------------------------------------------------
    def _runner(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            steps, context = request
            del request
            message, failed = "Stopped.", True
            try:
                message, failed = context.run(self._run_steps, steps)
            finally:
                # Under the run lock, so that pause() never writes "Pausing..." after the
                # run has ended.
                with self._run_lock:
                    self._set_status(message, error=failed)
                    self._show_running(False)
                    self._busy = False
                self._idle.set()

    def _run_steps(self, steps: int) -> tuple[str, bool]:
        """Run up to ``steps`` steps; return the final status line and whether it failed."""
        model = self._model
        done = 0
        try:
            while done < steps:
                if self._pause_requested.is_set() or model is None:
                    break
                if done:
                    self._set_status(f"Running: {done} of {steps} steps done…")
                with self._ui_lock:
                    reports_before = self._reports_seen
                started = time.perf_counter()
                model.step()
                elapsed = time.perf_counter() - started
                done += 1
                with self._ui_lock:
                    if self._reports_seen == reports_before:  # no parallel step happened
                        point = StepTime(elapsed, parallel=False, step=step_number(model))
                        self._history.append(point)
                if not self._closed:
                    self.refresh()
        except BaseException as exc:  # never lost: shown in the panel and kept
            if self._closed:  # its traceback refers to the model, which close() let go
                return "Stopped.", True
            self._last_error = exc
            self.refresh()
            self._show_traceback(exc)
            return (
                f"Stopped by an error in step {done + 1} of {steps}: {type(exc).__name__}: {exc}",
                True,
            )
        finally:
            del model  # this frame may outlive the run in a traceback
        if self._pause_requested.is_set() and done < steps:
            return f"Paused after {done} of {steps} steps.", False
        return f"Done: {done} step{'s' if done != 1 else ''}.", False

    # -- reacting to steps -------------------------------------------------------------
    def _on_step_report(self, report: StepReport) -> None:
        """Called by the step callback, in the thread that ran the parallel step."""
        with self._ui_lock:
            if self._closed:
                return
            self._reports_seen += 1
            model = self._model
            step = None if model is None else step_number(model)
            self._history.append(StepTime.of_report(report, step))
            self.refresh()

    # -- reacting to controls ----------------------------------------------------------
    def _on_toggle(self, change: dict[str, Any]) -> None:
        with self._ui_lock:
            model = self._model
            if self._syncing or model is None:
                return
            on = bool(change["new"])
            try:
                set_parallel_stepping(model, on)
            except Exception as exc:
                self._set_notice(
                    f"Parallel stepping not changed: {type(exc).__name__}: {exc}", error=True
                )
            else:
                state = "on" if on else "off"
                self._set_notice(f"Parallel stepping {state} for this model, from the next step.")
            self.refresh()
        _refresh_other_panels(self)  # a panel of the same model, or the patch state

    def _on_mode(self, change: dict[str, Any]) -> None:
        self._apply_setting("mode", change["new"], "Mode", str(change["new"]))

    def _on_threads(self, change: dict[str, Any]) -> None:
        self._apply_setting("max_workers", change["new"], "Threads", str(change["new"]))

    def _on_cap(self, change: dict[str, Any]) -> None:
        value = change["new"]
        if value < 0 and not self._syncing:  # refused here: the box's own rule is 0 = no cap
            with self._ui_lock:
                self._set_notice(
                    f"Max in flight not changed: it must be 0 (no cap) or a whole number "
                    f">= 1, got {value}",
                    error=True,
                )
                self.refresh()  # puts the box back to the current setting
            return
        cap = None if value == 0 else value
        self._apply_setting(
            "max_concurrency", cap, "Max in flight", "no cap" if cap is None else str(cap)
        )

    def _apply_setting(self, name: str, value: object, label: str, shown: str) -> None:
        with self._ui_lock:
            if self._syncing or self._model is None:
                return
            try:
                settings.update(**{name: value})
            except Exception as exc:
                self._set_notice(f"{label} not changed: {type(exc).__name__}: {exc}", error=True)
            else:
                self._set_notice(f"{label} set to {shown} for every model, from the next step.")
            self.refresh()  # on an error, this puts the control back to the current setting
        _refresh_other_panels(self)  # outside this panel's lock: never two panel locks at once

    def _on_run_click(self, _button: widgets.Button) -> None:
        self._start_from_button(None)

    def _on_step_click(self, _button: widgets.Button) -> None:
        self._start_from_button(1)

    def _on_pause_click(self, _button: widgets.Button) -> None:
        self.pause()

    def _start_from_button(self, steps: int | None) -> None:
        try:
            self.run(steps)
        except (RuntimeError, TypeError, ValueError) as exc:  # a handler must not raise
            self._set_status(str(exc), error=True)

    # -- drawing ------------------------------------------------------------------------
    def _refresh_controls(self) -> None:
        model = self._model
        if model is None:
            return
        cfg = settings.snapshot()
        flag = wants_parallel_stepping(model)
        cap = cfg.max_concurrency or 0
        with self._ui_lock:
            self._syncing = True
            try:
                self.parallel_toggle.value = flag
                self.mode_selector.value = cfg.mode
                sizes = set(THREAD_PRESETS) | {cfg.max_workers}
                if set(self.threads_slider.options) != sizes:
                    self.threads_slider.options = sorted(sizes)
                self.threads_slider.value = cfg.max_workers
                self.cap_input.value = cap
                self._state_html.value = _state_text(
                    flag, installed=is_automatic_parallel_stepping_enabled()
                )
            finally:
                self._syncing = False

    def _refresh_figures(self) -> None:
        model = self._model
        if model is None:
            return
        report = last_step_report(model)
        history = tuple(self._history)
        shown = figures(
            report, history, steps=step_number(model), report_step=last_report_step(model)
        )
        self.figures_html.value = figures_html(shown)
        self.chart_html.value = chart_svg(history, capacity=CHART_LENGTH)

    def _set_status(self, text: str, *, error: bool = False) -> None:
        if self._closed:
            return
        colour = f"color:{_ERROR_COLOUR};" if error else ""
        self.status_html.value = f"<span style='{colour}'>{html.escape(text)}</span>"

    def _set_notice(self, text: str, *, error: bool = False) -> None:
        """Confirm a change of a control, on a line of its own that runs do not overwrite."""
        if self._closed:
            return
        colour = f"color:{_ERROR_COLOUR};" if error else "color:#2e7d32;"
        stamp = time.strftime("%H:%M:%S")
        self.notice_html.value = (
            f"<span style='{colour}'>{html.escape(text)}</span> "
            f"<span style='color:#666;font-size:85%'>({stamp})</span>"
        )

    def _show_traceback(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        if exc is None:
            self.traceback_html.value = ""
            self.traceback_html.layout.display = "none"
            return
        text = "".join(traceback.format_exception(exc))
        self.traceback_html.value = (
            "<details open><summary>Traceback</summary>"
            "<pre style='font-size:85%;line-height:1.25;white-space:pre-wrap;'>"
            f"{html.escape(text)}</pre></details>"
        )
        self.traceback_html.layout.display = None

    def _show_running(self, running: bool) -> None:
        if self._closed:
            return
        with contextlib.suppress(Exception):  # widgets closed concurrently
            self.run_button.disabled = running
            self.step_button.disabled = running
            self.pause_button.disabled = not running


def _state_text(flag: bool, *, installed: bool) -> str:
    if flag and installed:
        text, colour = "this model steps in parallel", _PARALLEL_COLOUR
    elif flag:
        text = (
            "on, but Mesa's shuffle_do is not patched, so steps run one agent at a time "
            "(switch off and on again to patch it)"
        )
        colour = _ERROR_COLOUR
    else:
        text, colour = "this model steps one agent at a time", "#666"
    return f"<span style='color:{colour}'>{html.escape(text)}</span>"
