"""Mesa's own test suite, from the sdist of the installed Mesa, with our patch installed.

Parallel stepping stays off (no model has a ``parallel_stepping`` attribute), so every
Mesa test must pass exactly as without the patch. The suite runs in a subprocess; see
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


def _suite() -> Path:
    try:
        return harness.fetch_suite()
    except harness.SuiteUnavailableError as exc:
        message = str(exc)
    # Outside the except block, so the message is not printed twice (chained).
    pytest.fail(f"Mesa's own test suite is unavailable:\n{message}", pytrace=False)


def _check_run(run, min_passed: int) -> None:
    where = f"\n(full log: {run.log})\n{run.tail()}"
    assert run.returncode == 0, f"Mesa's suite failed with exit code {run.returncode}{where}"
    assert run.counts.get("failed", 0) == 0, f"failures: {run.counts}{where}"
    assert run.counts.get("error", 0) == 0, f"errors: {run.counts}{where}"
    assert run.counts.get("passed", 0) >= min_passed, (
        f"only {run.counts.get('passed', 0)} passed, expected at least {min_passed}{where}"
    )
    # The plugin's own findings: it ran, the patch held to the end, the flag stayed off.
    assert run.report is not None, f"the patch plugin wrote no report{where}"
    assert run.report["force_on"] is False
    assert run.report["patch_at_start"], run.report
    assert run.report["patch_at_end"], run.report
    assert run.report["problems"] == [], run.report
    assert len(run.report["patched_classes"]) >= 1, run.report


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
