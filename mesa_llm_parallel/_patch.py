"""Install and remove the parallel ``shuffle_do`` on Mesa's agent-set classes.

The patched method asks two cheap questions before doing anything else: is the method
one of the parallel methods, and does the agents' model have ``parallel_stepping``
set to a true value? If either answer is no, Mesa's original method runs, untouched.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

from mesa_llm_parallel._agentsets import first_agent, patchable_classes, shuffled_members
from mesa_llm_parallel._engine import Step, run_step_sync
from mesa_llm_parallel._settings import SettingsSnapshot

__all__ = ["install", "installed_classes", "is_installed", "uninstall", "wants_parallel"]

_lock = threading.RLock()
#: class -> the exact function object it had before we patched it
_originals: dict[type, Callable[..., Any]] = {}

_MARK = "__mesa_llm_parallel_original__"


def wants_parallel(cfg: SettingsSnapshot, method: object) -> bool:
    """Whether ``method`` (a name or a callable) is one of the parallel methods."""
    methods = cfg.parallel_methods
    if isinstance(method, str):
        return method in methods
    try:
        if method in methods:
            return True
    except TypeError:  # an unhashable callable
        pass
    return getattr(method, "__name__", None) in methods


def _make_parallel(original: Callable[..., Any], settings: Any) -> Callable[..., Any]:
    @functools.wraps(original)
    def shuffle_do(self: Any, method: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        cfg = settings.snapshot()
        if not wants_parallel(cfg, method):
            return original(self, method, *args, **kwargs)
        agent = first_agent(self)
        model = getattr(agent, "model", None)
        del agent
        if model is None or not getattr(model, "parallel_stepping", cfg.parallel_by_default):
            return original(self, method, *args, **kwargs)
        # Another library may have kept this function as "the original" it wraps
        # (mesa_llm does when it is imported after enable): once disabled, such a
        # leftover reference behaves exactly like Mesa's own method. Checked here, off
        # the path of sets that step sequentially anyway.
        if not _originals:
            return original(self, method, *args, **kwargs)
        if _displaced():
            _take_back(settings)
        entries, resolve = shuffled_members(self)
        run_step_sync(Step(entries, resolve, method, args, kwargs, cfg, cfg.mode), model)
        return self

    setattr(shuffle_do, _MARK, original)
    return shuffle_do


def _is_mesas_own(function: Any, cls: type) -> bool:
    return (
        getattr(function, "__module__", "").split(".")[0] == "mesa"
        and getattr(function, "__qualname__", "") == f"{cls.__name__}.shuffle_do"
    )


def _mesas_original(cls: type, current: Any) -> Any:
    """Mesa's own ``shuffle_do`` of ``cls``, even if another library replaced it.

    A library that patches a method usually keeps the function it replaced: as
    ``__wrapped__``, in a closure, or in a module global (``mesa_llm`` keeps it as
    ``_original_shuffle_do``). Those places are searched; if Mesa's function is in none
    of them, the current one is taken as the original, with a warning.
    """
    if _is_mesas_own(current, cls):
        return current
    todo, seen = [current], set()
    while todo:
        function = todo.pop()
        if id(function) in seen:
            continue
        seen.add(id(function))
        if _is_mesas_own(function, cls):
            return function
        kept = [getattr(function, "__wrapped__", None)]
        kept += [cell.cell_contents for cell in getattr(function, "__closure__", None) or ()]
        kept += list(getattr(function, "__globals__", {}).values())
        todo += [
            k
            for k in kept
            if callable(k) and str(getattr(k, "__name__", "")).endswith("shuffle_do")
        ]
    warnings.warn(
        f"{cls.__name__}.shuffle_do was replaced by "
        f"{getattr(current, '__module__', '?')}.{getattr(current, '__qualname__', '?')} and "
        "Mesa's own function could not be found; disable_automatic_parallel_stepping() "
        "will put that replacement back",
        RuntimeWarning,
        stacklevel=4,
    )
    return current


def _displaced() -> bool:
    """Whether another library replaced our method on a class since we patched it."""
    return any(
        getattr(cls.__dict__.get("shuffle_do"), _MARK, None) is None for cls in tuple(_originals)
    )


def _take_back(settings: Any) -> None:
    """Patch again the classes whose method another library replaced after ``enable``.

    mesa_llm, imported after ``enable``, installs its own ``AgentSet.shuffle_do``; left
    in place, steps of plain ``AgentSet``s would run through it while the model's own
    agent set runs through ours. Ours takes precedence, with one warning.
    """
    with _lock:
        for cls in tuple(_originals):
            current = cls.__dict__.get("shuffle_do")
            if getattr(current, _MARK, None) is not None:
                continue
            if _is_mesas_own(current, cls):  # another library's "disable" put it back
                message = (
                    f"{cls.__name__}.shuffle_do had been set back to Mesa's own method while "
                    "mesa_llm_parallel's parallel stepping was enabled (another library's "
                    "disable does that); parallel stepping is put back. To turn it off, "
                    "call disable_automatic_parallel_stepping()."
                )
            else:
                message = (
                    f"{cls.__name__}.shuffle_do had been replaced by "
                    f"{getattr(current, '__module__', '?')}."
                    f"{getattr(current, '__qualname__', '?')} after "
                    "enable_automatic_parallel_stepping(); mesa_llm_parallel's parallel "
                    "stepping is put back. Call enable_automatic_parallel_stepping() after "
                    "importing that library to avoid this warning."
                )
            warnings.warn(message, RuntimeWarning, stacklevel=4)
            cls.shuffle_do = _make_parallel(_originals[cls], settings)


def install(settings: Any) -> list[type]:
    """Patch every concrete Mesa agent-set class; return them. Idempotent.

    Raises:
        RuntimeError: When the installed Mesa offers no class that can be patched.
    """
    with _lock:
        classes = patchable_classes()
        if not classes and not _originals:
            import mesa

            raise RuntimeError(
                f"mesa_llm_parallel found no agent-set class with its own shuffle_do in "
                f"Mesa {getattr(mesa, '__version__', '?')}; parallel stepping cannot be "
                "installed (supported: Mesa >= 3.0, < 4)"
            )
        for cls in classes:
            current = cls.__dict__["shuffle_do"]
            wrapped = getattr(current, _MARK, None)
            if cls in _originals and wrapped is not None:
                continue  # already ours
            # Keep the first function we ever replaced: if another library patched the
            # method after us, ours takes precedence again and wraps Mesa's original.
            # A function of ours from an earlier install that someone put back after
            # disable wraps Mesa's original itself.
            if cls not in _originals:
                _originals[cls] = wrapped if wrapped is not None else _mesas_original(cls, current)
            original = _originals[cls]
            cls.shuffle_do = _make_parallel(original, settings)
        return list(_originals)


def uninstall() -> None:
    """Put back the exact original functions. Idempotent."""
    with _lock:
        for cls, original in _originals.items():
            cls.shuffle_do = original
        _originals.clear()


def is_installed() -> bool:
    """Whether the patch is currently installed."""
    return bool(_originals)


def installed_classes() -> tuple[type, ...]:
    """The classes that currently carry the patch."""
    with _lock:
        return tuple(_originals)


def _reset_after_fork() -> None:
    """In a forked child: the patch stays, with a lock no parent thread can hold."""
    global _lock  # noqa: PLW0603
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_reset_after_fork)
