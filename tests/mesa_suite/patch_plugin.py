"""Pytest plugin that runs Mesa's own test suite with our ``shuffle_do`` patch installed.

Loaded into the inner pytest run with ``-p patch_plugin`` (the harness puts this folder
on ``PYTHONPATH``). It:

* installs the patch at session start with
  :func:`mesa_llm_parallel.enable_automatic_parallel_stepping` and checks that every
  concrete Mesa agent-set class now carries it, and that ``mesa`` is the installed
  package rather than a copy next to the tests;
* with ``MESA_LLM_PARALLEL_FORCE_ON=1``, sets ``mesa.Model.parallel_stepping = True`` as
  a class attribute, so every model of the suite steps its agents in parallel
  (``MESA_LLM_PARALLEL_MODE`` picks ``asyncio``, the default, or ``threading``);
  otherwise checks that ``Model`` has no such attribute (parallel stepping off);
* after each test's call and after its teardown, checks that the patched functions are
  still in place. A test that replaces ``shuffle_do`` and puts it back (a monkeypatch)
  is only reported; one that leaves it replaced is reported, the patch is put back for
  the remaining tests, and the session fails;
* offers ``--mesa-suite-deselect NODEID``, an exact-match ``--deselect``;
* records every failing test report (call, setup, teardown or collection), so the
  harness can tell which tests failed without parsing the output;
* at session end, checks the patch once more, prints a summary section and, when
  ``MESA_SUITE_REPORT`` names a file, writes the findings there as JSON for the harness.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import mesa
import pytest

import mesa_llm_parallel

FORCE_ON_ENV = "MESA_LLM_PARALLEL_FORCE_ON"
MODE_ENV = "MESA_LLM_PARALLEL_MODE"
REPORT_ENV = "MESA_SUITE_REPORT"

_TRUE = {"1", "true", "yes", "on"}


@dataclasses.dataclass
class PatchState:
    """What the plugin installed and what it found during the session."""

    force_on: bool
    mode: str
    mesa_version: str
    mesa_file: str
    #: Mesa's agent-set class -> the patched ``shuffle_do`` installed on it.
    patched: dict[type, Callable[..., Any]]
    patch_at_start: bool = False
    patch_at_end: bool = False
    flag_at_end_ok: bool = False
    #: (test id, phase, problem) for each test during which the patch was not in place.
    replaced_during: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    #: (test id, problem) for each test that left the patch replaced after its teardown.
    left_replaced: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: (test id, phase) for each failing report: phase is ``call`` (counted by pytest as
    #: failed), ``setup`` or ``teardown`` (an error), or ``collect`` (a collection error).
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def problems(self) -> list[str]:
        """Findings that make the session fail."""
        found = [f"{test}: {problem}" for test, problem in self.left_replaced]
        if not self.patch_at_end:
            found.append("the patch was not installed at session end")
        if not self.flag_at_end_ok:
            found.append(
                "mesa.Model.parallel_stepping was changed during the session "
                f"(expected {'True' if self.force_on else 'no attribute'})"
            )
        return found

    def as_json(self) -> dict[str, Any]:
        """The findings as plain data for the harness."""
        return {
            "force_on": self.force_on,
            "mode": self.mode,
            "mesa_version": self.mesa_version,
            "mesa_file": self.mesa_file,
            "patched_classes": sorted(f"{c.__module__}.{c.__qualname__}" for c in self.patched),
            "patch_at_start": self.patch_at_start,
            "patch_at_end": self.patch_at_end,
            "flag_at_end_ok": self.flag_at_end_ok,
            "replaced_during": [list(entry) for entry in self.replaced_during],
            "left_replaced": [list(entry) for entry in self.left_replaced],
            "failed": [list(entry) for entry in self.failed],
            "problems": self.problems(),
        }


_STATE = pytest.StashKey[PatchState]()

#: Deselects exactly the test ids given; pytest's own ``--deselect`` matches id prefixes,
#: so ``--deselect x.py::test_a`` would also drop ``x.py::test_a_variant``.
DESELECT_OPTION = "--mesa-suite-deselect"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the exact-match deselect option."""
    parser.addoption(
        DESELECT_OPTION,
        action="append",
        default=[],
        metavar="NODEID",
        help="deselect exactly this test id (may be repeated)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the tests named with the exact-match deselect option."""
    wanted = set(config.getoption(DESELECT_OPTION))
    if not wanted:
        return
    dropped = [item for item in items if item.nodeid in wanted]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item.nodeid not in wanted]


def _agent_set_classes() -> list[type]:
    """Mesa's concrete agent-set classes with their own ``shuffle_do``.

    Found independently of the library, so a class the library forgets shows up here.
    """
    import mesa

    # The topmost Mesa class with shuffle_do above the class of a model's own set:
    # AbstractAgentSet since 3.5 (in mesa.agent on 3.5.0), AgentSet before.
    root = next(
        klass
        for klass in reversed(type(mesa.Model().agents).__mro__)
        if klass.__module__.startswith("mesa") and "shuffle_do" in vars(klass)
    )
    seen = [root]
    for klass in seen:
        seen.extend(sub for sub in klass.__subclasses__() if sub not in seen)
    return [
        cls
        for cls in seen
        if "shuffle_do" in cls.__dict__
        and not inspect.isabstract(cls)
        and cls.__module__.split(".")[0] == "mesa"
    ]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _patch_problems(state: PatchState) -> list[str]:
    """What is wrong with the patch right now (empty when all is in place)."""
    problems = [
        f"{cls.__qualname__}.shuffle_do is {cls.__dict__.get('shuffle_do')!r}, not the patch"
        for cls, patched in state.patched.items()
        if cls.__dict__.get("shuffle_do") is not patched
    ]
    if not mesa_llm_parallel.is_automatic_parallel_stepping_enabled():
        problems.append("is_automatic_parallel_stepping_enabled() is False")
    return problems


def _flag_ok(state: PatchState) -> bool:
    if state.force_on:
        return mesa.Model.__dict__.get("parallel_stepping") is True
    return not hasattr(mesa.Model, "parallel_stepping")


def _reinstall(state: PatchState) -> None:
    """Put the patch and the flag back after a test left something else in place."""
    mesa_llm_parallel.enable_automatic_parallel_stepping(mode=state.mode)
    for cls, patched in state.patched.items():
        if cls.__dict__.get("shuffle_do") is not patched:
            cls.shuffle_do = patched
    if state.force_on:
        mesa.Model.parallel_stepping = True
    elif "parallel_stepping" in mesa.Model.__dict__:
        del mesa.Model.parallel_stepping


def pytest_configure(config: pytest.Config) -> None:
    """Install the patch (and, when asked, the class-wide flag) before any test runs."""
    mesa_file = Path(mesa.__file__).resolve()
    if mesa_file.is_relative_to(config.rootpath.resolve()):
        raise pytest.UsageError(
            f"mesa was imported from {mesa_file}, inside the test tree {config.rootpath}; "
            "run a copy of Mesa's tests from outside the unpacked sdist"
        )
    force_on = _env_flag(FORCE_ON_ENV)
    mode = os.environ.get(MODE_ENV, "").strip() or "asyncio"
    if not force_on and hasattr(mesa.Model, "parallel_stepping"):
        raise pytest.UsageError(
            "mesa.Model already has a parallel_stepping attribute; this run must keep "
            "parallel stepping off"
        )

    classes = _agent_set_classes()
    before = {cls: cls.__dict__["shuffle_do"] for cls in classes}
    mesa_llm_parallel.enable_automatic_parallel_stepping(mode=mode)
    patched = {cls: cls.__dict__["shuffle_do"] for cls in classes}
    unchanged = [cls.__qualname__ for cls in classes if patched[cls] is before[cls]]
    if not classes or unchanged:
        raise pytest.UsageError(
            f"mesa_llm_parallel did not patch shuffle_do on {unchanged or 'any class'} "
            f"(Mesa agent-set classes found: {[c.__qualname__ for c in classes]})"
        )
    if force_on:
        mesa.Model.parallel_stepping = True

    state = PatchState(
        force_on=force_on,
        mode=mode,
        mesa_version=getattr(mesa, "__version__", "?"),
        mesa_file=str(mesa_file),
        patched=patched,
    )
    problems = _patch_problems(state)
    if problems:
        raise pytest.UsageError("patch not in place at session start: " + "; ".join(problems))
    state.patch_at_start = True
    config.stash[_STATE] = state
    config.pluginmanager.register(_FailureRecorder(state), "mesa_suite_failure_recorder")


class _FailureRecorder:
    """Notes each failing report in the session's :class:`PatchState`."""

    def __init__(self, state: PatchState) -> None:
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """A failing setup, call or teardown of a test."""
        if report.failed:
            self.state.failed.append((report.nodeid, report.when))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        """A module or class that could not be collected."""
        if report.failed:
            self.state.failed.append((report.nodeid, "collect"))


def pytest_report_header(config: pytest.Config) -> str:
    """Say in the run's header what was installed."""
    state = config.stash[_STATE]
    flag = f"ON for every model (mode={state.mode})" if state.force_on else "off"
    names = ", ".join(sorted(c.__qualname__ for c in state.patched))
    return (
        f"mesa_llm_parallel: patch installed on {names}; parallel stepping {flag}; "
        f"mesa {state.mesa_version} from {state.mesa_file}"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Note a test that runs with the patch replaced (restored by its teardown or not)."""
    try:
        return (yield)
    finally:
        state = item.config.stash[_STATE]
        state.replaced_during.extend(
            (item.nodeid, "call", problem) for problem in _patch_problems(state)
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    """After the test's fixtures are torn down, the patch must be back in place."""
    try:
        return (yield)
    finally:
        state = item.config.stash[_STATE]
        problems = _patch_problems(state)
        if not _flag_ok(state):
            problems.append("mesa.Model.parallel_stepping was changed")
        if problems:
            state.left_replaced.extend((item.nodeid, problem) for problem in problems)
            _reinstall(state)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Check the patch a last time, fail the session on problems, write the report."""
    state = session.config.stash.get(_STATE, None)
    if state is None:
        return
    state.patch_at_end = not _patch_problems(state)
    state.flag_at_end_ok = _flag_ok(state)
    if state.problems() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    report = os.environ.get(REPORT_ENV)
    if report:
        Path(report).write_text(json.dumps(state.as_json(), indent=2), encoding="utf-8")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print what the plugin found, so a log shows it without the JSON report."""
    state = terminalreporter.config.stash.get(_STATE, None)
    if state is None:
        return
    write = terminalreporter.write_line
    terminalreporter.section("mesa_llm_parallel patch")
    flag = f"ON (mode={state.mode})" if state.force_on else "off"
    write(f"parallel stepping: {flag}; patch in place at session end: {state.patch_at_end}")
    for test, phase, problem in state.replaced_during:
        write(f"replaced during {phase} of {test}: {problem}")
    for problem in state.problems():
        write(f"PROBLEM: {problem}", red=True)
