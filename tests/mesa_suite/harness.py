"""Fetch Mesa's own test suite from its sdist and run it with our patch installed.

The sdist matching the installed Mesa is downloaded once with pip and only its
``tests/`` folder is unpacked, under ``<repo>/.cache/mesa-sdist-<version>/suite/``
(override the cache root with ``MESA_SUITE_CACHE_DIR``). No ``mesa/`` folder from the
sdist lands anywhere, so ``import mesa`` in the inner run always finds the installed
package. The suite runs in a subprocess whose working directory is that cache folder,
with :mod:`patch_plugin` (next to this file) loaded through ``-p``.

Also a command-line tool, e.g. for the run with parallel stepping on for every model::

    .venv/bin/python tests/mesa_suite/harness.py --force-on --mode threading --no-stop-first

With ``--force-on`` it also says which failures are known (listed in
``flag_on_failures.py``, next to this file) and which are not.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PLUGIN = "patch_plugin"
CACHE_ENV = "MESA_SUITE_CACHE_DIR"
FORCE_ON_ENV = "MESA_LLM_PARALLEL_FORCE_ON"
MODE_ENV = "MESA_LLM_PARALLEL_MODE"
REPORT_ENV = "MESA_SUITE_REPORT"
#: The modes of parallel stepping, for the runs with the flag on.
MODES = ("asyncio", "threading")

#: The agent-set tests: they must always run (44 tests in Mesa 3.5.1).
AGENTSET_TESTS = ("tests/test_agentset.py", "tests/test_agent.py", "tests/test_model.py")
#: The whole suite.
WHOLE_SUITE = ("tests",)

#: Guards against a hung download or run; never used to judge speed.
DOWNLOAD_TIMEOUT_S = 900
RUN_TIMEOUT_S = 1800

#: Mesa's visualization stack (its ``viz`` extra): ``mesa.visualization`` and the
#: examples' ``app`` modules import solara, altair and matplotlib at module level.
VIZ_MODULES = ("solara", "altair", "matplotlib")

#: Solara apps imported by these tests of tests/examples/test_examples.py before they
#: run the example model (``from mesa.examples.<...> import app``).
EXAMPLE_APP_TESTS = (
    "test_boltzmann_model",
    "test_conways_game_model",
    "test_schelling_model",
    "test_virus_on_network",
    "test_boid_flockers",
    "test_epstein",
    "test_pd_grid",
    "test_sugarscape_g1mt",
    "test_wolf_sheep",
    "test_alliance_formation_model",
)


@dataclasses.dataclass(frozen=True)
class Exclusion:
    """Tests of Mesa's suite that this harness leaves out, and why.

    Attributes:
        option: ``--ignore`` (a path) or ``--mesa-suite-deselect`` (an exact test id;
            the plugin's option, since pytest's ``--deselect`` matches id prefixes).
        target: The path or test id, relative to the suite folder.
        reason: Why the tests cannot run here.
        unless_importable: Modules that, when all importable, make the tests runnable;
            empty means the tests are always left out.
        tests: About how many passing tests this removes (Mesa 3.5.1), to lower the
            expected minimum of passed tests accordingly.
        since_mesa: The first Mesa major release that has these tests (0: all).
    """

    option: str
    target: str
    reason: str
    unless_importable: tuple[str, ...] = ()
    tests: int = 0
    since_mesa: int = 0

    def applies(self) -> bool:
        """Whether these tests are left out in this environment."""
        if int(mesa_version().split(".")[0]) < self.since_mesa:
            return False
        if not self.unless_importable:
            return True
        return not all(importlib.util.find_spec(name) for name in self.unless_importable)

    def covers(self, test: str) -> bool:
        """Whether the test id ``test`` is among the tests left out."""
        if self.option == "--ignore":
            path = test.partition("::")[0]
            return path == self.target or path.startswith(f"{self.target}/")
        return test == self.target


EXCLUSIONS = (
    # Drives a real browser through playwright and pytest-ipywidgets' solara_test /
    # page_session fixtures; no browser build can be fetched on our machines.
    Exclusion(
        "--ignore",
        "tests/examples/test_examples_viz.py",
        "needs a browser (playwright, pytest-ipywidgets)",
    ),
    # Every module here imports mesa.visualization (solara, altair, matplotlib at
    # module level); several also use pytest-mock's `mocker` fixture.
    Exclusion(
        "--ignore",
        "tests/visualization",
        "needs Mesa's viz extra (solara, altair, matplotlib) and pytest-mock",
        (*VIZ_MODULES, "pytest_mock"),
        tests=106,
    ),
    # These import the example's Solara app before running the model; the other tests
    # of that module run the same models without the app and always run.
    *(
        Exclusion(
            "--mesa-suite-deselect",
            f"tests/examples/test_examples.py::{name}",
            "imports the example's Solara app (solara, altair, matplotlib)",
            VIZ_MODULES,
            tests=1,
        )
        for name in EXAMPLE_APP_TESTS
    ),
    # Mesa 4's data recorder writes Parquet through pandas, which needs pyarrow (Mesa
    # 3.5.1's tests skip themselves without it). The id does not exist before Mesa 4.
    Exclusion(
        "--mesa-suite-deselect",
        "tests/experimental/test_datarecorder.py::test_run_ended[ParquetDataRecorder]",
        "writes Parquet files, which needs pyarrow",
        ("pyarrow",),
        tests=0,
        since_mesa=4,
    ),
)

#: Passed tests expected from the whole suite when nothing optional is left out, by
#: Mesa major release (579 pass with Mesa 3.5.1, plus 12 skipped for pyarrow; 510 with
#: Mesa 4.0.0a0, which removed features and their tests); lowered per exclusion.
WHOLE_SUITE_MIN_PASSED_BY_MAJOR = {3: 560, 4: 500}
#: A floor that catches a run that silently collected almost nothing. Mesa's own
#: agent-set tests (test_agentset.py, test_agent.py, test_model.py; the first from
#: Mesa 3.5 on) number 28 (3.0.3) to 44 (3.5.1), 38 on 4.0.0a0; the exact count is in
#: each run's log.
AGENTSET_MIN_PASSED = 20


class SuiteUnavailableError(RuntimeError):
    """Mesa's test suite could not be obtained (no network, version not on PyPI...)."""


@dataclasses.dataclass
class SuiteRun:
    """The outcome of one run of Mesa's suite."""

    command: list[str]
    returncode: int
    output: str
    counts: dict[str, int]
    report: dict[str, Any] | None
    excluded: list[Exclusion]
    log: Path

    def tail(self, lines: int = 60) -> str:
        """The last lines of the run's output, for an assertion message."""
        return "\n".join(self.output.splitlines()[-lines:])

    @property
    def failed_tests(self) -> list[str]:
        """The ids of the tests that failed or errored, as the plugin recorded them."""
        if self.report is None:
            return []
        return sorted({test for test, _phase in self.report.get("failed", [])})


def _load_sibling(name: str) -> ModuleType:
    """Import a module of this folder by path (this folder is not a package)."""
    qualified = f"_mesa_suite_{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    spec = importlib.util.spec_from_file_location(qualified, HERE / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    spec.loader.exec_module(module)
    return module


#: The known failures with the flag on: ``flag_on_failures.py``.
flag_on_failures = _load_sibling("flag_on_failures")


def mesa_version() -> str:
    """The version of the installed Mesa."""
    return importlib.metadata.version("mesa")


def cache_root() -> Path:
    """Where sdists and unpacked suites are cached (outside the source tree)."""
    return Path(os.environ.get(CACHE_ENV) or REPO / ".cache")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (parallel test workers share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download_sdist(version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"mesa=={version}",
        "-d",
        str(dest),
        "--timeout",
        "30",
        "--retries",
        "2",
    ]
    failure = ""
    try:
        done = subprocess.run(  # noqa: S603
            command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False
        )
        if done.returncode:
            failure = f"exit code {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}"
    except subprocess.TimeoutExpired:
        failure = f"no answer within {DOWNLOAD_TIMEOUT_S} s"
    found = sorted(dest.glob(f"mesa-{version}.tar.gz")) or sorted(dest.glob("*.tar.gz"))
    if failure or not found:
        raise SuiteUnavailableError(
            f"Could not download the sdist of mesa=={version} (the installed version) to "
            f"run Mesa's own test suite; PyPI must be reachable.\n"
            f"Command: {' '.join(command)}\n{failure or 'no .tar.gz was saved'}"
        )
    return found[0]


def _unpack_tests(sdist: Path, dest: Path) -> None:
    """Unpack only the sdist's ``tests/`` folder into ``dest/tests``."""
    with tarfile.open(sdist) as archive:
        members = []
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if len(parts) >= 2 and parts[1] == "tests":  # <name>-<version>/tests/...
                member.name = str(Path(*parts[1:]))
                members.append(member)
        # Mesa 3.0-3.4 keep their agent-set tests in test_agent.py (no test_agentset.py).
        if not any(Path(m.name).name == "test_agent.py" for m in members):
            raise SuiteUnavailableError(f"{sdist.name} has no tests/test_agent.py")
        archive.extractall(dest, members=members, filter="data")


def fetch_suite(version: str | None = None) -> Path:
    """Return a folder holding Mesa's ``tests/`` for ``version`` (default: installed).

    Downloads and unpacks on first use; later calls reuse the cache.

    Raises:
        SuiteUnavailableError: The sdist could not be downloaded or has no tests.
    """
    version = version or mesa_version()
    base = cache_root() / f"mesa-sdist-{version}"
    suite = base / "suite"
    marker = suite / ".complete"
    if marker.is_file():
        return suite
    with _locked(base.parent / f"{base.name}.lock"):
        if marker.is_file():
            return suite
        sdist = _download_sdist(version, base / "download")
        staging = Path(tempfile.mkdtemp(prefix="suite-", dir=base))
        try:
            _unpack_tests(sdist, staging)
            # Our own rootdir and config: pytest must not climb to the repo's
            # pyproject.toml (testpaths, addopts) or pick up its conftest files.
            (staging / "pytest.ini").write_text(
                f"# Mesa {version}'s own tests, run by {Path(__file__).name}.\n[pytest]\n",
                encoding="utf-8",
            )
            (staging / ".complete").write_text(f"{version}\n", encoding="utf-8")
            shutil.rmtree(suite, ignore_errors=True)
            staging.rename(suite)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return suite


_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?)\b")


def parse_summary(output: str) -> dict[str, int]:
    """Counts from pytest's closing line, e.g. ``579 passed, 12 skipped in 23.8s``.

    Returns:
        The counts by outcome (``error`` for errors); empty when no summary is found.
    """
    for line in reversed(output.splitlines()):
        if re.search(r"\bin \d+(\.\d+)?s\b", line) and _SUMMARY.search(line):
            counts: dict[str, int] = {}
            for number, outcome in _SUMMARY.findall(line):
                key = "error" if outcome.startswith("error") else outcome
                counts[key] = counts.get(key, 0) + int(number)
            return counts
    return {}


def active_exclusions() -> list[Exclusion]:
    """The exclusions that apply in this environment."""
    return [exclusion for exclusion in EXCLUSIONS if exclusion.applies()]


def min_passed_whole(excluded: Sequence[Exclusion]) -> int:
    """The fewest passed tests the whole suite may report with these exclusions."""
    major = int(mesa_version().split(".")[0])
    floor = WHOLE_SUITE_MIN_PASSED_BY_MAJOR.get(
        major, min(WHOLE_SUITE_MIN_PASSED_BY_MAJOR.values())
    )
    return floor - sum(exclusion.tests for exclusion in excluded)


def run_suite(
    selection: Sequence[str] = WHOLE_SUITE,
    *,
    force_on: bool = False,
    mode: str | None = None,
    stop_first: bool = True,
    extra_args: Sequence[str] = (),
    suite: Path | None = None,
) -> SuiteRun:
    """Run (part of) Mesa's suite in a subprocess with our patch installed.

    Args:
        selection: Paths or test ids relative to the suite folder.
        force_on: Set ``mesa.Model.parallel_stepping = True`` for every model.
        mode: One of :data:`MODES` for the forced run (default: asyncio).
        stop_first: Pass ``-x`` (stop at the first failure).
        extra_args: More pytest arguments.
        suite: The suite folder (default: :func:`fetch_suite`).

    Raises:
        SuiteUnavailableError: The suite could not be obtained.
    """
    suite = suite or fetch_suite()
    requested = tuple(selection)
    # Only the files this release has (test_agentset.py is Mesa >= 3.5's).
    selection = [
        item for item in selection if (suite / item.split("::")[0]).exists() or "/" not in item
    ] or list(selection)
    excluded = active_exclusions()
    report = Path(tempfile.mkstemp(prefix="mesa-suite-", suffix=".json")[1])
    report.unlink()
    command = [sys.executable, "-m", "pytest", *selection, "-p", PLUGIN, "-q"]
    if stop_first:
        command.append("-x")
    # Keep the cache folder free of .pytest_cache and last-failed state.
    command += ["-p", "no:cacheprovider"]
    for exclusion in excluded:
        command += [exclusion.option, exclusion.target]
    command += list(extra_args)

    env = {
        key: value
        for key, value in os.environ.items()
        # The outer run's options and plugins are not meant for Mesa's tests.
        if key not in {"PYTEST_ADDOPTS", "PYTEST_PLUGINS", FORCE_ON_ENV, MODE_ENV}
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env[REPORT_ENV] = str(report)
    if force_on:
        env[FORCE_ON_ENV] = "1"
        if mode:
            env[MODE_ENV] = mode

    try:
        done = subprocess.run(  # noqa: S603
            command,
            cwd=suite,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
        returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        returncode = -1
        output = f"{exc.stdout or ''}{exc.stderr or ''}\nno result within {RUN_TIMEOUT_S} s"
    label = {AGENTSET_TESTS: "agentset", WHOLE_SUITE: "whole"}.get(requested, "custom")
    flag = f"-force-on-{mode or 'asyncio'}" if force_on else ""
    log = suite.parent / f"last-run-{label}{flag}.log"
    log.write_text(f"$ {' '.join(command)}\n{output}", encoding="utf-8")
    findings = None
    if report.is_file():
        findings = json.loads(report.read_text(encoding="utf-8"))
        report.unlink()
    return SuiteRun(command, returncode, output, parse_summary(output), findings, excluded, log)


def main(argv: Sequence[str] | None = None) -> int:
    """Run Mesa's suite from the command line; print the output and a summary.

    Returns:
        The inner pytest's exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", action="store_true", help="only the agent-set tests")
    parser.add_argument(
        "--force-on",
        action="store_true",
        default=os.environ.get(FORCE_ON_ENV, "") == "1",
        help=f"parallel stepping on for every model (also ${FORCE_ON_ENV}=1)",
    )
    parser.add_argument(
        "--mode", default=os.environ.get(MODE_ENV), choices=MODES, help="default: asyncio"
    )
    parser.add_argument("--no-stop-first", action="store_true", help="do not pass -x")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)
    try:
        run = run_suite(
            AGENTSET_TESTS if args.subset else WHOLE_SUITE,
            force_on=args.force_on,
            mode=args.mode,
            stop_first=not args.no_stop_first,
            extra_args=args.pytest_args,
        )
    except SuiteUnavailableError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(run.output)
    print(f"exit code {run.returncode}; counts {run.counts}; log {run.log}")
    for exclusion in run.excluded:
        print(f"excluded {exclusion.target}: {exclusion.reason}")
    if args.force_on:
        known = flag_on_failures.known_failures(args.mode or "asyncio")
        for test in run.failed_tests:
            print(f"failed {test}: " + (f"known: {known[test]}" if test in known else "NOT KNOWN"))
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
