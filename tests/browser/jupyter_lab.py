"""A JupyterLab server for browser tests, and a client of one of its kernels.

The server runs in a process group of its own, on a free loopback port with a random
token, with its config, data, runtime and IPython folders in a temporary folder, so that
nothing of the user's Jupyter set-up is read or written. Its kernels import this
checkout's package (``PYTHONPATH``) and run on this interpreter: the ``python3``
kernelspec's ``python`` is replaced by the server's own ``sys.executable``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import BlockingKernelClient

# JupyterLab's own settings for a test: no news or update checks (requests to hosts this
# machine cannot reach, and a toast asking for consent over the page), and every cell
# kept in the page so that each one's prompt and outputs can be read.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], Any], what: str, timeout: float) -> Any:
    """Poll ``condition()`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for: {what}")
        time.sleep(0.1)


class KernelDriver:
    """Runs code in a kernel the server started, through its connection file."""

    def __init__(self, connection_file: Path) -> None:
        self.client = BlockingKernelClient(connection_file=str(connection_file))
        self.client.load_connection_file()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 60) -> str:
        """Execute ``code`` and return what it printed; fail the test on an exception."""
        printed: list[str] = []
        errors: list[str] = []

        def on_output(msg: dict[str, Any]) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content["name"] == "stdout":
                printed.append(content["text"])
            elif kind == "error":
                errors.append("\n".join(content["traceback"]))

        reply = self.client.execute_interactive(
            code, store_history=False, allow_stdin=False, timeout=timeout, output_hook=on_output
        )
        if reply["content"]["status"] != "ok" or errors:
            pytest.fail(f"the kernel failed to run:\n{code}\n{''.join(errors)}")
        return "".join(printed)

    def value(self, expression: str, timeout: float = 60) -> Any:
        """The value of a Python expression in the kernel, which must be JSON."""
        marker = uuid.uuid4().hex
        out = self.run(
            f"print({marker!r} + __import__('json').dumps({expression}) + {marker!r})",
            timeout=timeout,
        )
        _, found, rest = out.partition(marker)
        if not found:
            pytest.fail(f"no value printed for {expression!r}: {out!r}")
        return json.loads(rest.partition(marker)[0])

    def wait_for(self, expression: str, expected: Any, timeout: float = 60) -> None:
        """Poll ``expression`` in the kernel until it equals ``expected``."""
        seen: list[Any] = []

        def matches() -> bool:
            seen.append(self.value(expression))
            return seen[-1] == expected

        deadline = time.monotonic() + timeout
        while not matches():
            if time.monotonic() > deadline:
                pytest.fail(
                    f"in the kernel, {expression} stayed {seen[-1]!r} for {timeout:.0f} s, "
                    f"expected {expected!r}"
                )
            time.sleep(0.2)

    def close(self) -> None:
        self.client.stop_channels()


class JupyterLab:
    """``jupyter lab`` serving ``root_dir``, with every Jupyter folder under ``home``.

    Args:
        root_dir: The folder the server shows (notebooks are opened relative to it).
        home: An empty folder for Jupyter's config, data and runtime files and the log.
        pythonpath: Put first on the kernels' ``sys.path``.
    """

    def __init__(self, root_dir: Path, home: Path, pythonpath: Path) -> None:
        self.root_dir = root_dir
        self.home = home
        self.runtime_dir = home / "runtime"
        self.log_path = home / "jupyter-lab.log"
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._pythonpath = pythonpath
        self._process: subprocess.Popen[bytes] | None = None
        self._kernel_pids: set[int] = set()

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        config = self.home / "config"
        for name, folder in {
            "JUPYTER_CONFIG_DIR": config,
            "JUPYTER_DATA_DIR": self.home / "data",
            "JUPYTER_RUNTIME_DIR": self.runtime_dir,
            "JUPYTERLAB_SETTINGS_DIR": config / "lab" / "user-settings",
            "JUPYTERLAB_WORKSPACES_DIR": config / "lab" / "workspaces",
            "IPYTHONDIR": self.home / "ipython",
        }.items():
            folder.mkdir(parents=True, exist_ok=True)
            env[name] = str(folder)
        for plugin, values in LAB_SETTINGS.items():
            path = config / "lab" / "user-settings" / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self._pythonpath), env.get("PYTHONPATH", "")) if p
        )
        env.pop("JUPYTER_PATH", None)
        return env

    def start(self, timeout: float = 120) -> None:
        """Start the server and wait until its REST API answers."""
        command = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--port-retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root_dir}",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
        if os.geteuid() == 0:  # as in a container or CI: the server refuses root otherwise
            command.append("--allow-root")
        env = self._environment()
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(  # noqa: S603 - our own interpreter and flags
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root_dir,
                start_new_session=True,  # a process group of its own, killed as one
            )

        def answers() -> bool:
            if self._process.poll() is not None:
                pytest.fail(f"jupyter lab exited with {self._process.returncode}:\n{self.log()}")
            try:
                self.api("/api/status")
            except (OSError, urllib.error.URLError):
                return False
            return True

        wait_until(answers, f"jupyter lab to answer on {self.base_url}", timeout)

    def log(self, tail: int = 6000) -> str:
        """The end of the server's output."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-tail:]
        return ""

    def url(self, path: str) -> str:
        """An address on the server that carries the token."""
        return f"{self.base_url}/{path.lstrip('/')}?token={self.token}"

    def api(self, path: str, method: str = "GET") -> Any:
        """Call the server's REST API and return the decoded JSON (None when empty)."""
        request = urllib.request.Request(  # noqa: S310 - a loopback http address
            self.base_url + path,
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            body = response.read()
        return json.loads(body) if body else None

    def kernel_id(self, notebook: str) -> str | None:
        """The id of the kernel of the session of ``notebook`` (a path under root_dir)."""
        for session in self.api("/api/sessions"):
            if session.get("path") == notebook and session.get("kernel"):
                return session["kernel"]["id"]
        return None

    def connect(self, notebook: str, timeout: float = 120) -> KernelDriver:
        """A client of the kernel that the page started for ``notebook``."""
        kernel_id = wait_until(
            lambda: self.kernel_id(notebook), f"a kernel session for {notebook}", timeout
        )
        connection_file = self.runtime_dir / f"kernel-{kernel_id}.json"
        wait_until(connection_file.exists, f"the connection file {connection_file}", timeout)
        driver = KernelDriver(connection_file)
        self._kernel_pids.add(driver.value("__import__('os').getpid()"))
        return driver

    def stop(self) -> None:
        """Shut down every kernel, then the server's process group; kill what is left."""
        process = self._process
        if process is None:
            return
        self._process = None
        with contextlib.suppress(OSError, urllib.error.URLError, TypeError):
            for session in self.api("/api/sessions"):
                self.api(f"/api/sessions/{session['id']}", method="DELETE")
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Kernels run in sessions of their own; they also exit when the server is gone
        # (ipykernel polls its parent), but never leave one behind.
        for pid in self._kernel_pids:
            with contextlib.suppress(OSError):
                if b"ipykernel" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.killpg(pid, signal.SIGKILL)
