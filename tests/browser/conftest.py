"""Browser tests: a real Chromium (Debian's package) drives the Solara dashboard and the
notebook panel in JupyterLab.

They need pytest-ipywidgets' plugin (entry point ``solara``) and pytest-playwright's
(``playwright``). The main test run disables both, because the ``solara`` plugin breaks
``ipywidgets.Output`` in every other test, and skips this folder; ``./dev test`` runs it
in a pytest invocation of its own::

    .venv/bin/python -m pytest -p solara -p playwright tests/browser
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PLUGIN = "solara"  # pytest-ipywidgets' entry point name
RUN_COMMAND = ".venv/bin/python -m pytest -p solara -p playwright tests/browser"


def _targets_this_folder(config: pytest.Config) -> bool:
    for arg in config.args:
        path = Path(arg.split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Leave this folder out of runs without the browser plugins (the main run)."""
    if config.pluginmanager.has_plugin(PLUGIN):
        return None
    if _targets_this_folder(config):
        raise pytest.UsageError(
            f"the browser tests need pytest-ipywidgets' plugin, which the project's pytest "
            f"options disable: run `{RUN_COMMAND}` (or `./dev test`)"
        )
    return True


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    """Launch Debian's Chromium (Playwright's own browser download cannot work here)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Chromium is missing: apt-get install -y chromium (./dev test does it)")
    flags = [
        "--no-sandbox",  # we run as root
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        # Without these Chromium keeps trying hosts this machine cannot reach.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    return {**browser_type_launch_args, "executable_path": chromium, "args": flags}


@pytest.fixture(scope="session", autouse=True)
def slower_machines():
    """Give page assertions as long as Playwright actions get here (a loaded 2-core CI)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=15_000)


@pytest.fixture(scope="session", autouse=True)
def solara_assets_cache() -> Path:
    """Serve Solara's front-end files from a cache filled from the npm registry."""
    sys.path.insert(0, str(HERE))
    try:
        import solara_assets
    finally:
        sys.path.remove(str(HERE))
    import solara.server.settings

    cache = Path(os.environ.get("SOLARA_ASSETS_PROXY_CACHE_DIR") or solara_assets.DEFAULT_CACHE)
    cache = solara_assets.fill_cache(cache)
    # The server looks files up through this setting on every request.
    solara.server.settings.assets.proxy_cache_dir = cache
    solara.server.settings.telemetry.mixpanel_enable = False
    return cache
