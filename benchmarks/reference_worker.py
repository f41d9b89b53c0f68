"""Step models of HTTP agents on command, under mesa-llm 0.3.2 or under this project.

``bench_reference.py`` runs this script twice, as two child processes side by side:

* ``reference_worker.py mesa-llm`` with the interpreter of a reference venv (Mesa 3.4
  or 3.5 with ``mesa-llm==0.3.2`` and ``openai``): it imports ``mesa_llm``, whose
  import patches Mesa. Only this process runs mesa-llm's code; nothing of it is
  copied into the project;
* ``reference_worker.py ours`` with the benchmark's own interpreter: the same steps
  under ``mesa_llm_parallel`` (threading mode with 64 workers), so that both sides run
  in a fresh process of their own, with the same heap size and the same start-up.

The protocol is one JSON object per line, both ways. After start-up the worker prints
``{"ready": true, ...versions...}``; then, for each command read from standard input,
it prints one answer:

* ``{"cmd": "setup", "mode": "asyncio" | "threading" | "sequential", "n": N,
  "base_url": URL, "connections": C, "client": "persistent" | "per_step"}``: build a
  model of N agents (:class:`AsyncChatAgent` for asyncio mode, :class:`SyncChatAgent`
  otherwise) and select the mode with the implementation's
  ``enable_automatic_parallel_stepping``; "sequential" calls its
  ``disable_automatic_parallel_stepping``. With ``"client": "per_step"`` every
  ``model.step()`` makes a new ``AsyncOpenAI`` client first (what mesa-llm's asyncio
  mode needs, since it runs each step on a new event loop);
* ``{"cmd": "step"}``: one timed ``model.step()``; answers the seconds, the agents
  answered, the failed requests by kind, and the error if the step raised;
* ``{"cmd": "quit"}`` or end of input: exit.

The agents and clients are those of ``bench_http_agents.py``, the module the project's
own scenarios use, so both sides run the same agent code with the same client settings.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # mesa_llm imports offline

import mesa
import openai
from bench_http_agents import (
    AsyncChatAgent,
    HttpModel,
    SyncChatAgent,
    make_async_client,
    make_sync_client,
)
from bench_server import raise_fd_limit

#: Threading mode's pool under this project (the reference has no setting for it).
OUR_WORKERS = 64


class FreshClientModel(HttpModel):
    """Makes a new ``AsyncOpenAI`` client at the start of every step."""

    def __init__(self, *args: Any, base_url: str, connections: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._base_url = base_url
        self._connections = connections

    def step(self) -> None:
        self.async_client = make_async_client(
            self._base_url, connections=self._connections, max_retries=0
        )
        super().step()


class Implementation:
    """The parallel stepping under test: ``mesa-llm`` (0.3.2) or ``ours``."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "mesa-llm":
            import mesa_llm  # its import patches Mesa: the reference's own behaviour

            self.version = getattr(mesa_llm, "__version__", "?")
            self.stepping: Any = importlib.import_module("mesa_llm.parallel_stepping")
        elif name == "ours":
            import mesa_llm_parallel

            self.version = mesa_llm_parallel.__version__
            self.stepping = mesa_llm_parallel
        else:
            raise ValueError(f"unknown implementation {name!r}; use 'mesa-llm' or 'ours'")

    def enable(self, mode: str) -> None:
        if mode == "sequential":
            self.stepping.disable_automatic_parallel_stepping()
        elif self.name == "ours":
            self.stepping.settings.reset()
            self.stepping.enable_automatic_parallel_stepping(mode, max_workers=OUR_WORKERS)
        else:
            self.stepping.enable_automatic_parallel_stepping(mode=mode)

    def patch_state(self) -> dict[str, Any]:
        """Whether the patch reaches ``model.agents`` (what the model steps)."""
        probe = mesa.Model()
        agents_class = type(probe.agents)
        if self.name == "mesa-llm":
            patched = agents_class.shuffle_do is self.stepping._enhanced_shuffle_do
        else:
            self.enable("asyncio")
            patched = self.stepping.is_automatic_parallel_stepping_enabled()
        return {"model_agents_class": agents_class.__name__, "model_agents_patched": patched}


def _setup(impl: Implementation, command: dict[str, Any]) -> HttpModel:
    mode = command["mode"]
    impl.enable(mode)
    base_url, connections = command["base_url"], command["connections"]
    if mode == "asyncio":
        if command.get("client") == "per_step":
            return FreshClientModel(
                AsyncChatAgent, command["n"], base_url=base_url, connections=connections
            )
        client = make_async_client(base_url, connections=connections, max_retries=0)
        return HttpModel(AsyncChatAgent, command["n"], async_client=client)
    client = make_sync_client(base_url, connections=connections, max_retries=0)
    return HttpModel(SyncChatAgent, command["n"], client=client, parallel=mode != "sequential")


def _step(model: HttpModel) -> dict[str, Any]:
    model.failures = {}
    error = None
    gc.collect()
    start = time.perf_counter()
    try:
        model.step()
    except Exception as exc:  # reported to the parent, which decides
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "answered": model.answered(),
        "failures": model.failures,
        "error": error,
    }


def main(name: str) -> None:
    raise_fd_limit(65_536)
    impl = Implementation(name)
    ready = {
        "ready": True,
        "implementation": name,
        "version": impl.version,
        "python": sys.version.split()[0],
        "mesa": mesa.__version__,
        "openai": openai.__version__,
        **impl.patch_state(),
    }
    print(json.dumps(ready), flush=True)
    model: HttpModel | None = None
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command["cmd"] == "setup":
                model = None
                model = _setup(impl, command)
                answer: dict[str, Any] = {"ok": True}
            elif command["cmd"] == "step":
                if model is None:
                    raise RuntimeError("step before setup")
                answer = _step(model)
            elif command["cmd"] == "quit":
                break
            else:
                raise ValueError(f"unknown command {command['cmd']!r}")
        except Exception as exc:
            answer = {"fatal": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "mesa-llm")
