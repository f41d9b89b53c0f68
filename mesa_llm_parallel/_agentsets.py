"""What this library needs to know about Mesa's agent-set classes.

Mesa 3.5 has two concrete agent-set classes with their own ``shuffle_do``:
``AgentSet`` (weak references, returned by ``select()`` and friends) and
``_HardKeyAgentSet`` (a plain dict; ``model.agents`` and ``model.agents_by_type[T]``).
Mesa 3.0-3.4 have only ``AgentSet``. This module finds them and reproduces, for each,
exactly how Mesa's ``shuffle_do`` lists, shuffles and skips its members, so that a
parallel step consumes the model's random stream like a sequential one.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["first_agent", "patchable_classes", "shuffled_members"]

Resolve = Callable[[Any], Any]


def _agent_set_base() -> type:
    """The root of Mesa's agent-set classes (``AbstractAgentSet`` or, before 3.5, ``AgentSet``)."""
    try:
        from mesa.agentset import AbstractAgentSet

        return AbstractAgentSet
    except ImportError:  # Mesa 3.0-3.4: one class, in mesa.agent
        from mesa.agent import AgentSet

        return AgentSet


def _all_subclasses(cls: type) -> list[type]:
    seen: list[type] = [cls]
    for klass in seen:
        for sub in klass.__subclasses__():
            if sub not in seen:
                seen.append(sub)
    return seen


def patchable_classes() -> list[type]:
    """Mesa's concrete agent-set classes that define ``shuffle_do`` themselves.

    Classes outside the ``mesa`` package are left alone: a user's subclass that
    overrides ``shuffle_do`` keeps its own behaviour, and one that does not inherits
    the patched method from its Mesa base class.
    """
    return [
        cls
        for cls in _all_subclasses(_agent_set_base())
        if "shuffle_do" in cls.__dict__
        and not inspect.isabstract(cls)
        and cls.__module__.split(".")[0] == "mesa"
    ]


def shuffled_members(agentset: Any) -> tuple[list[Any], Resolve]:
    """List and shuffle the members exactly as the set's own ``shuffle_do`` does.

    Returns the shuffled entries and a function that turns an entry into its agent at
    the moment it is about to start, or None when Mesa's loop would skip it (a dead
    weak reference, or an agent removed from a strong set earlier in the step).
    """
    store = agentset._agents
    if isinstance(store, weakref.WeakKeyDictionary):
        refs = list(store.keyrefs())
        agentset.random.shuffle(refs)
        return refs, _call_ref
    if isinstance(store, dict):
        agents = list(store)
        agentset.random.shuffle(agents)

        def still_member(agent: Any) -> Any:
            return agent if agent in agentset._agents else None

        return agents, still_member
    raise TypeError(
        f"mesa_llm_parallel does not know how {type(agentset).__name__} stores its agents "
        f"({type(store).__name__}); expected a dict or a WeakKeyDictionary"
    )


def _call_ref(ref: weakref.ref[Any]) -> Any:
    return ref()


def first_agent(agentset: Any) -> Any:
    """Any live member of the set, or None for an empty set (used to find the model)."""
    store = agentset._agents
    if isinstance(store, weakref.WeakKeyDictionary):
        for ref in store.keyrefs():
            agent = ref()
            if agent is not None:
                return agent
        return None
    return next(iter(store), None)
