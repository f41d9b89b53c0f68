"""The %parallel_stepping magic, driven through a real IPython shell (no kernel)."""

from __future__ import annotations

import pytest
from IPython import get_ipython
from IPython.core.error import UsageError
from IPython.testing.globalipapp import start_ipython
from mesa.agentset import _HardKeyAgentSet
from models import BothAgent, ToyModel

import mesa_llm_parallel as mlp

ORIGINAL = _HardKeyAgentSet.__dict__["shuffle_do"]


@pytest.fixture
def ip():
    shell = start_ipython() or get_ipython()  # the first call starts it, later ones return None
    shell.run_line_magic("load_ext", "mesa_llm_parallel")
    shell.user_ns["m"] = ToyModel(6, BothAgent, parallel=None, delay=0.005)
    shell.user_ns["other"] = ToyModel(6, BothAgent, parallel=None, delay=0.005)
    shell.user_ns["x"] = 3
    yield shell
    shell.run_line_magic("unload_ext", "mesa_llm_parallel")
    for name in ("m", "other", "x"):
        shell.user_ns.pop(name, None)


def run(ip, line):
    """Run a line as a notebook cell would; return (success, printed, error)."""
    result = ip.run_cell(line)
    return result.success, result.error_in_exec


def test_on_with_a_model_installs_applies_and_flags_only_that_model(ip, capsys):
    ok, _ = run(ip, "%parallel_stepping on --mode threading --workers 3 --concurrency 2 m")
    assert ok
    assert "parallel stepping on for m" in capsys.readouterr().out
    assert mlp.is_automatic_parallel_stepping_enabled()
    assert (mlp.settings.mode, mlp.settings.max_workers, mlp.settings.max_concurrency) == (
        "threading",
        3,
        2,
    )
    m, other = ip.user_ns["m"], ip.user_ns["other"]
    assert m.parallel_stepping is True
    assert not hasattr(other, "parallel_stepping")
    m.step()
    other.step()
    assert m.tracker.peak == 2
    assert other.tracker.peak == 1


def test_on_without_models_covers_every_model_that_does_not_opt_out(ip):
    ip.user_ns["other"].parallel_stepping = False
    assert run(ip, "%parallel_stepping on")[0]
    m, other = ip.user_ns["m"], ip.user_ns["other"]
    m.step()
    other.step()
    assert m.tracker.peak == 6
    assert other.tracker.peak == 1
    assert run(ip, "%parallel_stepping off")[0]
    assert not mlp.is_automatic_parallel_stepping_enabled()
    assert _HardKeyAgentSet.__dict__["shuffle_do"] is ORIGINAL
    assert mlp.settings.parallel_by_default is False


def test_off_with_a_model_flags_only_that_model(ip):
    run(ip, "%parallel_stepping on m other")
    assert run(ip, "%parallel_stepping off other")[0]
    assert ip.user_ns["m"].parallel_stepping is True
    assert ip.user_ns["other"].parallel_stepping is False
    assert mlp.is_automatic_parallel_stepping_enabled()


def test_status_shows_settings_and_the_last_report(ip, capsys):
    run(ip, "%parallel_stepping on --timeout 2.5 m")
    ip.user_ns["m"].step()
    capsys.readouterr()
    assert run(ip, "%parallel_stepping status")[0]
    out = capsys.readouterr().out
    assert "patch installed: yes" in out
    assert "timeout=2.5 s" in out
    # The same figures as the panels show, as text.
    assert "most recent model:\n  Last step: step 1: " in out
    assert "\n  Model steps so far: 1\n  Last parallel step:\n" in out
    assert "    Agents: 6/6 done, peak " in out
    assert "    Failures: none" in out
    # After a sequential step the report is an older step's, and says so.
    run(ip, "%parallel_stepping off m")
    ip.user_ns["m"].step()
    capsys.readouterr()
    assert run(ip, "%parallel_stepping status m")[0]
    out = capsys.readouterr().out
    assert "m:\n  Last step: step 2: sequential\n  Model steps so far: 2\n" in out
    assert "  Earlier parallel step (step 1, 1 step ago):\n    Wall time: " in out
    assert run(ip, "%parallel_stepping status other")[0]
    assert "other:\n  Model steps so far: 0\n  Last parallel step:\n    none yet" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("%parallel_stepping onn", "expected on, off or status first, got 'onn'"),
        ("%parallel_stepping", "expected on, off or status first, got 'nothing'"),
        ("%parallel_stepping on --workers 0", "expected a number >= 1, got '0'"),
        ("%parallel_stepping on --workers four", "expected a whole number, got 'four'"),
        ("%parallel_stepping on --concurrency -2", "expected a number >= 1, got '-2'"),
        ("%parallel_stepping on --concurrency 0", ">= 1, got '0' (or none for no cap)"),
        ("%parallel_stepping on --timeout 0", "expected a positive number of seconds, got '0'"),
        ("%parallel_stepping on --mode parallel", "invalid choice: 'parallel'"),
        ("%parallel_stepping on --colour red", "unrecognized arguments: --colour red"),
        ("%parallel_stepping on modle", "no variable named 'modle'"),
        ("%parallel_stepping on x", "'x' is not a Mesa model (it is of type int)"),
        ("%parallel_stepping on m x", "'x' is not a Mesa model"),
        ("%parallel_stepping status --workers 3", "status takes no options"),
        ("%parallel_stepping status m other", "status takes one model at most, got 2: m other"),
        ("%parallel_stepping on --rate-limit abc", "number of agent starts per second, got 'abc'"),
        ("%parallel_stepping on 'm", "No closing quotation"),
    ],
)
def test_bad_input_is_a_one_line_usage_error_and_changes_nothing(ip, line, message):
    run(ip, "%parallel_stepping on --workers 5 other")
    before = (mlp.settings.snapshot(), mlp.is_automatic_parallel_stepping_enabled())
    ok, error = run(ip, line)
    assert not ok
    assert isinstance(error, UsageError)
    assert message in str(error)
    assert "\n" not in str(error)
    assert (mlp.settings.snapshot(), mlp.is_automatic_parallel_stepping_enabled()) == before
    assert not hasattr(ip.user_ns["m"], "parallel_stepping")


def test_cell_magic_applies_for_one_cell_and_restores(ip):
    ip.user_ns["other"].parallel_stepping = False
    ok, _ = run(
        ip,
        "%%parallel_stepping --mode threading --workers 2 m\n"
        "import mesa_llm_parallel as mlp\n"
        "inside = (mlp.settings.mode, mlp.settings.max_workers, m.parallel_stepping)\n"
        "m.step()\n",
    )
    assert ok
    assert ip.user_ns["inside"] == ("threading", 2, True)
    assert ip.user_ns["m"].tracker.peak == 2
    assert (mlp.settings.mode, mlp.settings.max_workers) == ("asyncio", mlp.DEFAULT_MAX_WORKERS)
    assert not mlp.is_automatic_parallel_stepping_enabled()
    assert not hasattr(ip.user_ns["m"], "parallel_stepping")
    assert ip.user_ns["other"].parallel_stepping is False


def test_cell_magic_restores_after_the_cell_fails(ip):
    run(ip, "%parallel_stepping on --workers 7")
    ip.run_cell("%%parallel_stepping off --workers 3 m\nraise ValueError('cell failed')\n")
    assert mlp.settings.max_workers == 7
    assert mlp.settings.parallel_by_default is True
    assert mlp.is_automatic_parallel_stepping_enabled()
    assert not hasattr(ip.user_ns["m"], "parallel_stepping")


def test_cell_magic_rejects_status(ip):
    ok, error = run(ip, "%%parallel_stepping status\npass\n")
    assert not ok
    assert "not status" in str(error)


def test_help_shows_the_usage(ip, capsys):
    ip.run_cell("%parallel_stepping?")
    out = capsys.readouterr().out
    for word in ("on [options] [MODEL ...]", "--workers N", "--concurrency N", "--timeout S"):
        assert word in out


def test_unload_removes_the_magics_and_the_patch(ip):
    run(ip, "%parallel_stepping on")
    ip.run_line_magic("unload_ext", "mesa_llm_parallel")
    assert "parallel_stepping" not in ip.magics_manager.magics["line"]
    assert "parallel_stepping" not in ip.magics_manager.magics["cell"]
    assert _HardKeyAgentSet.__dict__["shuffle_do"] is ORIGINAL
    ip.run_line_magic("load_ext", "mesa_llm_parallel")  # the fixture unloads it again
