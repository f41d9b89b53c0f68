"""The Mesa version matrix: the core tests on every Mesa release a user can install.

For each release in :data:`RELEASES` a venv of its own is made under
``.cache/matrix/`` (kept between runs; rebuilt when ``pyproject.toml`` or this file
changes), with the project installed beside that Mesa, and there the core tests run
(:data:`CORE_TESTS`) plus Mesa's own agent-set tests of that release (from its sdist,
see ``tests/mesa_suite/harness.py``). Tests that need a newer Mesa feature carry a
``mesa_min`` mark and are reported as skipped with that reason, never silently.

Two releases are built and tested at a time (the machines have 2 cores). The summary
table (release, Python, passed, skipped, failed, seconds) is printed and written to
``.cache/matrix/summary.json``; the exit status is 1 if any release failed.

Usage (from the repository root, with any Python >= 3.12)::

    python tests/matrix/run_matrix.py            # every release
    python tests/matrix/run_matrix.py 3.0.3 4.0.0a0   # some of them
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "matrix"


@dataclass(frozen=True)
class Release:
    """One Mesa release of the matrix and how its venv is made."""

    mesa: str
    python: str
    #: Extra requirements pinned in its venv, with why (empty: none needed).
    pins: tuple[str, ...] = ()
    why_pins: str = ""


#: The newest patch release of each minor, 3.5.0 (whose classes live elsewhere), and
#: Mesa 4's newest pre-release. Python 3.13 for the newest release of each major.
RELEASES: tuple[Release, ...] = (
    Release("3.0.3", "3.12"),
    Release("3.1.5", "3.12"),
    Release("3.2.0", "3.12"),
    Release("3.3.1", "3.12"),
    Release("3.4.2", "3.12"),
    Release("3.5.0", "3.12"),
    Release("3.5.1", "3.13"),
    Release("4.0.0a0", "3.13"),
)

#: The tests that apply to every release: the engine, the patch, reliability, loops,
#: where it runs, settings, determinism. (Front ends, notebooks and the browser run in
#: the main venv, and again on Mesa 4 with ``./dev test``.)
CORE_TESTS: tuple[str, ...] = (
    "tests/test_api.py",
    "tests/test_patch.py",
    "tests/test_stepping.py",
    "tests/test_reliability.py",
    "tests/test_loops.py",
    "tests/test_where_it_runs.py",
    "tests/test_settings.py",
    "tests/test_determinism.py",
    "tests/test_batch_run.py",
    "tests/test_process_cap.py",
    "tests/test_mesa_suite.py::test_mesa_agentset_tests_pass_with_patch_installed",
)


@dataclass
class Outcome:
    """What one release's run gave."""

    mesa: str
    python: str
    passed: int = 0
    skipped: int = 0
    failed: int = 0
    errors: int = 0
    build_seconds: float = 0.0
    test_seconds: float = 0.0
    ok: bool = False
    skips: list[str] = field(default_factory=list)
    log: str = ""


def _find_python(version: str) -> str:
    """An interpreter of ``version`` that runs: on PATH, or one of pyenv's."""
    candidates = [shutil.which(f"python{version}")]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += sorted(str(p) for p in pyenv.glob(f"{version}*/bin/python{version}"))
    for candidate in filter(None, candidates):
        probe = subprocess.run(  # noqa: S603 - a candidate interpreter, fixed code
            [candidate, "-c", "pass"], capture_output=True, check=False
        )
        if probe.returncode == 0:
            return candidate
    raise SystemExit(f"matrix: Python {version} is needed (python{version} on PATH or pyenv)")


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        return subprocess.run(  # noqa: S603 - fixed commands
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, check=False
        ).returncode


def _build(release: Release, venv: Path, log: Path) -> bool:
    stamp_file = venv / ".matrix-stamp"
    stamp = f"{release}|{_stamp_text()}"
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        return True
    if venv.exists():
        shutil.rmtree(venv)
    if _run([_find_python(release.python), "-m", "venv", str(venv)], log) != 0:
        return False
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    requirements = [
        "-e",
        ".[llm]",
        f"mesa[network]=={release.mesa}",
        "pytest>=8",
        "hypothesis>=6",
        *release.pins,
    ]
    if _run([*pip, *requirements], log) != 0:
        return False
    stamp_file.write_text(stamp)
    return True


def _stamp_text() -> str:
    """What a venv is built from: it is rebuilt when this changes."""
    return (ROOT / "pyproject.toml").read_text() + Path(__file__).read_text()


_COUNTS = re.compile(r"(\d+) (passed|skipped|failed|errors?)")


def run_release(release: Release) -> Outcome:
    """Build (if needed) the release's venv and run the core tests there."""
    name = f"mesa-{release.mesa}-py{release.python}"
    venv = CACHE / name
    log = CACHE / f"{name}.log"
    CACHE.mkdir(parents=True, exist_ok=True)
    log.write_text(f"Mesa {release.mesa}, Python {release.python}\n")
    outcome = Outcome(release.mesa, release.python, log=str(log))
    started = time.perf_counter()
    built = _build(release, venv, log)
    outcome.build_seconds = time.perf_counter() - started
    if not built:
        outcome.errors = 1
        return outcome
    started = time.perf_counter()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    code = _run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rs",
            *CORE_TESTS,
        ],
        log,
        env,
    )
    outcome.test_seconds = time.perf_counter() - started
    text = log.read_text()
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    for count, kind in _COUNTS.findall(summary[-1] if summary else ""):
        key = {"error": "errors"}.get(kind, kind)
        setattr(outcome, key, int(count))
    outcome.skips = sorted(
        {line.split("] ", 1)[-1] for line in text.splitlines() if line.startswith("SKIPPED")}
    )
    outcome.ok = code == 0 and outcome.failed == 0 and outcome.errors == 0 and outcome.passed > 0
    return outcome


def main(argv: list[str]) -> int:
    chosen = [r for r in RELEASES if not argv or r.mesa in argv]
    if argv and len(chosen) != len(argv):
        known = ", ".join(r.mesa for r in RELEASES)
        raise SystemExit(f"matrix: unknown release in {argv}; known: {known}")
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as executor:
        outcomes = list(executor.map(run_release, chosen))
    print("\nMesa version matrix (core tests + Mesa's own agent-set tests)")
    print(
        f"{'Mesa':<9} {'Python':<7} {'passed':>6} {'skipped':>7} {'failed':>6} "
        f"{'build s':>7} {'test s':>6}  result"
    )
    for o in outcomes:
        result = "ok" if o.ok else f"FAILED: {o.log}"
        print(
            f"{o.mesa:<9} {o.python:<7} {o.passed:>6} {o.skipped:>7} {o.failed + o.errors:>6} "
            f"{o.build_seconds:>7.0f} {o.test_seconds:>6.0f}  {result}"
        )
        for reason in o.skips:
            print(f"    skipped: {reason}")
    print(f"total {time.perf_counter() - started:.0f} s")
    (CACHE / "summary.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=2))
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
