"""What the library keeps on a user's model: one attribute holding one small object.

Core objects: :class:`ModelState` and :func:`state_of`.

Everything the library remembers about a model lives in ``model._mesa_llm_parallel``,
never in module state (a module-level table would keep models alive):

* ``home``: the event loop the model's asyncio steps run on (see ``_loops``);
* ``last_report``: the :class:`~mesa_llm_parallel.StepReport` of its latest parallel step,
  and ``last_report_step``, the model's step number when that step ended.

Copies never share it with the original. ``copy.deepcopy`` and ``pickle`` give the copy
an empty state (a loop cannot be copied, and a report describes the original's agents);
``copy.copy`` shares the instance ``__dict__``, so :func:`state_of` checks whose state it
finds and gives a shallow copy a state of its own on first use. The copy's first
parallel step then chooses its own home loop and stores its own report.

The recovery after an exception escaped a step (``_recovery``) is not kept here: it is an
event in the model's own event list, copied and pickled with the model like any other.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["ATTRIBUTE", "ModelState", "state_of"]

#: The one attribute the library sets on a model.
ATTRIBUTE: Final = "_mesa_llm_parallel"


def _fresh_state() -> ModelState:
    return ModelState(None)


class ModelState:
    """The library's per-model state (see the module documentation).

    Attributes:
        home: Where the model's asyncio steps run (a ``_loops._Home``), or None.
        last_report: The model's latest step report, or None.
        last_report_step: The model's step number (Mesa 3's ``steps``, Mesa 4's
            ``time``) when that report was stored, or None.
    """

    __slots__ = ("_owner", "home", "last_report", "last_report_step")

    def __init__(self, owner: object | None) -> None:
        # id(), not a weak reference: a shallow copy is alive at the same time as its
        # original, so the two ids always differ; and every model has an id.
        self._owner = None if owner is None else id(owner)
        self.home: Any = None
        self.last_report: Any = None
        self.last_report_step: int | None = None

    def __copy__(self) -> ModelState:
        return _fresh_state()

    def __deepcopy__(self, memo: dict[int, Any]) -> ModelState:
        return _fresh_state()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_fresh_state, ())

    def __repr__(self) -> str:
        return f"ModelState(home={self.home!r}, last_report={self.last_report!r})"


def state_of(model: Any, *, create: bool = True) -> ModelState | None:
    """``model``'s state; made on first use unless ``create`` is False.

    Returns None for an object without ``__dict__`` (a model with ``__slots__``): such a
    model steps in parallel all the same, without a home loop or a stored report.
    """
    try:
        attributes = vars(model)
    except TypeError:
        return None
    state = attributes.get(ATTRIBUTE)
    if state is not None:
        if state._owner == id(model):
            return state
        if state._owner is None:  # unpickled or deep-copied: adopted by its model
            state._owner = id(model)
            return state
    if not create:
        return None
    state = ModelState(model)  # none yet, or the original's (a shallow copy)
    attributes[ATTRIBUTE] = state
    return state
