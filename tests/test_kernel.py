"""Parallel steps in a real Jupyter kernel, driven through jupyter_client.

What a notebook front end does and nbclient does not: several cells queued at once
("Run All"), and the interrupt button while a step runs. The kernel is this venv's
Python with the project installed, started fresh for every test.
"""

from __future__ import annotations

import json
import queue
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import KernelManager

ROOT = Path(__file__).resolve().parents[1]

# Generous: a loaded 2-core machine may take several seconds to start a kernel or to
# answer. None of these is a speed expectation; each only bounds a hang.
STARTUP_TIMEOUT = 60.0
REPLY_TIMEOUT = 60.0
# The interrupted agents would wait AGENT_WAIT seconds: a reply well before that shows
# the interrupt cut the step short instead of waiting for the agents.
INTERRUPT_REPLY_TIMEOUT = 20.0
AGENT_WAIT = 300.0

ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Defined in the kernel by every test: agents that wait like language-model calls.
SETUP = """
import asyncio
import json
import threading
import time

import mesa

import mesa_llm_parallel as mlp


class Caller(mesa.Agent):
    def __init__(self, model):
        super().__init__(model)
        self.runs = 0
        self.ended = 0

    def _started(self):
        self.runs += 1
        print(f"agent {self.unique_id} started", flush=True)

    async def astep(self):
        # The interrupt may land while the agent is still printing (ipykernel's flush
        # waits for its I/O thread, which has already sent the line): count it inside.
        try:
            self._started()
            await asyncio.sleep(self.model.latency)
        finally:
            self.ended += 1

    def step(self):
        self._started()
        deadline = time.monotonic() + self.model.latency
        while time.monotonic() < deadline and not self.model.release.is_set():
            time.sleep(0.01)


class Calls(mesa.Model):
    def __init__(self, n=20, latency=0.01):
        super().__init__(rng=1)
        self.latency = latency
        self.release = threading.Event()  # ends the sync agents' waits early
        self.parallel_stepping = True
        Caller.create_agents(self, n)

    def step(self):
        self.agents.shuffle_do("step")


def show(model):
    report = mlp.last_step_report(model)
    print("STATE " + json.dumps({
        "steps": model.steps if hasattr(model, "steps") else model.time,  # Mesa 4: time
        "time": model.time,
        "runs": sorted(a.runs for a in model.agents),
        "ended": sum(a.ended for a in model.agents),
        "path": mlp.last_loop_path(),
        "started": report and report.started,
        "interrupted": report and report.interrupted,
    }))
"""


# -- the kernel ---------------------------------------------------------------------
class Kernel:
    """A started kernel and a blocking client, read like a notebook front end does.

    Replies (shell channel) and outputs (iopub channel) are kept by the id of the
    request they answer, so several requests can be in flight at once.
    """

    def __init__(self, manager: KernelManager) -> None:
        self.manager = manager
        self.client = manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=STARTUP_TIMEOUT)
        self._replies: dict[str, dict[str, Any]] = {}
        self._streams: defaultdict[str, list[str]] = defaultdict(list)
        self._idle: set[str] = set()

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)

    def send(self, code: str) -> str:
        """Queue ``code`` for execution; return the request's id."""
        return self.client.execute(code)

    def reply(self, msg_id: str, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        """The execute reply to ``msg_id``."""
        deadline = time.monotonic() + timeout
        while msg_id not in self._replies:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no execute reply within {timeout:g} s", pytrace=False)
            try:
                msg = self.client.get_shell_msg(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            self._replies[msg["parent_header"].get("msg_id")] = msg["content"]
        return self._replies.pop(msg_id)

    def output(self, msg_id: str, timeout: float = REPLY_TIMEOUT) -> str:
        """Everything the request printed, once the kernel went idle after it."""
        self._read_iopub(lambda: msg_id in self._idle, timeout)
        return "".join(self._streams[msg_id])

    def wait_for_output(self, text: str, count: int = 1, timeout: float = REPLY_TIMEOUT) -> None:
        """Wait until the requests have printed ``text`` at least ``count`` times in all."""

        def seen() -> int:
            return sum("".join(chunks).count(text) for chunks in self._streams.values())

        self._read_iopub(lambda: seen() >= count, timeout)

    def run(self, code: str, timeout: float = REPLY_TIMEOUT) -> str:
        """Execute ``code``, check that it succeeded, and return what it printed."""
        msg_id = self.send(code)
        assert_ok(self.reply(msg_id, timeout))
        return self.output(msg_id, timeout)

    def _read_iopub(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"kernel output not seen within {timeout:g} s", pytrace=False)
            try:
                msg = self.client.get_iopub_msg(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            parent = msg["parent_header"].get("msg_id")
            if msg["msg_type"] == "stream":
                self._streams[parent].append(msg["content"]["text"])
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                self._idle.add(parent)


def assert_ok(reply: dict[str, Any]) -> None:
    if reply["status"] != "ok":
        traceback = ANSI.sub("", "\n".join(reply.get("traceback", [])))
        error = f"{reply.get('ename')}: {reply.get('evalue')}\n{traceback}"
        pytest.fail(f"cell {reply['status']} (not ok): {error}", pytrace=False)


def state(output: str) -> dict[str, Any]:
    """The last ``show(model)`` line of a cell's output."""
    lines = [line for line in output.splitlines() if line.startswith("STATE ")]
    assert lines, f"no state printed; the cell printed:\n{output}"
    return json.loads(lines[-1].removeprefix("STATE "))


@pytest.fixture
def kernel(jupyter_env, tmp_path):
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(cwd=str(tmp_path))  # not the repository: import the installed package
    try:
        started = Kernel(manager)
    except BaseException:
        manager.shutdown_kernel(now=True)
        raise
    yield started
    started.close()


# -- tests --------------------------------------------------------------------------
def test_the_kernel_runs_this_venv_and_imports_the_project_from_the_repository(kernel):
    output = kernel.run(
        "import sys, json, mesa_llm_parallel\n"
        "print(json.dumps([sys.prefix, mesa_llm_parallel.__file__]))"
    )
    prefix, module = json.loads(output)
    assert prefix == sys.prefix
    assert Path(module).resolve().is_relative_to(ROOT)


def test_run_all_queued_cells_with_parallel_steps_all_get_replies(kernel):
    """Every request is sent before any reply is read, as "Run All" does.

    With ipykernel 7 and nest_asyncio 1.6 the cells queued behind the first nested
    step never got a reply.
    """
    cells = [
        SETUP + 'mlp.enable_automatic_parallel_stepping(mode="asyncio")\nm = Calls()',
        "m.step()\nshow(m)",
        "m.step()\nshow(m)",
        'await mlp.ashuffle_do(m.agents, "step")\nshow(m)',
        "m.step()\nshow(m)",
        "m.step()\nshow(m)",
        "show(m)",
    ]
    ids = [kernel.send(code) for code in cells]
    replies = [kernel.reply(msg_id) for msg_id in ids]
    for reply in replies:
        assert_ok(reply)
    counts = [reply["execution_count"] for reply in replies]
    assert counts == list(range(counts[0], counts[0] + len(cells)))

    states = [state(kernel.output(msg_id)) for msg_id in ids[1:]]
    assert [s["steps"] for s in states] == [1, 2, 2, 3, 4, 4]
    assert [s["runs"] for s in states] == [[n] * 20 for n in (1, 2, 3, 4, 5, 5)]
    assert {s["path"] for s in states} == {"running_loop"}

    # Still answering afterwards.
    assert kernel.run("print(6 * 7)").strip() == "42"
    assert state(kernel.run("m.step()\nshow(m)"))["runs"] == [6] * 20


def test_a_step_in_a_cell_reuses_the_running_kernel_loop(kernel):
    kernel.run(SETUP)
    assert kernel.run("print(mlp.last_loop_path())").strip() == "None"
    after = state(
        kernel.run(
            'mlp.enable_automatic_parallel_stepping(mode="asyncio")\nm = Calls()\nm.step()\nshow(m)'
        )
    )
    assert after["path"] == "running_loop"
    assert after["runs"] == [1] * 20


def test_async_agents_stay_on_the_kernel_loop_across_mode_switches(kernel):
    """Threading-mode steps in a cell run async-only agents on the kernel's loop too."""
    kernel.run(
        SETUP
        + "class Recorder(mesa.Agent):\n"
        + "    async def astep(self):\n"
        + "        if self.model.alock is None:\n"
        + "            self.model.alock = asyncio.Lock()  # binds to the loop it is used on\n"
        + "        async with self.model.alock:\n"
        + "            await asyncio.sleep(0.001)\n"
        + "        self.model.loops.add(asyncio.get_running_loop())\n"
        + "class Recorders(mesa.Model):\n"
        + "    def __init__(self):\n"
        + "        super().__init__(rng=1)\n"
        + "        self.parallel_stepping, self.alock, self.loops = True, None, set()\n"
        + "        Recorder.create_agents(self, 12)\n"
        + "    def step(self):\n"
        + "        self.agents.shuffle_do('step')\n"
        + "m = Recorders()\n"
    )
    output = kernel.run(
        "for mode in ['threading', 'asyncio', 'threading', 'asyncio']:\n"
        "    mlp.enable_automatic_parallel_stepping(mode=mode)\n"
        "    m.step()\n"
        "    r = mlp.last_step_report(m)\n"
        "    print('STEP', r.mode, r.completed, len(r.failures), flush=True)\n"
        "print('LOOPS', m.loops == {asyncio.get_running_loop()}, mlp.home_loop(m) is "
        "asyncio.get_running_loop())"
    )
    assert output.count("STEP") == 4
    assert "STEP threading 12 0" in output
    assert "STEP asyncio 12 0" in output
    assert "LOOPS True True" in output


@pytest.mark.parametrize("mode", ["asyncio", "threading"])
def test_interrupt_stops_a_step_and_the_model_steps_normally_after(kernel, mode):
    kernel.run(
        SETUP
        + f"mlp.enable_automatic_parallel_stepping(mode={mode!r}, max_workers=8)\n"
        + f"m = Calls(n=20, latency={AGENT_WAIT})"
    )
    # asyncio: every agent starts at once; threading: one per worker, the rest wait.
    started = 20 if mode == "asyncio" else 8
    step = kernel.send("m.step()")
    kernel.wait_for_output("started", count=started)  # they are all inside their step
    kernel.manager.interrupt_kernel()
    reply = kernel.reply(step, timeout=INTERRUPT_REPLY_TIMEOUT)
    assert reply["status"] == "error"
    assert reply["ename"] == "KeyboardInterrupt"
    # The cell's frames and Mesa's, then one of the library's: not the loop it landed in.
    traceback = ANSI.sub("", "\n".join(reply["traceback"]))
    for internal in ("_loops.py", "asyncio/", "nest_asyncio", "selectors.py"):
        assert internal not in traceback, traceback
    assert traceback.count("mesa_llm_parallel/") == 1, traceback
    # After an error ipykernel aborts requests that arrive before it has gone idle.
    kernel.output(step)

    interrupted = state(kernel.run("show(m)"))
    assert interrupted["interrupted"] is True
    assert interrupted["started"] == started
    assert sum(interrupted["runs"]) == started
    if mode == "asyncio":  # no agent is left pending on the kernel's loop
        assert interrupted["ended"] == started

    after = state(
        kernel.run(
            "m.release.set()\n"  # let the interrupted sync agents' threads return
            "m.latency = 0.01\n"
            "for a in m.agents:\n"
            "    a.runs = 0\n"
            "m.step()\n"
            "show(m)"
        )
    )
    assert after["runs"] == [1] * 20
    assert after["steps"] == interrupted["steps"] + 1
    assert after["time"] == interrupted["time"] + 1
    assert after["interrupted"] is False
    assert after["started"] == 20


@pytest.mark.parametrize("kind", ["async", "sync"])
@pytest.mark.parametrize("mode", ["asyncio", "threading"])
def test_an_interrupted_step_shows_a_short_message_with_the_counts(kernel, mode, kind):
    setup = (
        SETUP
        + f"mlp.enable_automatic_parallel_stepping(mode={mode!r}, max_workers=8)\n"
        + f"m = Calls(n=40, latency={AGENT_WAIT})\n"
    )
    if kind == "sync":
        setup += "del Caller.astep\n"  # only the sync step: in threads in both modes
    kernel.run(setup)
    every_async_agent = mode == "asyncio" and kind == "async"
    step = kernel.send('m.agents.shuffle_do("step")')
    kernel.wait_for_output("started", count=40 if every_async_agent else 8)
    kernel.manager.interrupt_kernel()
    reply = kernel.reply(step, timeout=INTERRUPT_REPLY_TIMEOUT)
    kernel.output(step)
    kernel.run("m.release.set()")  # the sync agents' threads return

    assert reply["ename"] == "KeyboardInterrupt"
    if every_async_agent:
        counts = "0 of 40 agents finished, 40 cancelled."
    else:  # one agent per worker; the others wait for one
        counts = "0 of 40 agents finished, 32 never started; 8 started in threads"
    assert reply["evalue"].startswith(f"parallel step interrupted ({mode} mode): {counts}")
    traceback = ANSI.sub("", "\n".join(reply["traceback"]))
    assert counts in traceback
    assert len(traceback) < 1_500, traceback


def test_a_panel_run_in_a_cell_steps_on_the_kernel_loop_the_model_calls_home(kernel):
    """The panel thread sends its steps to the kernel loop; the waiting cell keeps it running."""
    kernel.run(
        SETUP
        + 'mlp.enable_automatic_parallel_stepping(mode="asyncio")\n'
        + "m = Calls()\n"
        + "m.step()"  # in a cell: the kernel's loop becomes the model's home
    )
    output = kernel.run(
        "from mesa_llm_parallel.widgets import ParallelSteppingPanel\n"
        "assert mlp.home_loop(m) is asyncio.get_running_loop()\n"
        "panel = ParallelSteppingPanel(m)\n"
        "panel.run(3)\n"
        "print('WAITED', panel.wait(30))\n"
        "assert mlp.home_loop(m) is asyncio.get_running_loop()\n"
        "panel.close()\n"
        "show(m)"
    )
    assert "WAITED True" in output
    after = state(output)
    assert after["steps"] == 4
    assert after["runs"] == [4] * 20


def test_one_async_openai_client_serves_cells_and_a_panel_run(kernel):
    """Real clients in a real kernel: steps from cells, then from a panel's thread."""
    pytest.importorskip("openai")
    kernel.run(
        "import json\n"
        "import mesa_llm_parallel as mlp\n"
        "from mesa_llm_parallel.llm_example import ChatModel\n"
        "from mesa_llm_parallel.llm_server import LoopbackLLMServer\n"
        "from mesa_llm_parallel.widgets import ParallelSteppingPanel\n"
        "server = LoopbackLLMServer(latency=0.05).start()\n"
        'mlp.enable_automatic_parallel_stepping(mode="asyncio", on_error="collect")\n'
        "m = ChatModel(20, server.base_url, seed=1)\n"
        "client = m.llm.async_client\n"
        "def seen():\n"
        "    s, r = server.stats(), mlp.last_step_report(m)\n"
        "    print('SEEN ' + json.dumps({'completed': s.completed, 'errors': s.errors,\n"
        "        'connections': s.connections, 'peak': s.peak_concurrency,\n"
        "        'failures': [repr(f.exception) for f in r.failures], 'steps': m.step_count,\n"
        "        'same_client': m.llm.async_client is client}))"
    )
    for _ in range(2):  # each cell steps on the kernel's running loop
        kernel.run("m.step()")
    panel_output = kernel.run(
        "panel = ParallelSteppingPanel(m)\n"
        "panel.run(2)\n"  # the panel's thread: the steps go to the model's home loop
        "print('WAITED', panel.wait(60))\n"
        "panel.close()\n"
        "m.step()\n"
        "seen()"
    )
    assert "WAITED True" in panel_output
    line = next(x for x in panel_output.splitlines() if x.startswith("SEEN "))
    seen = json.loads(line.removeprefix("SEEN "))
    assert seen["failures"] == []
    assert seen["steps"] == 5
    assert (seen["completed"], seen["errors"]) == (100, 0)
    assert seen["peak"] > 1  # the requests overlapped
    assert seen["connections"] <= 20  # one client, its connections reused by every step
    assert seen["same_client"] is True
    kernel.run("server.stop()")
