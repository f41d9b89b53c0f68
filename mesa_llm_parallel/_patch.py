"""Install and remove the parallel ``shuffle_do`` and ``do`` on Mesa's agent-set classes.

The patched method asks two cheap questions before doing anything else: is the method
one of the parallel methods, and does the agents' model have ``parallel_stepping``
set to a true value? If either answer is no, Mesa's original method runs, untouched.
``shuffle_do`` steps the agents in Mesa's shuffled order; ``do`` in the set's own order,
drawing no random number. ``map`` (which returns the agents' results) stays Mesa's.

:func:`install` checks that it worked: a throwaway model's ``agents``,
``agents_by_type[...]`` and ``select()`` sets must all carry the patch, or nothing is
patched and a :class:`RuntimeError` names the Mesa version and the class. A new Mesa
layout can therefore never make parallel stepping silently do nothing.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

from mesa_llm_parallel._agentsets import STEP_METHODS, first_agent, members, patchable_classes
from mesa_llm_parallel._engine import Step, run_step_sync
from mesa_llm_parallel._settings import SettingsSnapshot

__all__ = [
    "install",
    "installed_classes",
    "is_installed",
    "model_wants_parallel",
    "uninstall",
    "wants_parallel",
]

_lock = threading.RLock()
#: (class, method name) -> the exact function object it had before we patched it
_originals: dict[tuple[type, str], Callable[..., Any]] = {}

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


def model_wants_parallel(model: Any, cfg: SettingsSnapshot) -> bool:
    """The one rule: a model's ``parallel_stepping``, or ``cfg.parallel_by_default`` unset."""
    return bool(getattr(model, "parallel_stepping", cfg.parallel_by_default))


def _make_parallel(original: Callable[..., Any], settings: Any, name: str) -> Callable[..., Any]:
    shuffle = name == "shuffle_do"

    @functools.wraps(original)
    def parallel(self: Any, method: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        cfg = settings.snapshot()
        if not wants_parallel(cfg, method):
            return original(self, method, *args, **kwargs)
        agent = first_agent(self)
        model = getattr(agent, "model", None)
        del agent
        if model is None or not model_wants_parallel(model, cfg):
            return original(self, method, *args, **kwargs)
        # Another library may have kept this function as "the original" it wraps
        # (mesa_llm does when it is imported after enable): once disabled, such a
        # leftover reference behaves exactly like Mesa's own method. Checked here, off
        # the path of sets that step sequentially anyway.
        if not _originals:
            return original(self, method, *args, **kwargs)
        if _displaced():
            _take_back(settings)
        entries, resolve = members(self, shuffle=shuffle)
        __tracebackhide__ = True  # IPython and pytest: the user's frames, not this one
        step = Step(
            entries=entries,
            resolve=resolve,
            method=method,
            args=args,
            kwargs=kwargs,
            cfg=cfg,
            mode=cfg.mode,
        )
        run_step_sync(step, model)
        return self

    setattr(parallel, _MARK, original)
    return parallel


def _is_mesas_own(function: Any, cls: type, name: str) -> bool:
    return (
        getattr(function, "__module__", "").split(".")[0] == "mesa"
        and getattr(function, "__qualname__", "") == f"{cls.__name__}.{name}"
    )


def _mesas_original(cls: type, name: str, current: Any) -> Any:
    """Mesa's own method ``name`` of ``cls``, even if another library replaced it.

    A library that patches a method usually keeps the function it replaced: as
    ``__wrapped__``, in a closure, or in a module global (``mesa_llm`` keeps it as
    ``_original_shuffle_do``). Those places are searched; if Mesa's function is in none
    of them, the current one is taken as the original, with a warning.
    """
    if _is_mesas_own(current, cls, name):
        return current
    todo, seen = [current], set()
    while todo:
        function = todo.pop()
        if id(function) in seen:
            continue
        seen.add(id(function))
        if _is_mesas_own(function, cls, name):
            return function
        kept = [getattr(function, "__wrapped__", None)]
        kept += [cell.cell_contents for cell in getattr(function, "__closure__", None) or ()]
        kept += list(getattr(function, "__globals__", {}).values())
        todo += [k for k in kept if callable(k) and str(getattr(k, "__name__", "")).endswith(name)]
    warnings.warn(
        f"{cls.__name__}.{name} was replaced by "
        f"{getattr(current, '__module__', '?')}.{getattr(current, '__qualname__', '?')} and "
        "Mesa's own function could not be found; disable_automatic_parallel_stepping() "
        "will put that replacement back",
        RuntimeWarning,
        stacklevel=4,
    )
    return current


def _displaced() -> bool:
    """Whether another library replaced one of our methods since we patched it."""
    return any(
        getattr(cls.__dict__.get(name), _MARK, None) is None for cls, name in tuple(_originals)
    )


def _take_back(settings: Any) -> None:
    """Patch again the methods that another library replaced after ``enable``.

    mesa_llm, imported after ``enable``, installs its own ``AgentSet.shuffle_do``; left
    in place, steps of plain ``AgentSet``s would run through it while the model's own
    agent set runs through ours. Ours takes precedence, with one warning.
    """
    with _lock:
        for cls, name in tuple(_originals):
            current = cls.__dict__.get(name)
            if getattr(current, _MARK, None) is not None:
                continue
            if _is_mesas_own(current, cls, name):  # another library's "disable" put it back
                message = (
                    f"{cls.__name__}.{name} had been set back to Mesa's own method while "
                    "mesa_llm_parallel's parallel stepping was enabled (another library's "
                    "disable does that); parallel stepping is put back. To turn it off, "
                    "call disable_automatic_parallel_stepping()."
                )
            else:
                message = (
                    f"{cls.__name__}.{name} had been replaced by "
                    f"{getattr(current, '__module__', '?')}."
                    f"{getattr(current, '__qualname__', '?')} after "
                    "enable_automatic_parallel_stepping(); mesa_llm_parallel's parallel "
                    "stepping is put back. Call enable_automatic_parallel_stepping() after "
                    "importing that library to avoid this warning."
                )
            warnings.warn(message, RuntimeWarning, stacklevel=4)
            setattr(cls, name, _make_parallel(_originals[cls, name], settings, name))


def _mesa_version() -> str:
    import mesa

    return str(getattr(mesa, "__version__", "?"))


def _unsupported(missing: str) -> RuntimeError:
    return RuntimeError(
        f"mesa_llm_parallel cannot step agents in parallel with the installed Mesa "
        f"{_mesa_version()}: {missing}. Supported: Mesa releases whose agent sets have "
        "shuffle_do and do (Mesa >= 3.0, < 5)."
    )


def install(settings: Any) -> list[type]:
    """Patch ``shuffle_do`` and ``do`` of every concrete Mesa agent-set class. Idempotent.

    Returns:
        The classes that carry the patch.

    Raises:
        RuntimeError: The installed Mesa has no agent-set class with ``shuffle_do``, or
            a model's own agent sets would not carry the patch (a Mesa layout this
            version does not know); nothing is left patched then.
    """
    with _lock:
        was_installed = bool(_originals)
        found = {name: patchable_classes(name) for name in STEP_METHODS}
        if not found["shuffle_do"] and not _originals:
            raise _unsupported("no agent-set class with its own shuffle_do was found")
        for name, classes in found.items():
            for cls in classes:
                current = cls.__dict__[name]
                wrapped = getattr(current, _MARK, None)
                if (cls, name) in _originals and wrapped is not None:
                    continue  # already ours
                # Keep the first function we ever replaced: if another library patched
                # the method after us, ours takes precedence again and wraps Mesa's
                # original. A function of ours from an earlier install that someone
                # put back after disable wraps Mesa's original itself.
                if (cls, name) not in _originals:
                    _originals[cls, name] = (
                        wrapped if wrapped is not None else _mesas_original(cls, name, current)
                    )
                setattr(cls, name, _make_parallel(_originals[cls, name], settings, name))
        if not was_installed:
            try:
                _verify()
            except BaseException:
                uninstall()
                raise
        return installed_classes()


def _verify() -> None:
    """Check that a model's own agent sets carry the patch (see the module docs)."""
    import mesa

    model = mesa.Model()
    agent = mesa.Agent(model)
    try:
        sets = {
            "model.agents": model.agents,
            "model.agents_by_type[Agent]": model.agents_by_type[mesa.Agent],
            "model.agents.select()": model.agents.select(),
        }
        for label, agentset in sets.items():
            for name in STEP_METHODS:
                method = getattr(type(agentset), name, None)
                if method is None:
                    raise _unsupported(f"{label} ({type(agentset).__qualname__}) has no {name}")
                if getattr(method, _MARK, None) is None:
                    cls = type(agentset)
                    raise _unsupported(
                        f"{label} is a {cls.__module__}.{cls.__qualname__}, whose {name} "
                        "could not be patched (an agent-set class this version does not find)"
                    )
    finally:
        agent.remove()


def uninstall() -> None:
    """Put back the exact original functions. Idempotent."""
    with _lock:
        for (cls, name), original in _originals.items():
            setattr(cls, name, original)
        _originals.clear()


def is_installed() -> bool:
    """Whether the patch is currently installed."""
    return bool(_originals)


def installed_classes() -> list[type]:
    """The classes that currently carry the patch."""
    with _lock:
        classes: list[type] = []
        for cls, _ in _originals:
            if cls not in classes:
                classes.append(cls)
        return classes


def _reset_after_fork() -> None:
    """In a forked child: the patch stays, with a lock no parent thread can hold."""
    global _lock  # noqa: PLW0603
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_reset_after_fork)
