"""Run Mesa agents concurrently when their steps wait on language models.

Importing this package changes nothing in Mesa. Call
:func:`enable_automatic_parallel_stepping` and set ``model.parallel_stepping = True``
to make ``model.agents.shuffle_do("step")`` run the agents concurrently.

Core objects: :data:`settings` (the live settings), the functions of
:mod:`mesa_llm_parallel.parallel_stepping`, :func:`ashuffle_do` for async code,
:func:`in_turn` for ordered effects, :func:`last_step_report`, and
:func:`~mesa_llm_parallel.batchrunner.batch_run` for sweeps of many runs under one quota.
"""

from __future__ import annotations

from mesa_llm_parallel._loops import NestingTooDeepError, home_loop, last_loop_path
from mesa_llm_parallel._ordering import in_turn, shared_lock
from mesa_llm_parallel._placement import Placement
from mesa_llm_parallel._pool import StuckThreadsError
from mesa_llm_parallel._report import (
    AgentFailure,
    StepReport,
    add_step_callback,
    last_step_report,
    remove_step_callback,
)
from mesa_llm_parallel._settings import (
    DEFAULT_MAX_WORKERS,
    ERROR_POLICIES,
    MODES,
    NOT_GIVEN,
    Settings,
    SettingsSnapshot,
    UnknownSettingError,
    settings,
)
from mesa_llm_parallel.batchrunner import BatchRows, RunFailure, batch_run
from mesa_llm_parallel.parallel_stepping import (
    ashuffle_do,
    disable_automatic_parallel_stepping,
    enable_automatic_parallel_stepping,
    is_automatic_parallel_stepping_enabled,
    set_parallel_stepping,
    shutdown,
    step_agents_multithreaded,
    step_agents_parallel,
    step_agents_parallel_sync,
    steps_in_parallel,
    wants_parallel_stepping,
)

__version__ = "0.1.0"


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext mesa_llm_parallel``: register the ``%parallel_stepping`` magic."""
    from mesa_llm_parallel import magic

    magic.load_ipython_extension(ipython)


def unload_ipython_extension(ipython: object) -> None:
    """``%unload_ext mesa_llm_parallel``: remove the magic and uninstall the patch."""
    from mesa_llm_parallel import magic

    magic.unload_ipython_extension(ipython)


__all__ = [
    "DEFAULT_MAX_WORKERS",
    "ERROR_POLICIES",
    "MODES",
    "NOT_GIVEN",
    "AgentFailure",
    "BatchRows",
    "NestingTooDeepError",
    "Placement",
    "RunFailure",
    "Settings",
    "SettingsSnapshot",
    "StepReport",
    "StuckThreadsError",
    "UnknownSettingError",
    "__version__",
    "add_step_callback",
    "ashuffle_do",
    "batch_run",
    "disable_automatic_parallel_stepping",
    "enable_automatic_parallel_stepping",
    "home_loop",
    "in_turn",
    "is_automatic_parallel_stepping_enabled",
    "last_loop_path",
    "last_step_report",
    "remove_step_callback",
    "set_parallel_stepping",
    "settings",
    "shared_lock",
    "shutdown",
    "step_agents_multithreaded",
    "step_agents_parallel",
    "step_agents_parallel_sync",
    "steps_in_parallel",
    "wants_parallel_stepping",
]
