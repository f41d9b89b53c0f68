"""What this library needs to know about Mesa's agent-set classes.

Mesa 3.5 and later have two concrete agent-set classes with their own ``shuffle_do``
and ``do``: ``AgentSet`` (weak references, returned by ``select()`` and friends) and
``_HardKeyAgentSet`` (a plain dict; ``model.agents`` and ``model.agents_by_type[T]``),
both below ``AbstractAgentSet``; Mesa 3.0-3.4 have only ``AgentSet``. Where they live
changed (``mesa.agent`` on 3.5.0, ``mesa.agentset`` since 3.5.1), so they are found by
what they are: from the classes a model really uses, up to the topmost Mesa class that
defines ``shuffle_do``, then down to every concrete subclass. This module also
reproduces, for each, exactly how Mesa's ``shuffle_do`` lists, shuffles and skips its
members, so that a parallel step consumes the model's random stream like a sequential
one.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any, Final

__all__ = ["STEP_METHODS", "first_agent", "members", "patchable_classes", "shuffled_members"]

Resolve = Callable[[Any], Any]


#: The methods the library patches: the shuffled and the unshuffled form of a step.
STEP_METHODS: Final = ("shuffle_do", "do")


def _is_mesas(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "mesa"


def _anchors() -> list[type]:
    """Agent-set classes that every Mesa with agent sets exposes, wherever they live.

    ``mesa.agent.AgentSet`` (3.0 on; re-exported from ``mesa.agentset`` since 3.5.1),
    ``mesa.AgentSet`` where exported, and the class of a model's own ``agents`` (which
    is not an ``AgentSet`` since 3.5). Found by what they are, not by their module.
    """
    import mesa

    found: list[type] = []
    for candidate in (
        getattr(mesa, "AgentSet", None),
        getattr(getattr(mesa, "agent", None), "AgentSet", None),
        getattr(getattr(mesa, "agentset", None), "AgentSet", None),
    ):
        if isinstance(candidate, type) and candidate not in found:
            found.append(candidate)
    try:
        model = mesa.Model()
        found.append(type(model.agents))
        del model
    except Exception:  # noqa: S110 - a Mesa whose Model cannot be built bare: anchors above
        pass
    return found


def _agent_set_roots() -> list[type]:
    """The topmost Mesa classes that define ``shuffle_do``, above every anchor.

    ``AbstractAgentSet`` on Mesa 3.5 and later (in ``mesa.agent`` on 3.5.0, in
    ``mesa.agentset`` since 3.5.1); ``AgentSet`` itself on 3.0-3.4.
    """
    roots: list[type] = []
    for anchor in _anchors():
        top = None
        for klass in anchor.__mro__:
            if _is_mesas(klass) and "shuffle_do" in vars(klass):
                top = klass
        if top is not None and top not in roots:
            roots.append(top)
    return roots


def _all_subclasses(cls: type) -> list[type]:
    seen: list[type] = [cls]
    for klass in seen:
        for sub in klass.__subclasses__():
            if sub not in seen:
                seen.append(sub)
    return seen


def patchable_classes(name: str = "shuffle_do") -> list[type]:
    """Mesa's concrete agent-set classes that define method ``name`` themselves.

    Every concrete subclass of Mesa's agent-set root(s), found from the classes a model
    really uses. Classes outside the ``mesa`` package are left alone: a user's subclass
    that overrides the method keeps its own behaviour, and one that does not inherits
    the patched method from its Mesa base class.
    """
    found: list[type] = []
    for root in _agent_set_roots():
        for cls in _all_subclasses(root):
            if (
                cls not in found
                and name in vars(cls)
                and not inspect.isabstract(cls)
                and _is_mesas(cls)
            ):
                found.append(cls)
    return found


def shuffled_members(agentset: Any) -> tuple[list[Any], Resolve]:
    """List and shuffle the members exactly as the set's own ``shuffle_do`` does."""
    return members(agentset, shuffle=True)


def members(agentset: Any, *, shuffle: bool) -> tuple[list[Any], Resolve]:
    """List the members as the set's own ``shuffle_do`` (or, unshuffled, ``do``) does.

    Returns the entries in start order and a function that turns an entry into its
    agent at the moment it is about to start, or None when Mesa's loop would skip it (a
    dead weak reference, or an agent removed from a strong set earlier in the step).
    Without ``shuffle`` the set's order is kept and no random number is drawn.
    """
    store = agentset._agents
    if isinstance(store, weakref.WeakKeyDictionary):
        refs = list(store.keyrefs())
        if shuffle:
            agentset.random.shuffle(refs)
        return refs, _call_ref
    if isinstance(store, dict):
        agents = list(store)
        if shuffle:
            agentset.random.shuffle(agents)

        def still_member(agent: Any) -> Any:
            return agent if agent in agentset._agents else None  # read each time, as Mesa does

        still_member.agentset = agentset  # type: ignore[attr-defined]  # the engine's hot loop
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
