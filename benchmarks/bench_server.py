"""The loopback language-model server in a process of its own, for the HTTP scenarios.

:class:`ServerProcess` starts ``python benchmarks/bench_server.py CONFIG`` (this file
run as a script) with the benchmark's own interpreter. The child runs one
:class:`~mesa_llm_parallel.testing.LoopbackLLMServer` and answers one-line commands
on its standard input with one JSON line on its standard output:

* ``stats``: the server's :class:`~mesa_llm_parallel.testing.ServerStats` as a dict;
* ``reset``: zero the totals (``reset_stats()``);
* ``cpu``: the child's CPU time so far, in seconds (``{"cpu": s}``, user + system);
* ``quit`` (or end of input): stop the server and exit.

Why a process of its own: the server parses requests and writes answers in Python. In
the benchmark's process it would take the GIL from the clients being measured, and the
reference implementation, which runs in a child process of its own, would not pay that
cost: the comparison would be unfair. In its own process it costs every client alike,
and it shares the machine's two cores with them the way a real model server would not.
"""

from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = ["ServerProcess", "raise_fd_limit"]

_HERE = Path(__file__).resolve().parent


def raise_fd_limit(wanted: int) -> tuple[int, int]:
    """Raise this process's soft limit on open files towards ``wanted``; return it.

    Each agent in flight holds a socket on each side of the loopback connection, so a
    step of 5,000 agents needs about 5,000 file descriptors in the client process and
    as many in the server process. The soft limit is raised as far as the hard limit
    allows; the returned pair is ``(soft, hard)`` after the change.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class ServerProcess:
    """A :class:`~mesa_llm_parallel.testing.LoopbackLLMServer` in a child process.

    Args:
        latency: Seconds per request (constant).
        max_concurrent: The server's cap on requests served at once (the rest queue).
        rate_limit: The server's quota in requests per second (the rest get 429).
    """

    def __init__(
        self,
        *,
        latency: float,
        max_concurrent: int | None = None,
        rate_limit: int | None = None,
    ) -> None:
        self.config = {
            "latency": latency,
            "max_concurrent": max_concurrent,
            "rate_limit": rate_limit,
        }
        self._proc: subprocess.Popen[str] | None = None
        self.base_url = ""

    def start(self) -> Self:
        """Start the child and wait until it listens."""
        self._proc = subprocess.Popen(  # noqa: S603 - our own script, fixed arguments
            [sys.executable, str(Path(__file__).resolve()), json.dumps(self.config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.base_url = self._read()["base_url"]
        return self

    def _pipes(self) -> tuple[Any, Any]:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise RuntimeError("the loopback server process is not running")
        return proc.stdin, proc.stdout

    def _read(self) -> dict[str, Any]:
        _, stdout = self._pipes()
        line = stdout.readline()
        if not line:
            code = self._proc.poll() if self._proc is not None else None
            raise RuntimeError(f"the loopback server process exited ({code})")
        return json.loads(line)

    def _ask(self, command: str) -> dict[str, Any]:
        stdin, _ = self._pipes()
        stdin.write(command + "\n")
        stdin.flush()
        return self._read()

    def stats(self) -> dict[str, int]:
        """The server's counters (see ``ServerStats``)."""
        return self._ask("stats")

    def reset_stats(self) -> None:
        """Zero the server's totals."""
        self._ask("reset")

    def cpu(self) -> float:
        """The child's CPU time so far (user + system), in seconds."""
        return self._ask("cpu")["cpu"]

    def stop(self) -> None:
        """Stop the server and wait for the child (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError, AttributeError):
            proc.stdin.write("quit\n")  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _serve(config: dict[str, Any]) -> None:
    import dataclasses

    from mesa_llm_parallel.testing import LoopbackLLMServer

    raise_fd_limit(65_536)
    server = LoopbackLLMServer(
        latency=config["latency"],
        max_concurrent=config["max_concurrent"],
        rate_limit=config["rate_limit"],
        idle_timeout=600.0,
    )
    with server:
        print(json.dumps({"base_url": server.base_url}), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "stats":
                print(json.dumps(dataclasses.asdict(server.stats())), flush=True)
            elif command == "cpu":
                print(json.dumps({"cpu": time.process_time()}), flush=True)
            elif command == "reset":
                server.reset_stats()
                print("{}", flush=True)
            elif command == "quit":
                break
            else:
                print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)


def cpu_per_request(
    agents: int = 500, latency: float = 0.1, steps: int = 4, rounds: int = 3
) -> list[dict[str, Any]]:
    """The server's and the client's CPU time per request, in milliseconds.

    ``rounds`` times: a server process and, in this process, a
    :class:`~mesa_llm_parallel.testing.ChatModel` of ``agents`` agents (one
    ``AsyncOpenAI`` client on aiohttp, one ``OpenAI`` client) stepped once to warm up,
    then ``steps`` times in asyncio mode and ``steps`` times in threading mode (64
    threads). CPU is process time (user + system): the child's for the server, this
    process's for the client. Prints and returns one row per round and mode.

    Run it with ``python benchmarks/bench_server.py --cpu-per-request``.
    """
    import mesa_llm_parallel as mlp
    from mesa_llm_parallel.testing import ChatModel

    raise_fd_limit(65_536)
    rows = []
    for round_ in range(rounds):
        with ServerProcess(latency=latency) as server:
            for mode in ("asyncio", "threading"):
                mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=64)
                model = ChatModel(agents, server.base_url, seed=1)
                model.step()  # warm: connections, imports, first-call costs
                server.reset_stats()
                server_cpu, client_cpu = server.cpu(), time.process_time()
                for _ in range(steps):
                    model.step()
                client_cpu = time.process_time() - client_cpu
                server_cpu = server.cpu() - server_cpu
                model.close()
                mlp.disable_automatic_parallel_stepping()
                mlp.shutdown()
                requests = server.stats()["completed"]
                rows.append(
                    {
                        "round": round_,
                        "mode": mode,
                        "requests": requests,
                        "server_ms": round(1000 * server_cpu / requests, 3),
                        "client_ms": round(1000 * client_cpu / requests, 3),
                        "ratio": round(server_cpu / client_cpu, 3),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--cpu-per-request"]:
        cpu_per_request()
    else:
        _serve(json.loads(sys.argv[1]))
