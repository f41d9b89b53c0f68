"""The benchmark script keeps working (a smoke run; speed is judged in docs, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_run_prints_every_scenario(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(  # noqa: S603 - our own script, fixed arguments
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for scenario in (
        "1. asyncio",
        "2. threading",
        "3. machinery",
        "4. flag off",
        "5. sequential",
        "12. mixed",
        "13. scale",
        "14. clients",
    ):
        assert scenario in result.stdout
    data = json.loads(out.read_text())
    assert data  # every figure was written
