"""Mesa's own test suite, from the sdist of the installed Mesa, with our patch installed.

With parallel stepping off (no model has a ``parallel_stepping`` attribute) every Mesa
test must pass exactly as without the patch. With it on for every model, in each mode,
only the tests listed in ``tests/mesa_suite/flag_on_failures.py`` may fail; the same
list is in ``docs/mesa-suite.md``. The suite runs in a subprocess; see
``tests/mesa_suite/harness.py`` for how it is fetched, cached and run, and for which
tests are left out and why. If the sdist cannot be downloaded, these tests fail.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest


def _load_harness() -> ModuleType:
    # Loaded by path: tests/ is not a package, and the harness must not depend on
    # pytest's import mode to be found.
    name = "_mesa_suite_harness"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).with_name("mesa_suite") / "harness.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


harness = _load_harness()
known = harness.flag_on_failures
DOCS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "mesa-suite.md"


def _suite() -> Path:
    try:
        return harness.fetch_suite()
    except harness.SuiteUnavailableError as exc:
        message = str(exc)
    # Outside the except block, so the message is not printed twice (chained).
    pytest.fail(f"Mesa's own test suite is unavailable:\n{message}", pytrace=False)


def _where(run) -> str:
    return f"\n(full log: {run.log})\n{run.tail()}"


def _check_report(run, *, force_on: bool, mode: str = "asyncio") -> None:
    """The plugin's own findings: it ran, the patch held to the end, the flag held."""
    assert run.report is not None, f"the patch plugin wrote no report{_where(run)}"
    assert run.report["force_on"] is force_on, run.report
    if force_on:
        assert run.report["mode"] == mode, run.report
    assert run.report["patch_at_start"], run.report
    assert run.report["patch_at_end"], run.report
    assert run.report["problems"] == [], run.report
    assert len(run.report["patched_classes"]) >= 1, run.report


def _check_run(run, min_passed: int) -> None:
    where = _where(run)
    assert run.returncode == 0, f"Mesa's suite failed with exit code {run.returncode}{where}"
    assert run.counts.get("failed", 0) == 0, f"failures: {run.counts}{where}"
    assert run.counts.get("error", 0) == 0, f"errors: {run.counts}{where}"
    assert run.counts.get("passed", 0) >= min_passed, (
        f"only {run.counts.get('passed', 0)} passed, expected at least {min_passed}{where}"
    )
    _check_report(run, force_on=False)


def test_mesa_agentset_tests_pass_with_patch_installed():
    run = harness.run_suite(harness.AGENTSET_TESTS, suite=_suite())
    _check_run(run, harness.AGENTSET_MIN_PASSED)
    # These modules are never excluded: nothing of them may be deselected.
    assert run.counts.get("deselected", 0) == 0, run.counts
    assert run.counts.get("skipped", 0) == 0, run.counts


def test_mesa_whole_suite_passes_with_patch_installed():
    run = harness.run_suite(harness.WHOLE_SUITE, suite=_suite())
    _check_run(run, harness.min_passed_whole(run.excluded))
    # Say which tests would run with more packages installed (a warning, not a skip).
    by_reason: dict[str, list[str]] = {}
    for exclusion in run.excluded:
        if exclusion.unless_importable:
            by_reason.setdefault(exclusion.reason, []).append(exclusion.target)
    for reason, targets in by_reason.items():
        warnings.warn(f"Mesa's tests not run ({reason}): {', '.join(targets)}", stacklevel=1)


@pytest.mark.parametrize("mode", harness.MODES)
def test_mesa_whole_suite_with_parallel_stepping_on(mode):
    """Every model steps in parallel: only the known failures of ``mode`` may fail."""
    run = harness.run_suite(
        harness.WHOLE_SUITE, force_on=True, mode=mode, stop_first=False, suite=_suite()
    )
    where = _where(run)
    # The run completed: pytest's exit code is 0 (all passed) or 1 (some failed).
    assert run.returncode in {0, 1}, f"the run did not complete: exit {run.returncode}{where}"
    assert run.counts, f"no pytest summary{where}"
    _check_report(run, force_on=True, mode=mode)
    # The plugin saw every failure and error that pytest counted.
    failing_reports = run.counts.get("failed", 0) + run.counts.get("error", 0)
    assert len(run.report["failed"]) == failing_reports, (run.report["failed"], run.counts)

    expected = known.known_failures(mode)
    unexpected = [test for test in run.failed_tests if test not in expected]
    assert not unexpected, (
        f"failed with parallel stepping on ({mode}) and not listed for {mode} in "
        f"tests/mesa_suite/flag_on_failures.py: {unexpected}{where}"
    )
    # Known failures may pass; everything else must pass (an empty run cannot).
    runnable_known = [test for test in expected if not any(e.covers(test) for e in run.excluded)]
    min_passed = harness.min_passed_whole(run.excluded) - len(runnable_known)
    assert run.counts.get("passed", 0) >= min_passed, (
        f"only {run.counts.get('passed', 0)} passed, expected at least {min_passed}{where}"
    )


def test_flag_on_failures_are_well_formed():
    assert known.FLAG_ON_FAILURES
    for test, (modes, reason) in known.FLAG_ON_FAILURES.items():
        assert test.startswith("tests/"), test
        assert "::" in test, test
        assert modes, test
        assert modes <= set(known.MODES), (test, modes)
        assert reason.strip(), test
        assert reason.endswith("."), (test, reason)
    for mode in known.MODES:
        assert set(known.known_failures(mode)) <= set(known.FLAG_ON_FAILURES)
    with pytest.raises(ValueError, match="mode"):
        known.known_failures("sequential")


def _docs_table() -> dict[str, set[str]]:
    """The rows of the docs page's table: test id -> the modes in its second column."""
    rows: dict[str, set[str]] = {}
    for line in DOCS_PAGE.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|") or len(cells) < 3 or "::" not in cells[0]:
            continue
        test = cells[0].strip("`")
        assert test not in rows, f"{test} is listed twice in {DOCS_PAGE.name}"
        rows[test] = {mode.strip().strip("`") for mode in cells[1].split(",")}
    return rows


def test_docs_list_every_flag_on_failure():
    """docs/mesa-suite.md's table and flag_on_failures.py name the same tests and modes."""
    rows = _docs_table()
    for test, (modes, _reason) in known.FLAG_ON_FAILURES.items():
        assert test in rows, f"{test} is not in the table of {DOCS_PAGE}"
        assert rows[test] == set(modes), (
            f"{DOCS_PAGE.name} gives modes {sorted(rows[test])} for {test}, "
            f"flag_on_failures.py {sorted(modes)}"
        )
    extra = sorted(set(rows) - set(known.FLAG_ON_FAILURES))
    assert not extra, f"in {DOCS_PAGE.name} but not in flag_on_failures.py: {extra}"
