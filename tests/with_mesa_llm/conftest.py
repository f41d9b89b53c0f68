"""The mesa-llm integration tests: collected only where mesa-llm is installed.

mesa-llm (with litellm) is not part of the ``test`` extra: ``./dev test`` runs this
directory in a venv of its own, ``.cache/venv-mesa-llm``, with
``MESA_LLM_PARALLEL_REQUIRE_MESA_LLM=1``, which turns a missing ``mesa_llm`` into an
error. Elsewhere the test modules are not collected, and nothing is imported.

Importing ``mesa_llm`` patches ``AgentSet.shuffle_do`` for the whole process. The tests
here run in the order a user is told to follow: ``mesa_llm`` is imported (by this file,
once), then each test calls ``enable_automatic_parallel_stepping()``. The other orders
run in fresh subprocesses (``test_import_order.py``).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

REQUIRED = os.environ.get("MESA_LLM_PARALLEL_REQUIRE_MESA_LLM", "") not in ("", "0")
INSTALLED = importlib.util.find_spec("mesa_llm") is not None

if REQUIRED and not INSTALLED:
    raise pytest.UsageError(
        "MESA_LLM_PARALLEL_REQUIRE_MESA_LLM is set but mesa_llm is not installed: "
        "pip install -e '.[mesa-llm]' (./dev mesa-llm sets up its venv)"
    )
if not INSTALLED:
    collect_ignore_glob = ["test_*.py"]
else:
    # litellm fetches its model price list from the network on import unless told to
    # use the copy it ships with. ModuleLLM wants a key for the "openai/" provider;
    # the loopback server accepts any.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("OPENAI_API_KEY", "sk-loopback")

    from mesa.agentset import AgentSet, _HardKeyAgentSet

    import mesa_llm_parallel as mlp
    from mesa_llm_parallel.testing import LoopbackLLMServer

    #: Mesa's own functions, read before mesa_llm's import replaces one of them.
    MESA_ORIGINALS = {cls: cls.__dict__["shuffle_do"] for cls in (AgentSet, _HardKeyAgentSet)}

    import mesa_llm  # noqa: F401  (its import patches AgentSet.shuffle_do)

    class _LiteLLMClients:
        """Closes litellm's cached async clients, on the loop the asyncio steps ran on."""

        async def aclose(self) -> None:
            import litellm

            await litellm.close_litellm_async_clients()

    @pytest.fixture(scope="session", autouse=True)
    def _left_as_found():
        """After the session: litellm's connections closed, Mesa's own ``shuffle_do``.

        litellm keeps one async client per event loop. Closed at exit by litellm's own
        hook, on a new loop, its aiohttp connections cannot finish closing ("coroutine
        '_wait_for_close' was never awaited"); closed here, on their loop, they can.
        """
        yield
        mlp.step_agents_parallel_sync([_LiteLLMClients()], "close")
        mlp.disable_automatic_parallel_stepping()
        for cls, function in MESA_ORIGINALS.items():
            cls.shuffle_do = function

    @pytest.fixture
    def server():
        """A loopback server whose latency is long next to a request's client-side cost.

        With 0.5 s per request, requests sent together by concurrent agents are all on
        the server at once, so its peak concurrency counts how many the step overlapped.
        """
        with LoopbackLLMServer(latency=0.5) as running:
            yield running


def pytest_configure(config):
    # litellm's pydantic models, built on its first request: noise, not our concern.
    config.addinivalue_line(
        "filterwarnings", "ignore:Items? .* (is|are) using the `ReadOnly` qualifier:UserWarning"
    )


def pytest_terminal_summary(terminalreporter):
    if not INSTALLED:
        terminalreporter.write_line(
            "tests/with_mesa_llm not collected: mesa-llm is not installed here "
            "(./dev mesa-llm runs them in .cache/venv-mesa-llm)"
        )
