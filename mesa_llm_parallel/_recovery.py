"""Keep a Mesa 3.5 model stepping after an exception escaped a parallel step.

Since Mesa 3.5, ``model.step()`` runs the user's ``step`` from an event generator that
schedules the next step only after the current one returns. When an exception escapes
(an agent's failure, a KeyboardInterrupt), the next step is never scheduled and every
later ``model.step()`` silently does nothing. In a notebook, where interrupts and
model-server errors are routine, that looks like a dead model.

When a parallel step raises, :func:`arm` notes which generator was running it. On the
model's next advance of time (``model.step()``, ``run_for``, ``run_until``) the
generator is checked: if nothing rescheduled it, because the exception escaped, it is
rescheduled exactly as Mesa would have; if the user's code caught the exception and
Mesa went on normally, nothing is done, so a step is never scheduled twice.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["arm"]

_ARMED = "_mesa_llm_parallel_recovery"


def _in_event_list(model: Any, event: Any) -> bool:
    return any(queued is event for queued in model._event_list._events)


def _running_generators(model: Any) -> list[tuple[Any, Any]]:
    """Generators whose current event is being executed right now (already popped)."""
    found = []
    for generator in list(model._event_generators):
        event = generator._current_event
        if (
            generator._active
            and event is not None
            and event.time <= model.time
            and not _in_event_list(model, event)
        ):
            found.append((generator, event))
    return found


def arm(model: Any) -> None:
    """Prepare ``model`` to resume stepping after the exception now propagating."""
    if model is None or not hasattr(model, "_event_generators"):
        return  # Mesa before 3.5: model.step is a plain method, nothing to repair
    if _ARMED in vars(model):
        return
    try:
        running = _running_generators(model)
    except AttributeError as exc:
        warnings.warn(
            f"mesa_llm_parallel cannot re-arm {type(model).__name__} after this exception "
            f"(unexpected Mesa internals: {exc}); Mesa may not step this model again",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    if not running:
        return  # not inside a scheduled step (e.g. shuffle_do called directly)

    had_own = "_advance_time" in vars(model)
    own = vars(model).get("_advance_time")

    def advance_time(until: float) -> None:
        # One-shot: put back whatever _advance_time the model had, then repair.
        if had_own:
            model._advance_time = own
        else:
            del model._advance_time
        vars(model).pop(_ARMED, None)
        for generator, event in running:
            if generator._current_event is event and generator._active:
                _reschedule(model, generator)
        model._advance_time(until)

    model._advance_time = advance_time
    setattr(model, _ARMED, True)


def _reschedule(model: Any, generator: Any) -> None:
    """What Mesa's generator does after a step that returned normally."""
    generator._execution_count += 1
    next_time = model.time + generator._get_interval()
    if not generator._should_stop(next_time):
        generator._schedule_next(next_time)
    else:
        generator._active = False
        generator._current_event = None
        model._event_generators.discard(generator)
