"""Every notebook in notebooks/ runs top to bottom in a fresh kernel without an error.

The notebooks check what they show with ``assert`` in their cells, so a notebook that
runs also shows what it claims. They run in this venv's Python, in the notebook's
folder, as Jupyter would run them.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TUTORIALS = {"quickstart.ipynb", "async.ipynb"}

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_the_tutorials_are_there():
    assert {path.name for path in NOTEBOOKS} >= TUTORIALS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, jupyter_env):
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=120,
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"{path.name}: {ANSI.sub('', str(exc))}", pytrace=False)

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    assert all(cell.execution_count is not None for cell in code_cells)
    # A tutorial shows no warnings or other stderr output.
    stderr = [
        output["text"]
        for cell in code_cells
        for output in cell.outputs
        if output.get("output_type") == "stream" and output.get("name") == "stderr"
    ]
    assert not stderr, f"{path.name} wrote to stderr:\n" + "".join(stderr)


def test_the_panel_notebook_ends_live_and_its_kernel_still_exits_cleanly(jupyter_env, tmp_path):
    """Run All leaves a panel running in the background; shutting the kernel down ends it.

    Shutdown is graceful (exit status 0, not killed after the grace period) and writes
    no traceback, with a step of the background run in flight.
    """
    from jupyter_client import KernelManager

    path = ROOT / "notebooks" / "panel.ipynb"
    notebook = nbformat.read(path, as_version=4)
    log = tmp_path / "kernel-stderr.txt"
    manager = KernelManager(kernel_name="python3")
    with log.open("wb") as stderr:
        manager.start_kernel(stderr=stderr, cwd=str(path.parent))
        client = manager.client()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=60)
            for cell in notebook.cells:
                if cell.cell_type == "code":
                    reply = client.execute_interactive(cell.source, timeout=120)
                    assert reply["content"]["status"] == "ok", reply["content"]
            # The run goes on after the last cell: steps keep being taken.
            probe = (
                "import time\n"
                "steps = lambda: model.steps if hasattr(model, 'steps') else model.time  # Mesa 4\n"
                "first = steps()\n"
                "deadline = time.monotonic() + 60\n"
                "while steps() < first + 2 and time.monotonic() < deadline:\n"
                "    time.sleep(0.05)\n"
                "print(panel.running, steps() >= first + 2)"
            )
            out: list[str] = []
            reply = client.execute_interactive(
                probe,
                timeout=90,
                output_hook=lambda m: out.append(m["content"].get("text", "")),
            )
            assert reply["content"]["status"] == "ok", reply["content"]
            assert "".join(out).split() == ["True", "True"]
        finally:
            client.stop_channels()
        process = manager.provisioner.process
        manager.shutdown_kernel(now=False)
    assert process.returncode == 0  # exited by itself, not killed
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text
    assert "Exception" not in text, text
