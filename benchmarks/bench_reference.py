"""Scenario 9: side by side with the reference implementation (mesa-llm 0.3.2), same server.

mesa-llm's parallel stepping patches only ``mesa.agent.AgentSet``, which is what
``model.agents`` is on Mesa <= 3.4; on Mesa 3.5 ``model.agents`` is another class and
the patch never runs. It is therefore measured in two venvs of its own, made by this
module under ``.cache/`` (git-ignored) with the benchmark's Python:

* ``.cache/reference-venv``: ``mesa==3.4.*``, ``networkx``, ``mesa-llm==0.3.2`` and the
  benchmark's own ``openai`` version (so both sides use the same HTTP client);
* ``.cache/reference-venv-mesa35``: the same with the benchmark's Mesa version.

A venv is made only when it is missing (or was made for other versions), only when
the run may install (not with ``--quick`` or ``--no-install``), and needs PyPI; if that
fails the scenario reports "not run" with the reason and the other scenarios go on.
``LITELLM_LOCAL_MODEL_COST_MAP=True`` lets ``mesa_llm`` (through litellm) import offline.

The reference runs in a child process (``reference_worker.py mesa-llm``) driven over
JSON lines, against the same loopback server process as our side, with the same agent
code (``bench_http_agents.py``) and the same client settings. Our side runs the same
script in a child process too (``reference_worker.py ours``, the project's venv, Mesa
3.5), so that neither side carries the benchmark process's heap or shares its GIL with
anything. Their steps and ours alternate (AB, BA, ...), and the ratios are ours / theirs.

Its asyncio mode runs every step in ``asyncio.run``, on a new event loop, so a client
kept across steps (as ours are) fails on the next step with "Event loop is closed";
its side therefore makes a new ``AsyncOpenAI`` client at the start of every step (the
row "persistent client" measures what happens otherwise). Its threading mode runs each
step in a new ``ThreadPoolExecutor()`` of Python's default size.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import mesa
import openai
from bench_common import Config, Row, fmt_ratio, fmt_stats, fmt_time
from bench_http import (
    CONNECTIONS,
    HttpSide,
    Sample,
    interleave_samples,
    prepare_http,
    stats_of,
)
from bench_http_agents import client_settings
from bench_server import ServerProcess

__all__ = ["ReferenceVenv", "ReferenceWorker", "reference"]

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "reference_worker.py"
#: Seconds one command of the worker may take before the scenario gives up on it.
COMMAND_TIMEOUT = 600.0
INSTALL_TIMEOUT = 900.0


class ReferenceVenv:
    """A venv with mesa-llm 0.3.2 and a given Mesa, made on demand."""

    def __init__(self, name: str, mesa_spec: str) -> None:
        self.path = ROOT / ".cache" / name
        self.requirements = [
            mesa_spec,
            "networkx",
            "mesa-llm==0.3.2",
            f"openai=={openai.__version__}",
        ]

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def _marker(self) -> Path:
        return self.path / ".bench-ready"

    def ready(self) -> bool:
        """Whether the venv exists and was made for these requirements."""
        try:
            made_for = json.loads(self._marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return made_for == self.requirements and self.python.exists()

    def ensure(self, *, allow_install: bool) -> str | None:
        """Make the venv if needed; None when ready, else why it is not."""
        if self.ready():
            return None
        if not allow_install:
            return (
                f"{self.path.relative_to(ROOT)} is not there (made by a full run: "
                "./dev bench --only reference; needs PyPI)"
            )
        print(f"    creating {self.path.relative_to(ROOT)} ({', '.join(self.requirements)})")
        start = time.perf_counter()
        commands = [
            [sys.executable, "-m", "venv", "--clear", str(self.path)],
            [
                str(self.python),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                *self.requirements,
            ],
        ]
        for command in commands:
            try:
                done = subprocess.run(  # noqa: S603 - fixed arguments, no shell
                    command,
                    capture_output=True,
                    text=True,
                    timeout=INSTALL_TIMEOUT,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"could not create {self.path.name}: {exc}"
            if done.returncode != 0:
                errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
                tail = "; ".join(
                    line[:200] for line in errors[-3:] or done.stderr.splitlines()[-3:]
                )
                return f"could not create {self.path.name} (pip status {done.returncode}): {tail}"
        self._marker.write_text(json.dumps(self.requirements), encoding="utf-8")
        print(f"    ... done in {time.perf_counter() - start:.0f} s", flush=True)
        return None


class ReferenceWorker:
    """``reference_worker.py IMPL`` in a child process, driven over JSON lines.

    ``impl`` is ``"mesa-llm"`` (with a reference venv's interpreter) or ``"ours"``
    (with the benchmark's own).
    """

    def __init__(self, python: Path | str, impl: str) -> None:
        env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONWARNINGS="ignore")
        env.pop("PYTHONPATH", None)
        self._stderr: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(  # noqa: S603 - our own script, fixed arguments
            [str(python), str(WORKER), impl],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
            env=env,
            cwd=str(ROOT),
        )
        self.info = self._read(120.0)

    def _read(self, timeout: float) -> dict[str, Any]:
        stdout = self._proc.stdout
        if stdout is None:
            raise RuntimeError("the reference worker has no output pipe")
        readable, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if readable else ""
        if not line:
            self._stderr.seek(0)
            tail = " | ".join(self._stderr.read().strip().splitlines()[-5:])
            state = "timed out" if not readable else f"exited ({self._proc.poll()})"
            raise RuntimeError(f"the reference worker {state}: {tail}")
        answer = json.loads(line)
        if "fatal" in answer:
            raise RuntimeError(f"the reference worker failed: {answer['fatal']}")
        return answer

    def ask(self, **command: Any) -> dict[str, Any]:
        stdin = self._proc.stdin
        if stdin is None:
            raise RuntimeError("the reference worker has no input pipe")
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()
        return self._read(COMMAND_TIMEOUT)

    def side(self, name: str, n: int) -> HttpSide:
        """A side whose step runs in the worker (the worker times it)."""
        samples: list[dict[str, Any]] = []

        def run() -> Sample:
            answer = self.ask(cmd="step")
            samples.append(answer)
            return Sample(answer["seconds"], 0.0, answer["answered"], answer["failures"])

        side = HttpSide(name, run, None)
        side.answers = samples  # type: ignore[attr-defined]
        return side

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            self.ask(cmd="quit")
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._stderr.close()


@contextlib.contextmanager
def _worker(python: Path | str, impl: str) -> Iterator[ReferenceWorker]:
    worker = ReferenceWorker(python, impl)
    try:
        yield worker
    finally:
        worker.close()


def _not_run(key: str, scenario: str, reason: str) -> Row:
    return Row(
        key=key,
        scenario=scenario,
        measured="not run",
        baseline=reason,
        ratio="-",
        target="- (info)",
        met=None,
        reference="-",
        data={"not_run": reason},
    )


def _plan(cfg: Config) -> list[tuple[str, int, float]]:
    """(mode, agents, latency) cells compared on Mesa 3.4."""
    if cfg.quick:
        return [("asyncio", 100, 0.05), ("threading", 50, 0.05)]
    cells = [
        ("asyncio", 100, 0.05),
        ("asyncio", 1000, 0.05),
        ("asyncio", 100, 0.5),
        ("asyncio", 1000, 0.5),
        ("threading", 100, 0.05),
        ("threading", 1000, 0.05),
        ("threading", 100, 0.5),
    ]
    if cfg.http_full:  # its threading step of 1,000 x 500 ms takes about 85 s
        cells += [("threading", 1000, 0.5), ("asyncio", 5000, 0.5)]
    return cells


def _describe(answers: list[dict[str, Any]], n: int) -> str:
    short = [a for a in answers if a["answered"] != n or a["failures"] or a["error"]]
    if not short:
        return ""
    first = short[0]
    return (
        f" ({len(short)} of {len(answers)} steps incomplete, e.g. {first['answered']} of {n} "
        f"answered, {first['error'] or first['failures']})"
    )


def _side(
    worker: ReferenceWorker, server: ServerProcess, mode: str, n: int, client: str
) -> HttpSide:
    worker.ask(
        cmd="setup",
        mode=mode,
        n=n,
        base_url=server.base_url,
        connections=CONNECTIONS,
        client=client,
    )
    return worker.side(f"{worker.info['implementation']} {mode}", n)


def _timed_answers(side: HttpSide, repeats: int) -> list[dict[str, Any]]:
    """The worker's answers to the timed steps of a side (not its warm-up)."""
    return side.answers[-repeats:]  # type: ignore[attr-defined]


def _compare_cell(
    ours_worker: ReferenceWorker,
    worker: ReferenceWorker,
    server: ServerProcess,
    cfg: Config,
    cell: tuple[str, int, float],
) -> Row:
    mode, n, latency = cell
    mesa_version = worker.info["mesa"]
    client = "per_step" if mode == "asyncio" else "persistent"
    ours_side = _side(ours_worker, server, mode, n, "persistent")
    theirs_side = _side(worker, server, mode, n, client)
    ours_side.expect = n  # ours must answer every agent, or the figure is meaningless
    # Their threading steps take seconds (a pool of Python's default size, made anew
    # every step, so nothing to warm up): two repeats, ours warmed up only.
    threading = mode == "threading"
    repeats = min(cfg.http_repeats, 2) if threading or n >= 5000 else cfg.http_repeats
    ours, theirs = interleave_samples(
        [ours_side, theirs_side], repeats, warm_up=(0,) if threading else None
    )
    o, t = stats_of(ours), stats_of(theirs)
    ratio = o.median / t.median
    answers = _timed_answers(theirs_side, repeats)
    how = (
        "new AsyncOpenAI each step (asyncio.run per step)"
        if mode == "asyncio"
        else "new ThreadPoolExecutor() per step"
    )
    return Row(
        key=f"reference_{mode}_{n}_{latency * 1e3:.0f}ms",
        scenario=(
            f"9. vs mesa-llm 0.3.2 on Mesa {mesa_version}, {mode}: {n:,} agents x "
            f"{latency * 1e3:.0f} ms over HTTP"
        ),
        measured=f"ours {fmt_stats(o)}",
        baseline=f"mesa-llm {fmt_stats(t)}, {how}{_describe(answers, n)}",
        ratio=fmt_ratio(ratio),
        target="- (info: ours / theirs)",
        met=None,
        reference=f"{fmt_time(t.median)} (measured in this run)",
        data={
            "mode": mode,
            "n": n,
            "latency": latency,
            "mesa": mesa_version,
            "ours_mesa": ours_worker.info["mesa"],
            "ours": o.as_dict(),
            "theirs": t.as_dict(),
            "ratio_ours_to_theirs": ratio,
            "theirs_steps": answers,
            "theirs_client": client,
        },
    )


def _persistent_client_row(
    worker: ReferenceWorker, server: ServerProcess, mesa_version: str, steps: int
) -> Row:
    """What mesa-llm's asyncio mode does with a client kept across steps (as ours are)."""
    n = 100
    worker.ask(
        cmd="setup",
        mode="asyncio",
        n=n,
        base_url=server.base_url,
        connections=CONNECTIONS,
        client="persistent",
    )
    answers = [worker.ask(cmd="step") for _ in range(steps)]
    failed = [i + 1 for i, a in enumerate(answers) if a["error"] or a["answered"] != n]
    errors = sorted({a["error"] for a in answers if a["error"]})
    return Row(
        key="reference_asyncio_persistent_client",
        scenario=(
            f"9. mesa-llm 0.3.2 on Mesa {mesa_version}, asyncio, one AsyncOpenAI client kept "
            f"across {steps} steps (as ours are), {n} agents x 50 ms"
        ),
        measured=f"steps that failed: {failed or 'none'} of {steps}",
        baseline="; ".join(errors) or "-",
        ratio="-",
        target="- (info)",
        met=None,
        reference="-",
        data={"steps": answers, "failed_steps": failed},
    )


def _mesa35_rows(
    ours_worker: ReferenceWorker, worker: ReferenceWorker, server: ServerProcess, cfg: Config
) -> list[Row]:
    """On Mesa 3.5 its patch never reaches ``model.agents``: measure what happens."""
    mesa_version = worker.info["mesa"]
    n = 20
    repeats = min(cfg.http_repeats, 2)
    rows: list[Row] = []
    for mode in ("threading", "asyncio"):
        ours_side = _side(ours_worker, server, mode, n, "persistent")
        ours_side.expect = n
        theirs_side = _side(worker, server, mode, n, "persistent")
        ours, theirs = interleave_samples([ours_side, theirs_side], repeats)
        o, t = stats_of(ours), stats_of(theirs)
        answers = _timed_answers(theirs_side, repeats)
        answered = [a["answered"] for a in answers]
        if mode == "threading":
            what = f"{fmt_stats(t)}: one agent after another, {answered[0]} of {n} answered"
        else:
            what = (
                f"{fmt_stats(t)}: {answered[0]} of {n} answered (Mesa calls the agents' "
                "inherited no-op step(); astep is never awaited)"
            )
        rows.append(
            Row(
                key=f"reference_mesa35_{mode}_{n}",
                scenario=(
                    f"9. mesa-llm 0.3.2 on Mesa {mesa_version} (its patch misses model.agents), "
                    f"{mode}: {n} agents x 50 ms"
                ),
                measured=f"ours {fmt_stats(o)}",
                baseline=f"mesa-llm {what}",
                ratio=fmt_ratio(o.median / t.median) if mode == "threading" else "-",
                target="- (info: ours / theirs)",
                met=None,
                reference=f"{fmt_time(t.median)} (measured in this run)",
                data={
                    "mode": mode,
                    "n": n,
                    "latency": 0.05,
                    "mesa": mesa_version,
                    "ours": o.as_dict(),
                    "theirs": t.as_dict(),
                    "ratio_ours_to_theirs": o.median / t.median,
                    "theirs_steps": answers,
                    "model_agents_patched": worker.info.get("model_agents_patched"),
                },
            )
        )
    return rows


def reference(cfg: Config) -> list[Row]:
    """Scenario 9."""
    prepare_http()
    rows: list[Row] = []
    venv34 = ReferenceVenv("reference-venv", "mesa==3.4.*")
    venv35 = ReferenceVenv("reference-venv-mesa35", f"mesa=={mesa.__version__}")
    venvs = (venv34,) if cfg.quick else (venv34, venv35)
    reasons = {v.path.name: v.ensure(allow_install=cfg.allow_install) for v in venvs}
    cells = _plan(cfg)
    by_latency: dict[float, list[tuple[str, int, float]]] = {}
    for cell in cells:
        by_latency.setdefault(cell[2], []).append(cell)

    with contextlib.ExitStack() as stack:
        if any(reason is None for reason in reasons.values()):
            ours_worker = stack.enter_context(_worker(sys.executable, "ours"))
        if reasons[venv34.path.name] is not None:
            rows.append(
                _not_run(
                    "reference_mesa34",
                    "9. vs mesa-llm 0.3.2 on Mesa 3.4",
                    str(reasons[venv34.path.name]),
                )
            )
        else:
            worker = stack.enter_context(_worker(venv34.python, "mesa-llm"))
            version = worker.info["mesa"]
            if not worker.info.get("model_agents_patched"):
                raise RuntimeError(
                    f"mesa-llm's patch does not reach model.agents on Mesa {version}"
                )
            for latency, group in sorted(by_latency.items()):
                with ServerProcess(latency=latency) as server:
                    if latency == 0.05 and not cfg.quick:
                        rows.append(_persistent_client_row(worker, server, version, 4))
                    for cell in group:
                        row = _compare_cell(ours_worker, worker, server, cfg, cell)
                        row.data["reference_versions"] = worker.info
                        rows.append(row)
                        print(f"    {row.scenario}: {row.ratio}", flush=True)

        if cfg.quick:
            rows.append(
                _not_run(
                    "reference_mesa35",
                    f"9. mesa-llm 0.3.2 on Mesa {mesa.__version__}",
                    "skipped with --quick (a worker start-up costs seconds)",
                )
            )
        elif reasons[venv35.path.name] is not None:
            rows.append(
                _not_run(
                    "reference_mesa35",
                    f"9. mesa-llm 0.3.2 on Mesa {mesa.__version__}",
                    str(reasons[venv35.path.name]),
                )
            )
        else:
            worker35 = stack.enter_context(_worker(venv35.python, "mesa-llm"))
            with ServerProcess(latency=0.05) as server:
                rows += _mesa35_rows(ours_worker, worker35, server, cfg)
    for row in rows:
        row.data.setdefault("client", client_settings(CONNECTIONS, 0))
    return rows
