"""Shared pieces of the benchmark suite: timing, statistics, result rows, environment.

Every comparison is made inside one run, with the variants interleaved (ABAB..., or
ABC BCA CAB... for three), so that slow phases of a shared, noisy machine hit all of
them alike. Figures are medians of the repeats, with the minimum beside them.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mesa

import mesa_llm_parallel

__all__ = [
    "Config",
    "Row",
    "Stats",
    "environment",
    "fmt_ratio",
    "fmt_stats",
    "fmt_time",
    "interleave",
    "run_child_json",
    "time_call",
]


@dataclasses.dataclass(frozen=True)
class Config:
    """How much to measure.

    Attributes:
        quick: Smoke run: fewer repeats and shorter workloads.
        repeats: Timed repeats per variant for the latency and machinery scenarios.
        flag_off_pairs: Interleaved pairs (Mesa untouched, patch installed) per small
            example model.
        flag_off_large_pairs: The same for the large example models (slower to build).
        sequential_repeats: Repeats of the 20-agent sequential baseline (and of the
            sequential samples over HTTP).
        http_repeats: Timed repeats per variant in the HTTP scenarios (6-9).
        http_full: Also measure the heavy cells of the HTTP matrix (5,000 agents in
            every mode and latency) and of the reference comparison.
        allow_install: The reference scenario may create its venvs (needs PyPI).
    """

    quick: bool
    repeats: int
    flag_off_pairs: int
    flag_off_large_pairs: int
    sequential_repeats: int
    http_repeats: int = 3
    http_full: bool = False
    allow_install: bool = False


@dataclasses.dataclass(frozen=True)
class Stats:
    """Summary of repeated timings, in seconds."""

    median: float
    min: float
    max: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        """Summarise ``samples`` (at least one)."""
        return cls(statistics.median(samples), min(samples), max(samples), tuple(samples))

    def scaled(self, factor: float) -> Stats:
        """The same statistics multiplied by ``factor`` (e.g. per agent)."""
        return Stats(
            self.median * factor,
            self.min * factor,
            self.max * factor,
            tuple(s * factor for s in self.samples),
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain values for the JSON output."""
        return {
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "n": len(self.samples),
            "samples": list(self.samples),
        }


@dataclasses.dataclass
class Row:
    """One line of the results table.

    ``met`` is True or False for a row with a target, None for an informational row.
    ``data`` holds the raw numbers (seconds unless the key says otherwise) for JSON.
    """

    key: str
    scenario: str
    measured: str
    baseline: str
    ratio: str
    target: str
    met: bool | None
    reference: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def result(self) -> str:
        """``met``, ``NOT MET`` or ``info``."""
        if self.met is None:
            return "info"
        return "met" if self.met else "NOT MET"

    def as_dict(self) -> dict[str, Any]:
        """Plain values for the JSON output."""
        fields = dataclasses.asdict(self)
        fields["result"] = self.result
        return fields


def time_call(fn: Callable[[], object]) -> float:
    """Seconds taken by one call of ``fn``, after a full garbage collection."""
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_child_json(
    argv: Sequence[str], *, what: str, timeout: float, cwd: Path | None = None
) -> Any:
    """Run a child process and return the JSON of the last line it printed.

    Raises:
        RuntimeError: The child failed; the message names ``what`` and ends with the
            tail of its standard error.
    """
    result = subprocess.run(  # noqa: S603 - our own scripts, fixed arguments
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def interleave(fns: Sequence[Callable[[], object]], repeats: int) -> list[Stats]:
    """Time every function ``repeats`` times, rotating the order on each round.

    With two functions the order is AB, BA, AB, ...; with three ABC, BCA, CAB, ...
    Returns one :class:`Stats` per function, in the order given.
    """
    samples: list[list[float]] = [[] for _ in fns]
    count = len(fns)
    for round_ in range(repeats):
        for offset in range(count):
            index = (round_ + offset) % count
            samples[index].append(time_call(fns[index]))
    return [Stats.of(s) for s in samples]


def fmt_time(seconds: float) -> str:
    """A duration with a unit that keeps three significant figures or so."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.1f} us"


def fmt_stats(stats: Stats, *, unit: str = "time") -> str:
    """``median (min ...)``; ``unit="us"`` for values already in microseconds."""
    if unit == "us":
        return f"{stats.median:.1f} us (min {stats.min:.1f})"
    return f"{fmt_time(stats.median)} (min {fmt_time(stats.min)})"


def fmt_ratio(ratio: float) -> str:
    """A ratio such as ``1.07x``."""
    return f"{ratio:.2f}x"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _git_revision() -> str:
    """The checked-out commit, with ``+changes`` when the package has uncommitted edits."""
    git = shutil.which("git")
    root = Path(__file__).resolve().parent.parent
    if git is None:
        return "unknown"
    try:
        head = subprocess.run(  # noqa: S603 - fixed arguments, no shell
            [git, "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(  # noqa: S603
            [git, "status", "--porcelain", "--", "mesa_llm_parallel"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" +changes" if dirty else "")


def environment() -> dict[str, Any]:
    """Versions, machine and date, printed at the top and stored in the JSON."""
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    try:
        import openai

        openai_version = openai.__version__
    except ImportError:
        openai_version = "not installed"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "mesa": mesa.__version__,
        "mesa_llm_parallel": mesa_llm_parallel.__version__,
        "git_revision": _git_revision(),
        "nproc": _nproc(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "load_average_at_start": load,
        "executable": sys.executable,
        "openai": openai_version,
        "open_files_limit": f"{soft} (hard {hard})",
    }
