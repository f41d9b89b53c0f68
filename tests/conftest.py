"""Shared fixtures: every test starts with Mesa unpatched and default settings."""

from __future__ import annotations

import json
import os
import signal
import sys

import mesa
import pytest

import mesa_llm_parallel as mlp
from mesa_llm_parallel import _placement


def pytest_configure(config):
    # Several tests press Ctrl-C (SIGINT) on purpose. A test run started where SIGINT is
    # ignored (a background job of a non-interactive shell) would inherit that, in this
    # process and in the interpreters and kernels it starts: give it Python's own
    # handler, which raises KeyboardInterrupt, as in a terminal.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line(
        "markers",
        "mesa_min(version, why): needs at least this Mesa release; on an older one the "
        "test is skipped with that reason (the version matrix lists every such skip)",
    )


def pytest_collection_modifyitems(config, items):
    from packaging.version import Version

    installed = Version(mesa.__version__)
    for item in items:
        marker = item.get_closest_marker("mesa_min")
        if marker is None:
            continue
        needed = marker.args[0]
        if installed < Version(needed):
            why = marker.kwargs.get("why") or (marker.args[1] if len(marker.args) > 1 else "")
            item.add_marker(
                pytest.mark.skip(
                    reason=f"needs Mesa >= {needed}: {why} (installed {mesa.__version__})"
                )
            )


@pytest.fixture(autouse=True)
def clean_state():
    """Undo any patch and setting a test leaves behind; forget what steps measured."""
    mlp.disable_automatic_parallel_stepping()
    mlp.settings.reset()
    _placement.forget()  # agent classes shared by tests start in the pool in each test
    yield
    mlp.disable_automatic_parallel_stepping()
    mlp.settings.reset()


@pytest.fixture
def as_if_in_a_kernel(monkeypatch):
    """Treat every running loop as a Jupyter kernel's: steps started in it nest there.

    What a notebook cell does, without a kernel (tests/test_kernel.py runs real ones).
    Without this fixture a running loop is an application's, and steps started in it run
    on the library's background loop thread.
    """
    from mesa_llm_parallel import _loops

    monkeypatch.setattr(_loops, "_is_kernel_loop", lambda loop: True)


@pytest.fixture(scope="module")
def jupyter_env(tmp_path_factory):
    """A ``python3`` kernelspec that starts this interpreter, found before any other.

    Shared by the notebook and kernel tests. Also a private IPython directory, so no
    user profile or startup file runs.
    """
    base = tmp_path_factory.mktemp("jupyter")
    spec = base / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel_json = {"argv": argv, "display_name": "Python 3 (tests)", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel_json))
    paths = [str(base), *filter(None, os.environ.get("JUPYTER_PATH", "").split(os.pathsep))]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", os.pathsep.join(paths))
        patch.setenv("IPYTHONDIR", str(base / "ipython"))
        yield
