"""Parameter sweeps whose runs overlap under one quota: :func:`batch_run`.

Mesa's ``batch_run`` steps one model at a time per process, and each process it starts
has a rate limiter of its own. Here the runs of a sweep step at once, each model
parallel-stepping, and every agent of every run, in this process or any other the
executor uses, counts against one ``max_concurrency`` and one ``rate_limit``: the quota
a language-model provider grants one account. The rows are Mesa 3.5.1's, on every Mesa
this library supports (Mesa 4.0 has no ``batch_run``).

Where the runs go:

* no ``executor`` and ``number_processes=1`` (the default): threads of this process,
  up to :data:`DEFAULT_RUNS_AT_ONCE` runs at once; the process-wide quota is the
  library's own (``settings.max_concurrency`` and ``settings.rate_limit``, or the
  values given here);
* ``number_processes`` > 1 (or None: one per CPU): a process pool started with
  ``spawn`` (the program's start method is left alone), one run per process at a
  time, as in Mesa; the quota lives in a :mod:`multiprocessing` manager;
* ``executor=``: any :class:`concurrent.futures.Executor`; as many runs at once as it
  runs tasks at once. A ``ThreadPoolExecutor`` shares this process's quota; a Dask
  ``Client.get_executor()`` shares one through the cluster's scheduler (a
  ``distributed.Semaphore``, a start schedule on an Actor, a ``distributed.Event`` to
  stop); any other executor (a ``ProcessPoolExecutor``) through a manager on this
  machine.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import dataclasses
import inspect
import itertools
import logging
import math
import numbers
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

from mesa_llm_parallel import _loops, _patch, _shared
from mesa_llm_parallel._engine import StopScope, progress_bar, stop_scope
from mesa_llm_parallel._settings import ERROR_POLICIES, NOT_GIVEN, settings

__all__ = ["DEFAULT_RUNS_AT_ONCE", "BatchRows", "RunFailure", "batch_run"]

logger = logging.getLogger("mesa_llm_parallel")

#: How many runs step at once in this process when no executor is given. Each run
#: holds its model in memory and a thread; past the quota more runs only wait, so the
#: bound is about memory, not speed: 32 runs of 50 agents keep 1,600 agents ready,
#: well above the calls in flight a provider grants an account (tens to hundreds).
DEFAULT_RUNS_AT_ONCE: Final = 32

#: After an interrupt, how long the runs already stepping get to wind down (their
#: agents are cancelled; calls running in threads finish), in seconds.
_WIND_DOWN: Final = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class RunFailure:
    """One run of a batch that raised.

    Attributes:
        run_id: The run's ``RunId`` (its place in the sweep, from 0).
        iteration: The index of its seed in ``rng`` (Mesa's ``iteration``).
        parameters: The keyword arguments the model was made with, the seed included.
        exception: What the run raised. From another process, it carries the worker's
            traceback as a note.
    """

    run_id: int
    iteration: int
    parameters: dict[str, Any]
    exception: BaseException


class BatchRows(list[dict[str, Any]]):
    """The rows of a batch: a list of dicts, as Mesa's ``batch_run`` returns.

    Attributes:
        failures: The runs that raised, by ``RunId`` (with ``on_error="collect"``; on
            an exception or interrupt, those seen so far).
        runs: How many runs the batch had.
    """

    failures: tuple[RunFailure, ...] = ()
    runs: int = 0


# -- one run ----------------------------------------------------------------------------
class _RunCancelledError(KeyboardInterrupt):
    """Raised in a run's thread to stop it: the batch was interrupted."""


def _raise_in_thread(thread_id: int, error: type[BaseException] | None) -> None:
    # The interpreter raises ``error`` in that thread at its next bytecode (None
    # withdraws a pending one): the way a Ctrl-C reaches a step, and handled as one.
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(error) if error is not None else None
    )


class _RunControl:
    """Stops one run, from any thread: before it starts, or inside its current step."""

    __slots__ = ("_lock", "_model", "_sent", "_stepping", "_thread", "cancelled", "scope")

    def __init__(self) -> None:
        #: The run's parallel steps, halted together with every other run's first.
        self.scope = StopScope()
        self._lock = threading.Lock()
        self._thread = 0
        self._stepping = False
        self._sent = False
        self._model: weakref.ref[Any] | None = None
        self.cancelled = False

    def enter(self, model: Any) -> None:
        with self._lock:
            if self.cancelled:
                raise _RunCancelledError
            self._thread = threading.get_ident()
            with contextlib.suppress(TypeError):
                self._model = weakref.ref(model)
            self._stepping = True

    def leave(self) -> None:
        with self._lock:
            if self._stepping and self._sent:
                _raise_in_thread(self._thread, None)  # still pending (if sent so): withdrawn
            self._stepping = False

    def halt(self) -> None:
        """Start no more agents in the run's steps (any thread; before :meth:`cancel`)."""
        self.scope.halt()

    def cancel(self) -> None:
        """Stop the run: at its next step, or now, inside the step it is taking.

        A step in asyncio mode is stopped between two callbacks of its loop, where the
        engine's bookkeeping (permits, counters) is never half done: the stop is raised
        there as an interrupt, and the step unwinds as after a Ctrl-C. A thread that
        waits for a threading-mode step, and runs no loop, gets it raised in that wait.
        """
        with self._lock:
            self.cancelled = True
            if not self._stepping or self._sent:
                return
            self._sent = True
            model = self._model() if self._model is not None else None
            loop = _loops.home_loop(model) if model is not None else None
            if loop is not None and loop.is_running():
                with contextlib.suppress(RuntimeError):  # closed meanwhile
                    loop.call_soon_threadsafe(self._raise_here)
                    return
            _raise_in_thread(self._thread, _RunCancelledError)

    def _raise_here(self) -> None:
        """On the loop of the run's step: raise the stop if this is the run's thread."""
        with self._lock:
            if not self._stepping:
                return  # the run ended meanwhile
            if threading.get_ident() != self._thread:  # a loop shared with other threads
                _raise_in_thread(self._thread, _RunCancelledError)
                return
        raise _RunCancelledError


@dataclasses.dataclass(slots=True)
class _RunTask:
    """Everything one run needs, sent to wherever it runs (picklable but ``local``)."""

    model_cls: Any
    run_id: int
    iteration: int
    kwargs: dict[str, Any]
    max_steps: int
    data_collection_period: int
    scope: dict[str, Any]
    quota: Any = None  # a _shared.Quota, for runs in other processes
    local: Any = None  # a _LocalRuns, for runs in this process (never pickled)

    def __getstate__(self) -> dict[str, Any]:
        state = {name: getattr(self, name) for name in self.__slots__}
        state["local"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


@dataclasses.dataclass(slots=True)
class _Outcome:
    run_id: int
    rows: list[dict[str, Any]] | None = None
    error: BaseException | None = None
    cancelled: bool = False


class _LocalRuns:
    """The controls of a batch's runs in this process, to cancel them on interrupt."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._controls: set[_RunControl] = set()
        self.stopped = False

    def add(self, control: _RunControl) -> None:
        with self._lock:
            self._controls.add(control)
            stopped = self.stopped
        if stopped:
            control.halt()
            control.cancel()

    def discard(self, control: _RunControl) -> None:
        with self._lock:
            self._controls.discard(control)

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            controls = list(self._controls)
        # Every run stops starting agents before any is interrupted: the permits that
        # interrupted agents give back start nothing in the runs interrupted next.
        for control in controls:
            control.halt()
        for control in controls:
            control.cancel()


def _execute(task: _RunTask) -> _Outcome:
    """Run one model of the batch to its end and return its rows (in any process)."""
    control = _RunControl()
    remote = task.local is None
    if remote and task.quota is not None:
        _shared.join(task.quota, control)
    elif task.local is not None:
        task.local.add(control)
    # A cancellation is raised in this thread only while the run steps (between
    # control.enter and control.leave, both inside _run_model), so it lands in the try.
    try:
        rows = _run_model(task, control)
    except _RunCancelledError:
        return _Outcome(task.run_id, cancelled=True)
    except Exception as error:
        return _Outcome(task.run_id, error=_portable(error) if remote else error)
    finally:
        control.leave()
        if remote and task.quota is not None:
            _shared.leave(control)
        elif task.local is not None:
            task.local.discard(control)
    return _Outcome(task.run_id, rows=rows)


def _run_model(task: _RunTask, control: _RunControl) -> list[dict[str, Any]]:
    if not _patch.is_installed():
        with _patch._lock:
            _patch.install(settings)
    scope_token = stop_scope.set(control.scope)
    try:
        return _run_scoped(task, control)
    finally:
        stop_scope.reset(scope_token)


def _run_scoped(task: _RunTask, control: _RunControl) -> list[dict[str, Any]]:
    with settings.scoped(**task.scope):
        if control.cancelled:
            raise _RunCancelledError
        model = task.model_cls(**task.kwargs)
        if getattr(model, "parallel_stepping", None) is None:
            model.parallel_stepping = True  # the model left it unset: batch runs step in parallel
        control.enter(model)
        try:
            while model.running and _model_time(model) < task.max_steps:
                if control.cancelled:  # the interrupt was swallowed by code in the step
                    raise _RunCancelledError
                model.step()
        finally:
            control.leave()
    return _rows(model, task.run_id, task.iteration, task.kwargs, task.data_collection_period)


def _model_time(model: Any) -> float:
    """Steps taken: ``model.steps`` (Mesa 3), or ``model.time`` (Mesa 4 has no ``steps``)."""
    steps = getattr(model, "steps", None)
    return model.time if steps is None else steps


def _portable(error: BaseException) -> BaseException:
    """``error`` as it can travel back from another process, with its traceback as text."""
    import pickle
    import traceback

    text = "".join(traceback.format_exception(error))
    try:
        pickle.loads(pickle.dumps(error))  # noqa: S301 (our own bytes, this process)
    except Exception:
        error = RuntimeError(f"{type(error).__qualname__}: {error}")
    error.add_note(f"Traceback in the worker process (pid {os.getpid()}):\n{text}")
    return error


# -- Mesa 3.5.1's rows ------------------------------------------------------------------
def _rows(
    model: Any, run_id: int, iteration: int, kwargs: dict[str, Any], period: int
) -> list[dict[str, Any]]:
    """The rows Mesa 3.5.1's ``batch_run`` makes for one finished model."""
    collector = getattr(model, "datacollector", None)
    recorded = getattr(collector, "_collection_steps", None)
    if recorded is None:  # no collector, or Mesa < 3.4's, which keeps no step list
        last = int(_model_time(model))
        steps = list(range(0, last, period))
        if not steps or steps[-1] != last - 1:
            steps.append(last - 1)
    elif period == -1:
        steps = list(recorded[-1:])
    else:
        steps = list(recorded[::period])
    if collector is None:
        raise AttributeError(
            f"{type(model).__name__} has no datacollector attribute: batch_run reads its "
            "rows from model.datacollector (a mesa.DataCollector made in __init__)"
        )
    rows: list[dict[str, Any]] = []
    for step in steps:
        model_data, agents_data = _collected_at(collector, step)
        base = {"RunId": run_id, "iteration": iteration, "Step": step, **kwargs, **model_data}
        if agents_data:
            rows.extend({**base, **agent_data} for agent_data in agents_data)
        else:
            rows.append(base)
    return rows


def _collected_at(collector: Any, step: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Model values and agent records the collector holds for ``step`` (Mesa 3.5.1's rule)."""
    model_vars = collector.model_vars
    recorded = getattr(collector, "_collection_steps", None)
    if recorded is not None:
        # The latest collection at or before ``step``; the first one if none.
        index = max(0, bisect.bisect_right(recorded, step) - 1)
        try:
            model_data = {name: values[index] for name, values in model_vars.items()}
        except IndexError:
            model_data = {}
    else:
        available = sorted(collector._agent_records)
        if step not in available:
            step = max((s for s in available if s <= step), default=0)
        index = available.index(step) if step in available else 0
        model_data = {name: values[index] for name, values in model_vars.items()}
    agents: list[dict[str, Any]] = []
    names = collector.agent_reporters
    for record in collector._agent_records.get(step, []):
        agents.append({"AgentID": record[1], **dict(zip(names, record[2:], strict=False))})
    for agent_type, records in collector._agenttype_records.get(step, {}).items():
        names = collector.agenttype_reporters[agent_type]
        for record in records:
            agents.append({"AgentID": record[1], **dict(zip(names, record[2:], strict=False))})
    return model_data, agents


# -- the sweep --------------------------------------------------------------------------
def _parameter_sets(parameters: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination of ``parameters`` (Mesa's rule for single values and iterables)."""
    choices = []
    for name, values in parameters.items():
        if isinstance(values, str):
            options = [values]
        elif isinstance(values, list | tuple | set) and not values:
            raise ValueError(
                f"batch_run: parameter {name!r} has no values ({values!r}); give at least "
                "one value, or leave the parameter out"
            )
        else:
            try:
                options = list(values)
            except TypeError:
                options = [values]
        choices.append([(name, value) for value in options])
    return [dict(combination) for combination in itertools.product(*choices)]


def _seeds(iterations: int | None, rng: Any) -> list[Any]:
    if iterations is not None and rng is not None:
        raise ValueError(
            f"batch_run: give rng (a list of seeds) or iterations, not both "
            f"(got iterations={iterations!r} and rng={rng!r}); iterations=n is rng=[None] * n"
        )
    if iterations is not None:
        iterations = _check_int("iterations", iterations, minimum=0)
        warnings.warn(
            "batch_run: iterations is deprecated, as in Mesa; pass rng=[None] * "
            f"{iterations} (or a list of seeds) instead",
            DeprecationWarning,
            stacklevel=3,
        )
        return [None] * iterations
    if isinstance(rng, Iterable) and not isinstance(rng, str | bytes):
        return list(rng)
    return [rng]


def _check_int(name: str, value: object, *, minimum: int, allow: tuple[int, ...] = ()) -> int:
    """``value`` as an int (a NumPy integer is one), checked against ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"batch_run: {name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < minimum and value not in allow:
        also = "".join(f" or {a}" for a in allow)
        raise ValueError(f"batch_run: {name} must be >= {minimum}{also}, got {value!r}")
    return value


def _check_max_steps(value: object) -> float:
    """Any real number of steps, as Mesa compares ``model.steps < max_steps``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"batch_run: max_steps must be a number, got {value!r}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"batch_run: max_steps must be >= 0, got {value!r}")
    return value  # type: ignore[return-value]


def batch_run(
    model_cls: type[Any],
    parameters: Mapping[str, Any],
    number_processes: int | None = 1,
    iterations: int | None = None,
    data_collection_period: int = -1,
    max_steps: int = 1000,
    display_progress: bool = True,
    rng: Any = None,
    *,
    executor: concurrent.futures.Executor | None = None,
    max_concurrency: int | Literal[NOT_GIVEN] | None = NOT_GIVEN,  # type: ignore[valid-type]
    rate_limit: float | Literal[NOT_GIVEN] | None = NOT_GIVEN,  # type: ignore[valid-type]
    on_error: Literal["raise", "collect"] = "raise",
) -> BatchRows:
    """Run ``model_cls`` for every parameter set and seed, the runs overlapping.

    A drop-in for Mesa 3.5.1's ``mesa.batch_run``: the same arguments, the same rows,
    for the same seeds (Mesa 4 has no ``batch_run``; this one works there too). Each
    model steps in parallel (a model that leaves ``parallel_stepping`` unset gets
    ``True``; one that sets ``False`` keeps it), and all the runs share one quota.

    The runs' asyncio steps share their process's background loop (``loop=
    "background"`` for them): with one loop per run thread, 16 runs at once let a
    loop wait 100 ms and more for the interpreter, starts that were due meanwhile left
    together, and 2 of 4,000 requests got a 429 at 90% of the server's quota
    (docs/benchmarks.md, scenario 15); on one loop, none did.

    Args:
        model_cls: The model class; it must make a ``datacollector`` (rows are read
            from it, as Mesa does).
        parameters: Keyword arguments for the model: a single value, or an iterable of
            values to sweep (a string is a single value; an empty list is an error).
            Every combination is run.
        number_processes: With no ``executor``: 1 (default) runs in this process, up to
            :data:`DEFAULT_RUNS_AT_ONCE` at once; more (None: one per CPU) starts a
            pool of that many ``spawn`` processes, each running one run at a time as in
            Mesa (for models whose own CPU work outweighs their waiting); the quota is
            then shared through a :mod:`multiprocessing` manager. Must stay 1 when an
            ``executor`` is given.
        iterations: Deprecated, as in Mesa: ``iterations=n`` is ``rng=[None] * n``.
        data_collection_period: -1 (default): the rows of the last collection only;
            1: every collection; n: every n-th collection (Mesa 3.5.1's rule).
        max_steps: Most ``model.step()`` calls per run (``model.time`` on Mesa 4);
            a run also ends when ``model.running`` becomes False.
        display_progress: A progress bar over runs (tqdm's: a widget in a notebook).
        rng: A seed, or a list of seeds: one run per seed and parameter set, passed as
            ``rng=`` (or ``seed=``, if the model's signature has it). Default: one run
            per parameter set with ``None``.
        executor: Where the runs go instead (see the module's documentation): any
            :class:`concurrent.futures.Executor`, left running afterwards. Runs in
            other processes need the model class importable there: a spawn-based
            process pool cannot take a class defined in a notebook cell, a Dask
            executor can (Dask pickles it by value).
        max_concurrency: Most agents in flight at once across every run, wherever it
            runs; None: no cap; not given: ``settings.max_concurrency``.
        rate_limit: Most agent starts per second across every run; None: no limit;
            not given: ``settings.rate_limit``.
        on_error: ``"raise"`` (default, as Mesa): a failing run never stops the others;
            once every run ended, the first failure (by ``RunId``) is raised as its own
            type, with ``exception.mesa_llm_parallel_rows`` (the rows of every run that
            finished, a :class:`BatchRows`) and ``exception.mesa_llm_parallel_run_failures``
            (every :class:`RunFailure`) attached. ``"collect"``: the rows come back, and
            ``rows.failures`` lists the failed runs.

    Returns:
        The rows, ordered by ``RunId``: one dict per agent record (or one per
        collection when there are no agent reporters) with ``RunId``, ``iteration``,
        ``Step``, the parameters, the seed, and the model's and agents' reporters.

    Raises:
        KeyboardInterrupt: Ctrl-C or the kernel's stop button: runs not finished are
            cancelled (their agents in this process, and in every worker, stop, and
            their quota is freed) and the rows of the finished runs are attached as
            ``exception.mesa_llm_parallel_rows``.
        TypeError, ValueError: A bad argument, named in the message; nothing has run.
    """
    # -- checks: all before anything runs ---------------------------------------------
    if not isinstance(model_cls, type):
        raise TypeError(f"batch_run: model_cls must be a model class, got {model_cls!r}")
    if not isinstance(parameters, Mapping):
        raise TypeError(
            f"batch_run: parameters must be a mapping of keyword arguments, got {parameters!r}"
        )
    if number_processes is not None:
        number_processes = _check_int("number_processes", number_processes, minimum=1)
    data_collection_period = _check_int(
        "data_collection_period", data_collection_period, minimum=1, allow=(-1,)
    )
    max_steps = _check_max_steps(max_steps)
    if on_error not in ERROR_POLICIES:
        accepted = ", ".join(repr(p) for p in ERROR_POLICIES)
        raise ValueError(f"batch_run: on_error must be one of {accepted}, got {on_error!r}")
    if executor is not None and not isinstance(executor, concurrent.futures.Executor):
        raise TypeError(
            f"batch_run: executor must be a concurrent.futures.Executor (a "
            f"ThreadPoolExecutor, a ProcessPoolExecutor, Dask's Client.get_executor()), "
            f"got {executor!r}"
        )
    if executor is not None and number_processes != 1:
        raise ValueError(
            f"batch_run: number_processes={number_processes!r} with an executor: the "
            "executor decides where the runs go; leave number_processes at 1"
        )
    quota_values: dict[str, Any] = {}
    if max_concurrency is not NOT_GIVEN:
        quota_values["max_concurrency"] = max_concurrency
    if rate_limit is not NOT_GIVEN:
        quota_values["rate_limit"] = rate_limit
    quota_values = settings.validate(**quota_values)
    seeds = _seeds(iterations, rng)
    parameter_sets = _parameter_sets(parameters)
    seed_name = "seed" if "seed" in inspect.signature(model_cls).parameters else "rng"

    where = _where(executor, number_processes)
    if where != "local":
        _check_importable(model_cls, where)
    current = settings.snapshot()
    cap = quota_values.get("max_concurrency", current.max_concurrency)
    rate = quota_values.get("rate_limit", current.rate_limit)

    tasks = []
    for run_id, (iteration, seed, kwargs) in enumerate(
        (i, seed, dict(p)) for i, seed in enumerate(seeds) for p in parameter_sets
    ):
        kwargs[seed_name] = seed
        tasks.append(
            _RunTask(model_cls, run_id, iteration, kwargs, max_steps, data_collection_period, {})
        )

    with _Batch(where, executor, number_processes, len(tasks), cap, rate) as batch:
        if where == "local":
            scope = {**quota_values, "progress": False, "loop": "background"}
        else:
            scope = _portable_settings(current, cap, rate)
        for task in tasks:
            task.scope = scope
            task.quota = batch.quota
            task.local = batch.local
        outcomes = batch.run(tasks, display_progress)
    return _finish(tasks, outcomes, on_error)


def _where(executor: Any, number_processes: int | None) -> str:
    if executor is None:
        return "local" if number_processes == 1 else "manager"
    if isinstance(executor, concurrent.futures.ThreadPoolExecutor):
        return "local"
    if type(executor).__module__.startswith("distributed.") and hasattr(executor, "_client"):
        return "dask"
    return "manager"


def _check_importable(model_cls: type, where: str) -> None:
    if where == "dask":
        return  # Dask pickles classes of __main__ by value (cloudpickle)
    module = sys.modules.get(model_cls.__module__)
    if model_cls.__module__ == "__main__" and not getattr(module, "__file__", None):
        raise TypeError(
            f"batch_run: {model_cls.__qualname__} is defined in a notebook cell or an "
            "interactive session, which a spawn-based process pool cannot import: move it "
            "into a module, use the default in-process runs (number_processes=1), or a "
            "Dask executor (Client().get_executor())"
        )
    if "<locals>" in model_cls.__qualname__:
        raise TypeError(
            f"batch_run: {model_cls.__qualname__} is defined inside a function, which "
            "another process cannot import: define it at the top level of a module"
        )


def _portable_settings(current: Any, cap: int | None, rate: float | None) -> dict[str, Any]:
    """The caller's settings, for steps in other processes (method names only).

    Like runs in this process, runs elsewhere step on their process's background loop
    (see :func:`batch_run`).
    """
    values = dataclasses.asdict(current)
    values["parallel_methods"] = frozenset(
        m for m in current.parallel_methods if isinstance(m, str)
    ) or frozenset({"step"})
    values.update(max_concurrency=cap, rate_limit=rate, progress=False, loop="background")
    return values


class _Batch:
    """One call of :func:`batch_run`: its executor, its quota, its interrupts."""

    def __init__(
        self,
        where: str,
        executor: Any,
        number_processes: int | None,
        runs: int,
        cap: int | None,
        rate: float | None,
    ) -> None:
        self.where = where
        self.executor = executor
        self.owned = executor is None
        self.number_processes = number_processes
        self.runs = runs
        self.cap = cap
        self.rate = rate
        self.key = f"mesa-llm-parallel-{os.urandom(16).hex()}"
        self.quota: Any = None
        self.local: _LocalRuns | None = None
        self.manager: Any = None
        self.start_method_unchosen = False

    def __enter__(self) -> _Batch:
        import multiprocessing  # only here: a script that never sweeps does not load it

        # A manager or a process pool fixes the program's default start method when
        # none was chosen (the standard library asks for it on the way): put it back.
        self.start_method_unchosen = multiprocessing.get_start_method(allow_none=True) is None
        spawn = multiprocessing.get_context("spawn")
        if self.where == "local":
            self.local = _LocalRuns()
            if self.executor is None:
                self.executor = concurrent.futures.ThreadPoolExecutor(
                    max(1, min(self.runs, DEFAULT_RUNS_AT_ONCE)),
                    thread_name_prefix="mesa-llm-parallel-run",
                )
        elif self.where == "dask":
            client = self.executor._client
            self.quota = _shared.DaskQuota.create(client, self.key, self.cap, self.rate)
        else:
            self.manager = spawn.Manager()
            self.quota = _shared.ManagerQuota(self.manager, self.key, self.cap)
            if self.executor is None:
                self.executor = concurrent.futures.ProcessPoolExecutor(
                    self.number_processes or os.cpu_count() or 1,
                    mp_context=spawn,
                    initializer=_ignore_interrupts,
                )
        return self

    def __exit__(self, *exc_info: object) -> None:
        interrupted = exc_info[0] is not None
        if self.owned and self.executor is not None:
            self.executor.shutdown(wait=not interrupted, cancel_futures=True)
        if isinstance(self.quota, _shared.DaskQuota):
            self.quota.close()
        if self.manager is not None:
            self.manager.shutdown()
        if self.where != "local":
            import multiprocessing

            if self.start_method_unchosen:
                multiprocessing.set_start_method(None, force=True)

    def stop(self) -> None:
        """Cancel the runs not finished, wherever they run."""
        if self.local is not None:
            self.local.stop()
        if self.quota is not None:
            with contextlib.suppress(Exception):
                self.quota.request_stop()

    def run(self, tasks: list[_RunTask], display_progress: bool) -> dict[int, _Outcome]:
        outcomes: dict[int, _Outcome] = {}
        futures = {self.executor.submit(_execute, task): task.run_id for task in tasks}
        pending = set(futures)
        bar = (
            progress_bar(total=len(tasks), unit="run", desc="batch_run")
            if display_progress
            else None
        )
        try:
            while pending:
                done, pending = concurrent.futures.wait(
                    pending, timeout=0.1, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in done:
                    outcomes[futures[future]] = _outcome_of(future, futures[future])
                if done and bar is not None:
                    bar.update(len(done))
        except KeyboardInterrupt:
            self.stop()
            for future in pending:
                future.cancel()
            self._wind_down(pending, futures, outcomes)
            raise _interrupted(tasks, outcomes) from None
        finally:
            if bar is not None:
                bar.close()
        return outcomes

    def _wind_down(
        self, pending: set[Any], futures: dict[Any, int], outcomes: dict[int, _Outcome]
    ) -> None:
        """Give the runs being cancelled a moment to stop; a second Ctrl-C stops waiting."""
        deadline = time.monotonic() + _WIND_DOWN
        with contextlib.suppress(KeyboardInterrupt):
            while pending and time.monotonic() < deadline:
                done, pending = concurrent.futures.wait(pending, timeout=0.1)
                for future in done:
                    if not future.cancelled():
                        outcomes[futures[future]] = _outcome_of(future, futures[future])


def _ignore_interrupts() -> None:
    # Ctrl-C in a terminal reaches every process of the group: the caller handles it
    # for the whole batch, so the pool's workers must not die of it mid-run.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _outcome_of(future: concurrent.futures.Future[_Outcome], run_id: int) -> _Outcome:
    if future.cancelled():
        return _Outcome(run_id, cancelled=True)
    error = future.exception()
    if error is not None:  # the executor failed to run it (a broken pool, pickling)
        return _Outcome(run_id, error=error)
    return future.result()


def _collect(
    tasks: list[_RunTask], outcomes: dict[int, _Outcome]
) -> tuple[BatchRows, list[RunFailure]]:
    rows = BatchRows()
    failures = []
    for task in tasks:
        outcome = outcomes.get(task.run_id)
        if outcome is None:
            continue
        if outcome.rows is not None:
            rows.extend(outcome.rows)
        elif outcome.error is not None:
            failures.append(RunFailure(task.run_id, task.iteration, task.kwargs, outcome.error))
    rows.failures = tuple(failures)
    rows.runs = len(tasks)
    return rows, failures


def _interrupted(tasks: list[_RunTask], outcomes: dict[int, _Outcome]) -> KeyboardInterrupt:
    rows, failures = _collect(tasks, outcomes)
    finished = sum(1 for o in outcomes.values() if o.rows is not None)
    cancelled = len(tasks) - finished - len(failures)
    error = KeyboardInterrupt()
    error.mesa_llm_parallel_rows = rows  # type: ignore[attr-defined]
    error.mesa_llm_parallel_run_failures = tuple(failures)  # type: ignore[attr-defined]
    failed = f", {len(failures)} had failed" if failures else ""
    error.add_note(
        f"batch_run interrupted: {finished} of {len(tasks)} runs had finished{failed} (rows "
        f"in exception.mesa_llm_parallel_rows, failures in "
        f"exception.mesa_llm_parallel_run_failures); the other {cancelled} were cancelled."
    )
    return error


def _finish(tasks: list[_RunTask], outcomes: dict[int, _Outcome], on_error: str) -> BatchRows:
    rows, failures = _collect(tasks, outcomes)
    if failures and on_error == "raise":
        first = failures[0].exception
        first.mesa_llm_parallel_rows = rows  # type: ignore[attr-defined]
        first.mesa_llm_parallel_run_failures = tuple(failures)  # type: ignore[attr-defined]
        listed = ", ".join(f"RunId {f.run_id} {f.parameters}" for f in failures[:3])
        more = f" and {len(failures) - 3} more" if len(failures) > 3 else ""
        first.add_note(
            f"batch_run: {len(failures)} of {len(tasks)} runs failed ({listed}{more}); the "
            "other runs finished. Their rows are in exception.mesa_llm_parallel_rows, every "
            "failure in exception.mesa_llm_parallel_run_failures; on_error='collect' "
            "returns the rows instead."
        )
        raise first
    if failures:
        logger.warning(
            "batch_run: %d of %d runs failed (first: RunId %d, %r); see rows.failures",
            len(failures),
            len(tasks),
            failures[0].run_id,
            failures[0].exception,
        )
    return rows
