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
