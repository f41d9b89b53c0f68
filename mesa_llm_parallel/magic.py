"""The ``%parallel_stepping`` line and cell magic for IPython and Jupyter.

Load it with ``%load_ext mesa_llm_parallel``; ``%unload_ext mesa_llm_parallel`` removes
the magics and uninstalls the patch. ``%parallel_stepping?`` shows the usage.

Every command is checked completely before anything changes: a typo, an unknown
option, a bad number or an unknown variable is a one-line error and leaves the
settings, the patch and the models as they were.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.utils.process import arg_split

from mesa_llm_parallel._display import figures, figures_text
from mesa_llm_parallel._report import (
    last_report_step,
    last_step_report,
    last_stepped_model,
    step_number,
)
from mesa_llm_parallel._settings import ERROR_POLICIES, MODES, settings
from mesa_llm_parallel.parallel_stepping import (
    disable_automatic_parallel_stepping,
    enable_automatic_parallel_stepping,
    is_automatic_parallel_stepping_enabled,
    set_parallel_stepping,
)

__all__ = ["ParallelSteppingMagics", "load_ipython_extension", "unload_ipython_extension"]

_ACTIONS = ("on", "off", "status")
_MISSING = object()

# Option name on the command line -> setting name.
_OPTIONS = {
    "mode": "mode",
    "workers": "max_workers",
    "concurrency": "max_concurrency",
    "timeout": "timeout",
    "rate_limit": "rate_limit",
    "on_error": "on_error",
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def _cap(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or none for no cap)") from None


def _positive_number(text: str, unit: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of {unit}, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of {unit}, got {text!r}")
    return value


def _seconds(text: str) -> float | None:
    return _positive_number(text, "seconds")


def _per_second(text: str) -> float | None:
    return _positive_number(text, "agent starts per second")


def _common_options(func: Any) -> Any:
    decorators = [
        argument(
            "words",
            nargs="*",
            metavar="[on|off|status] [MODEL ...]",
            help="what to do (on, off, status), then the variables of the models it applies to",
        ),
        argument("--mode", choices=MODES, default=_MISSING, help="asyncio or threading"),
        argument(
            "--workers", type=_positive_int, default=_MISSING, metavar="N", help="thread-pool size"
        ),
        argument(
            "--concurrency",
            type=_cap,
            default=_MISSING,
            metavar="N",
            help="most agents in flight at once ('none': no cap)",
        ),
        argument(
            "--timeout",
            type=_seconds,
            default=_MISSING,
            metavar="S",
            help="seconds per agent ('none': no limit)",
        ),
        argument(
            "--rate-limit",
            type=_per_second,
            default=_MISSING,
            metavar="R",
            help="most agent starts per second ('none': no limit)",
        ),
        argument("--on-error", choices=ERROR_POLICIES, default=_MISSING, help="raise or collect"),
    ]
    for decorate in reversed(decorators):
        func = decorate(func)
    return magic_arguments()(func)


@dataclasses.dataclass
class _Command:
    action: str
    values: dict[str, Any]
    models: list[tuple[str, Any]]


@magics_class
class ParallelSteppingMagics(Magics):
    """``%parallel_stepping`` and ``%%parallel_stepping``."""

    # -- parsing ----------------------------------------------------------------------
    def _parse(self, func: Any, line: str, *, default_action: str | None) -> _Command:
        try:
            # Intermixed: options may come before, between or after the model names.
            args = func.parser.parse_intermixed_args(arg_split(line))
        except UsageError as exc:
            raise UsageError(_one_line(str(exc))) from None
        except ValueError as exc:  # unbalanced quotes and the like, from shlex
            raise UsageError(f"%parallel_stepping: {exc}") from None
        words = list(args.words)
        if words and words[0] in _ACTIONS:
            action = words.pop(0)
        elif default_action is not None:
            action = default_action
        else:
            given = words[0] if words else "nothing"
            raise UsageError(
                f"%parallel_stepping: expected on, off or status first, got {given!r} "
                "(see %parallel_stepping?)"
            )
        values = {
            setting: getattr(args, option)
            for option, setting in _OPTIONS.items()
            if getattr(args, option) is not _MISSING
        }
        if action == "status" and values:
            raise UsageError("%parallel_stepping status takes no options")
        if action == "status" and len(words) > 1:
            raise UsageError(
                f"%parallel_stepping status takes one model at most, got {len(words)}: "
                + " ".join(words)
            )
        try:
            values = settings.validate(**values)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"%parallel_stepping: {exc}") from None
        return _Command(action, values, [self._model(name) for name in words])

    def _model(self, name: str) -> tuple[str, Any]:
        namespace = self.shell.user_ns
        if name not in namespace:
            raise UsageError(f"%parallel_stepping: no variable named {name!r} in the namespace")
        model = namespace[name]
        import mesa

        if not isinstance(model, mesa.Model):
            kind = type(model).__name__
            raise UsageError(
                f"%parallel_stepping: {name!r} is not a Mesa model (it is of type {kind})"
            )
        return name, model

    # -- the magics -------------------------------------------------------------------
    @_common_options
    @line_magic
    def parallel_stepping(self, line: str) -> None:
        """Turn parallel stepping on or off, or show its status.

        %parallel_stepping on [options] [MODEL ...]
            Install the patch and apply the options. Named models get
            parallel_stepping = True; with none named, every model that does not set
            parallel_stepping itself steps in parallel.
        %parallel_stepping off [MODEL ...]
            Named models get parallel_stepping = False; with none named, the patch is
            removed and no model steps in parallel.
        %parallel_stepping status [MODEL]
            Settings, patch state and the last step report of the named (or most
            recently stepped) model.
        %%parallel_stepping [on|off] [options] [MODEL ...]
            The same for one cell only; everything is restored afterwards, even when
            the cell fails or is interrupted.
        """
        command = self._parse(self.parallel_stepping, line, default_action=None)
        if command.action == "status":
            print(self._status(command.models))
            return
        _apply(command)
        print(self._summary(command))

    @_common_options
    @cell_magic("parallel_stepping")
    def parallel_stepping_cell(self, line: str, cell: str) -> None:
        """Run one cell with parallel stepping on (or off) and the given options.

        Usage: %%parallel_stepping [on|off] [options] [MODEL ...]
        """
        command = self._parse(self.parallel_stepping_cell, line, default_action="on")
        if command.action == "status":
            raise UsageError("%%parallel_stepping takes on or off, not status")
        saved_settings = settings.snapshot()
        was_installed = is_automatic_parallel_stepping_enabled()
        saved_flags = [
            (model, vars(model).get("parallel_stepping", _MISSING)) for _, model in command.models
        ]
        try:
            _apply(command)
            self.shell.run_cell(cell)
        finally:
            settings.update(**dataclasses.asdict(saved_settings))
            if was_installed:
                enable_automatic_parallel_stepping(mode=saved_settings.mode)
            else:
                disable_automatic_parallel_stepping()
            for model, flag in saved_flags:
                if flag is _MISSING:
                    vars(model).pop("parallel_stepping", None)
                else:
                    model.parallel_stepping = flag

    # -- output -----------------------------------------------------------------------
    def _summary(self, command: _Command) -> str:
        state = "on" if command.action == "on" else "off"
        if command.models:
            target = ", ".join(name for name, _ in command.models)
        elif command.action == "on":
            target = "every model that does not set parallel_stepping"
        else:
            target = "every model (patch removed)"
        return f"parallel stepping {state} for {target}; {_settings_line()}"

    def _status(self, models: list[tuple[str, Any]]) -> str:
        lines = [
            f"patch installed: {'yes' if is_automatic_parallel_stepping_enabled() else 'no'}",
            f"models without parallel_stepping: "
            f"{'parallel' if settings.parallel_by_default else 'sequential'}",
            f"settings: {_settings_line()}",
        ]
        if models:
            name, model = models[0]
        else:
            model = last_stepped_model()
            name = "most recent model" if model is not None else None
        if model is not None:
            flag = vars(model).get("parallel_stepping", _MISSING)
            shown = "not set" if flag is _MISSING else repr(flag)
            lines.append(f"{name}: parallel_stepping {shown}")
            shown = figures(
                last_step_report(model),
                steps=step_number(model),
                report_step=last_report_step(model),
            )
            lines.append(f"{name}:")
            lines.append(textwrap.indent(figures_text(shown), "  "))
        return "\n".join(lines)


def _settings_line() -> str:
    cap = settings.max_concurrency
    timeout = settings.timeout
    rate = settings.rate_limit
    return (
        f"mode={settings.mode}, workers={settings.max_workers}, "
        f"concurrency={'no cap' if cap is None else cap}, "
        f"timeout={'none' if timeout is None else f'{timeout:g} s'}, "
        f"rate_limit={'none' if rate is None else f'{rate:g}/s'}, on_error={settings.on_error}"
    )


def _apply(command: _Command) -> None:
    """Apply a validated command (nothing here can fail on user input)."""
    if command.action == "on":
        values = dict(command.values)
        if not command.models:
            values["parallel_by_default"] = True
        # The mode stays what it is unless --mode was given.
        enable_automatic_parallel_stepping(**{"mode": settings.mode, **values})
        for _, model in command.models:
            set_parallel_stepping(model, True)
        return
    settings.update(**command.values)
    if command.models:
        for _, model in command.models:
            set_parallel_stepping(model, False)
    else:
        settings.parallel_by_default = False
        disable_automatic_parallel_stepping()


def _one_line(message: str) -> str:
    text = " ".join(message.split())
    return text if text.startswith("%") else f"%parallel_stepping: {text}"


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics (``%load_ext mesa_llm_parallel``)."""
    ipython.register_magics(ParallelSteppingMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """Remove the magics and uninstall the patch (``%unload_ext mesa_llm_parallel``)."""
    magics = ipython.magics_manager.magics
    magics["line"].pop("parallel_stepping", None)
    magics["cell"].pop("parallel_stepping", None)
    settings.parallel_by_default = False
    disable_automatic_parallel_stepping()
