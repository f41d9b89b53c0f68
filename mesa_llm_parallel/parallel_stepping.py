"""The drop-in face of the library: automatic and manual parallel stepping.

Code written for ``mesa_llm.parallel_stepping`` works with only its import changed::

    from mesa_llm_parallel.parallel_stepping import enable_automatic_parallel_stepping

    class MyModel(mesa.Model):
        def __init__(self):
            super().__init__()
            self.parallel_stepping = True
            enable_automatic_parallel_stepping(mode="asyncio")

        def step(self):
            self.agents.shuffle_do("step")   # now runs the agents concurrently

Nothing in Mesa changes until :func:`enable_automatic_parallel_stepping` is called,
and models without a true ``parallel_stepping`` attribute keep stepping sequentially.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import mesa

from mesa_llm_parallel import _loops, _patch
from mesa_llm_parallel._agentsets import first_agent, shuffled_members
from mesa_llm_parallel._engine import Step, model_of, run_step_in_loop, run_step_sync
from mesa_llm_parallel._pool import pool
from mesa_llm_parallel._settings import NOT_GIVEN, Mode, settings

__all__ = [
    "ashuffle_do",
    "disable_automatic_parallel_stepping",
    "enable_automatic_parallel_stepping",
    "is_automatic_parallel_stepping_enabled",
    "set_parallel_stepping",
    "shutdown",
    "step_agents_multithreaded",
    "step_agents_parallel",
    "step_agents_parallel_sync",
    "steps_in_parallel",
    "wants_parallel_stepping",
]


def enable_automatic_parallel_stepping(
    mode: Mode = "asyncio",
    *,
    max_workers: int | Literal[NOT_GIVEN] | None = NOT_GIVEN,  # type: ignore[valid-type]
    max_concurrency: int | Literal[NOT_GIVEN] | None = NOT_GIVEN,  # type: ignore[valid-type]
    **more_options: Any,
) -> None:
    """Make ``shuffle_do`` step agents in parallel for models that ask for it.

    Installs the patch on every Mesa agent-set class (idempotent, thread-safe) and
    applies the given settings. A model steps in parallel when it has
    ``parallel_stepping = True`` and the method is one of ``settings.parallel_methods``.

    An option that is not passed keeps its current setting; one that is passed means
    what it means in :class:`~mesa_llm_parallel.Settings`, ``None`` included.

    Args:
        mode: ``"asyncio"`` or ``"threading"``; always applied.
        max_workers: Thread-pool size; ``None`` restores the default
            (:data:`~mesa_llm_parallel.DEFAULT_MAX_WORKERS`); not given: unchanged.
        max_concurrency: Most agents in flight at once in the process; ``None``: no
            cap; not given: unchanged.
        **more_options: Any other setting by name (see :class:`~mesa_llm_parallel.Settings`).

    Raises:
        ValueError: An unknown mode or an out-of-range value.
        TypeError: A value of the wrong type, or an unknown option name.
        RuntimeError: The installed Mesa has no agent-set class that can be patched.

    On any error nothing changes: the settings and the patch stay as they were.
    """
    values: dict[str, Any] = {"mode": mode, **more_options}
    if max_workers is not NOT_GIVEN:
        values["max_workers"] = max_workers
    if max_concurrency is not NOT_GIVEN:
        values["max_concurrency"] = max_concurrency
    clean = settings.validate(**values)
    with _patch._lock:
        _patch.install(settings)
        settings.update(**clean)


def disable_automatic_parallel_stepping() -> None:
    """Restore Mesa's original ``shuffle_do`` functions (idempotent, thread-safe).

    The settings are kept. A later :func:`enable_automatic_parallel_stepping` applies
    its ``mode`` argument (default ``"asyncio"``) and whatever else it is given, and
    keeps the rest.
    """
    _patch.uninstall()


def is_automatic_parallel_stepping_enabled() -> bool:
    """Whether the ``shuffle_do`` patch is currently installed."""
    return _patch.is_installed()


def _check_model(function: str, model: object) -> None:
    if isinstance(model, mesa.Model):
        return
    hint = " (an agent: pass agent.model)" if isinstance(model, mesa.Agent) else ""
    raise TypeError(
        f"{function}: model must be a Mesa model (a mesa.Model instance), "
        f"got {type(model).__name__}{hint}: {model!r}"
    )


def _check_method(function: str, method: object) -> None:
    if not (isinstance(method, str) or callable(method)):
        raise TypeError(
            f"{function}: method must be a method name (str) or a callable, "
            f"got {type(method).__name__}: {method!r}"
        )


def _agent_list(function: str, agents: object, method: object) -> list[Any]:
    """``agents`` as a list, and ``method`` checked; clear errors for the usual mix-ups."""
    if isinstance(agents, mesa.Model):
        raise TypeError(f"{function}: agents must be agents, got a model: pass model.agents")
    try:
        listed = list(agents)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(
            f"{function}: agents must be an iterable of agents (model.agents, a list), "
            f"got {type(agents).__name__}: {agents!r}"
        ) from None
    _check_method(function, method)
    return listed


def wants_parallel_stepping(model: Any) -> bool:
    """Whether ``model`` asks to step in parallel, patch or no patch.

    Its ``parallel_stepping`` attribute, read as a bool; for a model without one,
    ``settings.parallel_by_default``.

    Raises:
        TypeError: ``model`` is not a ``mesa.Model``.
    """
    _check_model("wants_parallel_stepping", model)
    return _patch.model_wants_parallel(model, settings.snapshot())


def steps_in_parallel(model: Any) -> bool:
    """Whether ``model.agents.shuffle_do("step")`` steps ``model``'s agents in parallel now.

    True when the patch is installed and the model asks for it: its
    ``parallel_stepping`` attribute is true, or it has none and
    ``settings.parallel_by_default`` is on. (Whether the method is one of
    ``settings.parallel_methods`` is the call's business: ``"step"`` is by default.)

    Raises:
        TypeError: ``model`` is not a ``mesa.Model``.
    """
    _check_model("steps_in_parallel", model)
    return _patch.is_installed() and _patch.model_wants_parallel(model, settings.snapshot())


def set_parallel_stepping(model: Any, on: bool) -> None:
    """Switch parallel stepping for ``model`` only, from its next step (thread-safe).

    Sets ``model.parallel_stepping``. Turning it on also installs the ``shuffle_do``
    patch if it is missing, keeping every setting (the mode included); turning it off
    leaves the patch for other models. This is what the ``%parallel_stepping`` magic,
    the ipywidgets panel and the Solara component do for one model.

    Raises:
        TypeError: ``model`` is not a ``mesa.Model``, or ``on`` is not a bool (nothing
            changed).
        RuntimeError: The installed Mesa has no agent-set class that can be patched
            (nothing changed).
    """
    _check_model("set_parallel_stepping", model)
    if not isinstance(on, bool):
        raise TypeError(f"set_parallel_stepping: on must be True or False, got {on!r}")
    if on:
        with _patch._lock:
            _patch.install(settings)
    model.parallel_stepping = on


async def step_agents_parallel(
    agents: Iterable[Any], method: str | Callable[..., Any] = "step", *args: Any, **kwargs: Any
) -> None:
    """Await ``method`` of every agent concurrently on the running event loop.

    Agents start in the order given (no shuffle). An agent with ``async def a<method>``
    is awaited; others run their sync method in the thread pool. Nests nothing: use it
    from code that is already async (a notebook cell with top-level ``await``).

    Raises:
        TypeError: ``agents`` is not an iterable of agents, or ``method`` is neither a
            name nor a callable.
        Exception: The first failure in start order, after every started agent finished.
    """
    agents = _agent_list("step_agents_parallel", agents, method)
    cfg = settings.snapshot()
    step = Step(entries=agents, method=method, args=args, kwargs=kwargs, cfg=cfg, mode="asyncio")
    __tracebackhide__ = True  # IPython and pytest show the caller's frames, not this one
    await run_step_in_loop(step, model_of(agents))


def step_agents_parallel_sync(
    agents: Iterable[Any], method: str | Callable[..., Any] = "step", *args: Any, **kwargs: Any
) -> None:
    """Run :func:`step_agents_parallel` from synchronous code (asyncio mode).

    Works with or without a running event loop in the calling thread; see
    :doc:`/how-it-works` for which loop is used.

    Raises:
        TypeError: ``agents`` is not an iterable of agents, or ``method`` is neither a
            name nor a callable.
    """
    agents = _agent_list("step_agents_parallel_sync", agents, method)
    cfg = settings.snapshot()
    step = Step(entries=agents, method=method, args=args, kwargs=kwargs, cfg=cfg, mode="asyncio")
    run_step_sync(step, model_of(agents))


def step_agents_multithreaded(
    agents: Iterable[Any], method: str | Callable[..., Any] = "step", *args: Any, **kwargs: Any
) -> None:
    """Run ``method`` of every agent in the library's thread pool (threading mode).

    Agents with only ``async def a<method>`` run it on their worker thread's own
    persistent event loop.

    Raises:
        TypeError: ``agents`` is not an iterable of agents, or ``method`` is neither a
            name nor a callable.
    """
    agents = _agent_list("step_agents_multithreaded", agents, method)
    cfg = settings.snapshot()
    step = Step(entries=agents, method=method, args=args, kwargs=kwargs, cfg=cfg, mode="threading")
    run_step_sync(step, model_of(agents))


async def ashuffle_do[S](
    agentset: S, method: str | Callable[..., Any] = "step", *args: Any, **kwargs: Any
) -> S:
    """Async counterpart of ``agentset.shuffle_do(method, ...)``, run on the current loop.

    Shuffles with the set's own random generator exactly as Mesa does, starts the agents
    in that order, and returns the set. It always runs in parallel, whatever the model's
    ``parallel_stepping`` flag and the mode, and never nests event loops.
    """
    if not hasattr(agentset, "_agents") or not hasattr(agentset, "random"):
        raise TypeError(
            f"ashuffle_do needs a Mesa agent set (model.agents, agents_by_type[...], "
            f"AgentSet), got {type(agentset).__name__}; use step_agents_parallel for a list"
        )
    _check_method("ashuffle_do", method)
    model = getattr(first_agent(agentset), "model", None)
    entries, resolve = shuffled_members(agentset)
    step = Step(
        entries=entries,
        resolve=resolve,
        method=method,
        args=args,
        kwargs=kwargs,
        cfg=settings.snapshot(),
        mode="asyncio",
    )
    __tracebackhide__ = True  # IPython and pytest show the caller's frames, not this one
    await run_step_in_loop(step, model)
    return agentset


def shutdown(*, wait: bool = True) -> None:
    """Release the thread pool and the library's event loops (for a clean exit).

    The patch and the settings stay; the next parallel step creates fresh ones. Call it
    when no step is running.
    """
    pool.shutdown(wait=wait)
    _loops.close_loops()
