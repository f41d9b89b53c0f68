"""Live, validated settings for parallel stepping.

Core object: :class:`Settings`, of which the package keeps exactly one instance
(``mesa_llm_parallel.settings``).

Every assignment is validated before anything changes. The values are kept in an
immutable :class:`SettingsSnapshot` that is replaced as a whole on each change, so a
step reads one consistent snapshot when it starts and a change made by another thread
while the step runs applies from the next step on.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final, Literal

__all__ = [
    "DEFAULT_MAX_WORKERS",
    "ERROR_POLICIES",
    "MODES",
    "NOT_GIVEN",
    "Settings",
    "SettingsSnapshot",
    "UnknownSettingError",
    "settings",
]

#: The stepping modes, in the order they are documented.
MODES: Final = ("asyncio", "threading")

#: Where asyncio-mode steps run when the calling thread already runs an event loop.
LOOP_POLICIES: Final = ("auto", "background")

#: What a parallel step does when agents fail.
ERROR_POLICIES: Final = ("raise", "collect")

#: Default size of the library's thread pool.
#:
#: Agents that wait on a language model spend almost all of their time blocked on the
#: network, not on the CPU, so the pool is sized for overlapping waits rather than for
#: the number of cores (Python's own default, ``min(32, cores + 4)``, gives 6 threads on
#: a 2-core machine). An idle or waiting thread costs little memory and no CPU; 64 lets
#: a step of 1,000 agents at 50 ms finish in 16 rounds while staying well below the
#: connection limits of common HTTP clients. Set ``MESA_LLM_PARALLEL_MAX_WORKERS`` or
#: ``settings.max_workers`` to change it.
DEFAULT_MAX_WORKERS: Final = 64

Mode = Literal["asyncio", "threading"]


class _NotGiven(enum.Enum):
    NOT_GIVEN = "NOT_GIVEN"

    def __repr__(self) -> str:
        return "NOT_GIVEN"


#: The default of an option that was not passed: the current setting applies. ``None``
#: always means "no limit" (for ``max_concurrency``, ``rate_limit``, ``timeout``).
NOT_GIVEN: Final = _NotGiven.NOT_GIVEN

#: Settings that replace the live ones for the steps started in this context (see
#: :meth:`Settings.scoped`), or None.
_scope: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "mesa_llm_parallel_settings_scope", default=None
)


class UnknownSettingError(AttributeError, TypeError):
    """Raised for a setting name that does not exist.

    It is both an :class:`AttributeError` (what ``settings.name = value`` normally
    raises) and a :class:`TypeError` (what an unexpected keyword argument raises).
    """


@dataclasses.dataclass(frozen=True, slots=True)
class SettingsSnapshot:
    """One consistent set of values, read by a step when it starts.

    Attributes:
        mode: ``"asyncio"`` or ``"threading"``.
        max_workers: Size of the library's thread pool.
        max_concurrency: Most agents in flight at once in the whole process, or None.
        parallel_methods: Method names (and callables) that ``shuffle_do`` runs in parallel.
        run_sync_inline: In asyncio mode, where agents without an async method run:
            ``"auto"`` (measured per class), ``True`` (inline on the loop) or ``False``
            (the thread pool).
        loop: ``"auto"`` or ``"background"``; see :attr:`Settings.loop`.
        on_error: ``"raise"`` or ``"collect"``; see :attr:`Settings.on_error`.
        timeout: Seconds each agent may take, or None.
        rate_limit: Most agent starts per second, or None.
        progress: Show a progress bar during parallel steps.
        parallel_by_default: Step in parallel models that do not set ``parallel_stepping``.
    """

    mode: Mode = "asyncio"
    max_workers: int = DEFAULT_MAX_WORKERS
    max_concurrency: int | None = None
    parallel_methods: frozenset[str | Callable[..., Any]] = frozenset({"step"})
    run_sync_inline: bool | Literal["auto"] = "auto"
    loop: Literal["auto", "background"] = "auto"
    on_error: Literal["raise", "collect"] = "raise"
    timeout: float | None = None
    rate_limit: float | None = None
    progress: bool = False
    parallel_by_default: bool = False


def _check_positive_int(name: str, value: object, *, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    accepted = "a positive int" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {accepted}, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be {accepted} (>= 1), got {value!r}")
    return value


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        accepted = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {accepted}, got {value!r}")
    return value


def _validate_mode(value: object) -> str:
    return _check_choice("mode", value, MODES)


def _validate_max_workers(value: object) -> int:
    if value is None:
        return _default_max_workers()
    return _check_positive_int("max_workers", value, allow_none=False)  # type: ignore[return-value]


def _validate_max_concurrency(value: object) -> int | None:
    return _check_positive_int("max_concurrency", value, allow_none=True)


def _validate_parallel_methods(value: object) -> frozenset[str | Callable[..., Any]]:
    if isinstance(value, str) or callable(value):
        value = (value,)
    if not isinstance(value, Iterable):
        raise TypeError(
            f"parallel_methods must be an iterable of method names or callables, got {value!r}"
        )
    items = tuple(value)
    for item in items:
        if isinstance(item, str):
            if not item.isidentifier():
                raise ValueError(f"parallel_methods: {item!r} is not a valid method name")
        elif not callable(item):
            raise TypeError(
                f"parallel_methods entries must be method names or callables, got {item!r}"
            )
    if not items:
        raise ValueError("parallel_methods must name at least one method, got an empty collection")
    return frozenset(items)


def _validate_bool(name: str) -> Callable[[object], bool]:
    def check(value: object) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
        return value

    return check


def _validate_run_sync_inline(value: object) -> bool | str:
    if value is True or value is False or value == "auto":
        return value  # type: ignore[return-value]
    raise ValueError(f"run_sync_inline must be True, False or 'auto', got {value!r}")


def _validate_loop(value: object) -> str:
    return _check_choice("loop", value, LOOP_POLICIES)


def _validate_on_error(value: object) -> str:
    return _check_choice("on_error", value, ERROR_POLICIES)


def _positive_seconds(name: str, unit: str) -> Callable[[object], float | None]:
    def check(value: object) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(
                f"{name} must be a positive number of {unit} or None, "
                f"got {value!r} ({type(value).__name__})"
            )
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"{name} must be a positive, finite number of {unit} or None, got {value!r}"
            )
        return float(value)

    return check


def _default_max_workers() -> int:
    raw = os.environ.get("MESA_LLM_PARALLEL_MAX_WORKERS")
    if raw is None:
        return DEFAULT_MAX_WORKERS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"MESA_LLM_PARALLEL_MAX_WORKERS must be a positive integer, got {raw!r}")
    return value


_VALIDATORS: Final[Mapping[str, Callable[[object], Any]]] = {
    "mode": _validate_mode,
    "max_workers": _validate_max_workers,
    "max_concurrency": _validate_max_concurrency,
    "parallel_methods": _validate_parallel_methods,
    "run_sync_inline": _validate_run_sync_inline,
    "loop": _validate_loop,
    "on_error": _validate_on_error,
    "timeout": _positive_seconds("timeout", "seconds"),
    "rate_limit": _positive_seconds("rate_limit", "agent starts per second"),
    "progress": _validate_bool("progress"),
    "parallel_by_default": _validate_bool("parallel_by_default"),
}


class Settings:
    """The live settings of parallel stepping.

    Assigning an attribute validates the value and applies it from the next step on;
    a step already running keeps the values it started with. Reading and writing are
    safe from any thread.

    Example:
        >>> from mesa_llm_parallel import settings
        >>> settings.max_concurrency = 50      # at most 50 agents in flight
        >>> settings.update(mode="threading", max_workers=16)   # both or neither

    Attributes:
        mode: ``"asyncio"`` (default): agents' ``async def astep`` run concurrently on an
            event loop, and agents with only a sync ``step`` run in the thread pool.
            ``"threading"``: every agent's sync ``step`` runs in the thread pool; an
            agent with only ``astep`` runs it on its worker thread's own event loop.
        max_workers: Size of the library's thread pool (default
            :data:`DEFAULT_MAX_WORKERS`; ``None`` restores the default).
        max_concurrency: Most agents in flight at once in the whole process: every
            step of every model, in both modes, shares it, as a provider counts the
            calls of one account (``None``: no cap beyond the pool size for threads).
            A call that outlived its ``timeout`` in a thread counts until it returns;
            a nested step may use the permit of the agent that started it (see
            :doc:`/how-it-works`, "The concurrency cap").
        parallel_methods: Method names that ``shuffle_do`` steps in parallel (default
            ``{"step"}``). A callable passed to ``shuffle_do`` is parallel when it, or
            its ``__name__``, is in this set.
        run_sync_inline: In asyncio mode, where agents without an async method run.
            ``"auto"`` (default): each class starts in the thread pool, where its
            calls are timed; a class whose calls take under 20 us (far less than the
            ~45 us hop to a thread) runs inline on the loop from then on, unless its
            agents use ``in_turn`` or a ``timeout`` is set; an inline call that blocks
            the loop for over 10 ms sends its class back to the pool for good (see
            :doc:`/how-it-works`, "Where sync agents run"). ``True``: every such agent is
            called on the loop's thread, one after another (a blocking call blocks every
            agent; no timeout applies). ``False``: always the thread pool. A class
            attribute ``run_sync_inline = True / False / "auto"`` on an agent class
            overrides this setting for that class.
        loop: ``"auto"`` (default): a model's first asyncio step runs on the calling
            thread's own persistent loop, or on the loop already running there (a
            notebook cell) through nest-asyncio2, or on a background loop thread where
            that loop cannot be patched; that loop is the model's home, and its later
            steps run there from any thread. ``"background"``: always run asyncio
            steps on the library's background loop thread.
        on_error: ``"raise"`` (default): when an agent fails, no further agent starts,
            every agent already started finishes, and the first failure in start
            order is raised as its own type, with the others attached.
            ``"collect"``: every agent runs; failures are recorded in the step report
            (:func:`~mesa_llm_parallel.last_step_report`) and logged once per step.
        timeout: Seconds each agent may take (None: no limit). An async agent that
            overruns is cancelled; an agent running in a thread cannot be stopped, so it
            is reported and the step stops waiting for it. A timeout is a failure
            (:class:`TimeoutError`) and follows ``on_error``.
        rate_limit: Most agent starts per second, across all parallel steps of the
            process (None: no limit). Starts are spaced evenly, without bursts, so a
            step stays within a model server's request quota.
        progress: Show a progress bar (tqdm's notebook widget or terminal bar) during
            parallel steps (default False).
        parallel_by_default: Whether a model that has no ``parallel_stepping``
            attribute steps in parallel (default False: only models that set
            ``parallel_stepping = True`` do). A model that sets ``parallel_stepping =
            False`` always opts out. ``%parallel_stepping on`` with no model named sets it.
    """

    __slots__ = ("_current", "_lock")

    def __init__(self) -> None:
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_current", SettingsSnapshot(max_workers=_default_max_workers()))

    # -- reading -----------------------------------------------------------------
    def snapshot(self) -> SettingsSnapshot:
        """Return the current values as one immutable object (no locking needed).

        Inside :meth:`scoped`, the scoped values replace the live ones.
        """
        scope = _scope.get()
        if scope is None:
            return self._current
        return dataclasses.replace(self._current, **scope)

    @contextlib.contextmanager
    def scoped(self, **values: object) -> Iterator[None]:
        """Use ``values`` instead of the live settings in this context only.

        Steps started in the ``with`` block, and in threads and tasks that copy its
        context, see ``values``; the live settings, and every other context, are
        untouched. :func:`~mesa_llm_parallel.batchrunner.batch_run` runs each model this way.
        Values are validated first (as :meth:`update`); scopes nest, the inner one
        winning.

        Raises:
            UnknownSettingError, TypeError, ValueError: As :meth:`validate`.
        """
        clean = self.validate(**values)
        outer = _scope.get()
        token = _scope.set({**outer, **clean} if outer else clean)
        try:
            yield
        finally:
            _scope.reset(token)

    def as_dict(self) -> dict[str, Any]:
        """Return the current values as a plain dict."""
        return dataclasses.asdict(self._current)

    def __getattr__(self, name: str) -> Any:
        if name in _VALIDATORS:
            return getattr(self._current, name)
        raise UnknownSettingError(_unknown_message(name), name=name, obj=self)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_VALIDATORS))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())
        return f"Settings({fields})"

    # -- writing -----------------------------------------------------------------
    def __setattr__(self, name: str, value: object) -> None:
        self.update(**{name: value})

    def __delattr__(self, name: str) -> None:
        raise AttributeError(
            f"settings cannot be deleted; use reset() to restore defaults ({name!r})"
        )

    def validate(self, **values: object) -> dict[str, Any]:
        """Check ``values`` without applying them; return them normalised.

        Raises:
            UnknownSettingError: For a name that is not a setting.
            TypeError, ValueError: For a value of the wrong type or out of range.
        """
        for name in values:
            if name not in _VALIDATORS:
                raise UnknownSettingError(_unknown_message(name), name=name, obj=self)
        return {name: _VALIDATORS[name](value) for name, value in values.items()}

    def update(self, **values: object) -> None:
        """Validate all of ``values``, then apply them together (all or nothing)."""
        clean = self.validate(**values)
        with self._lock:
            object.__setattr__(self, "_current", dataclasses.replace(self._current, **clean))

    def reset(self) -> None:
        """Restore every setting to its default."""
        with self._lock:
            object.__setattr__(
                self, "_current", SettingsSnapshot(max_workers=_default_max_workers())
            )

    @staticmethod
    def names() -> tuple[str, ...]:
        """The names of all settings."""
        return tuple(_VALIDATORS)


def _unknown_message(name: str) -> str:
    accepted = ", ".join(_VALIDATORS)
    return f"unknown setting {name!r}; the settings are: {accepted}"


#: The one live settings object of the process.
settings: Final = Settings()

# A forked child keeps the values, with a lock that no thread of the parent can hold.
os.register_at_fork(after_in_child=lambda: object.__setattr__(settings, "_lock", threading.Lock()))
