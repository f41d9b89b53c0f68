"""Keep a Mesa 3.5 model stepping after an exception escaped a parallel step.

Since Mesa 3.5, ``model.step()`` runs the user's ``step`` from an event generator that
schedules the next step only after the current one returns. When an exception escapes
(an agent's failure, a KeyboardInterrupt), the next step is never scheduled and every
later ``model.step()`` silently does nothing. In a notebook, where interrupts and
model-server errors are routine, that looks like a dead model.

When a parallel step starts, :func:`arm` puts one *resume* event into the model's own
event list, at the time of the current step and after it in priority. When the step
returns normally (or the user's code caught its exception), Mesa reschedules the next
step and the resume event, run right after in the same advance of time, does nothing,
so a step is never scheduled twice. When an exception escaped, the resume event runs
first on the model's next advance of time (``model.step()``, ``run_for``,
``run_until``) and reschedules the generator exactly as Mesa would have.

The event is plain data in the model (a module-level function and its arguments):
``copy.deepcopy`` and ``pickle`` copy it with the model, so a copy of a model whose step
failed resumes its own steps, never the original's.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["arm"]


def _in_event_list(model: Any, event: Any) -> bool:
    return any(queued is event for queued in model._event_list._events)


def _generators(model: Any) -> list[Any]:
    """The model's event generators, its default step schedule first.

    Mesa 3.5.0 does not list the default schedule among ``_event_generators`` (a list
    there, a set since 3.5.1).
    """
    found = []
    default = getattr(model, "_default_schedule", None)
    if default is not None:
        found.append(default)
    found += [g for g in list(model._event_generators) if g is not default]
    return found


def _running_generators(model: Any) -> list[tuple[Any, Any]]:
    """Generators whose current event is being executed right now (already popped)."""
    found = []
    for generator in _generators(model):
        event = generator._current_event
        if (
            generator._active
            and event is not None
            and event.time <= model.time
            and not _in_event_list(model, event)
        ):
            found.append((generator, event))
    return found


def _armed_for(model: Any, event: Any) -> bool:
    for queued in model._event_list._events:
        fn = queued.fn() if queued.fn is not None else None
        if fn is _resume and queued.function_args[2] is event:
            return True
    return False


def arm(model: Any) -> None:
    """Prepare ``model`` to resume stepping after the exception now propagating."""
    if model is None or not hasattr(model, "_event_generators"):
        return  # Mesa before 3.5: model.step is a plain method, nothing to repair
    try:
        from mesa.time.events import Event, Priority

        for generator, event in _running_generators(model):
            if not _armed_for(model, event):
                model._event_list.add_event(
                    Event(event.time, _resume, Priority.LOW, [model, generator, event])
                )
    except (AttributeError, ImportError, TypeError) as exc:
        warnings.warn(
            f"mesa_llm_parallel cannot re-arm {type(model).__name__} after this exception "
            f"(unexpected Mesa internals: {exc}); Mesa may not step this model again",
            RuntimeWarning,
            stacklevel=3,
        )


def _resume(model: Any, generator: Any, event: Any) -> None:
    """The resume event: reschedule ``generator`` if its failed ``event`` is still current."""
    if generator._current_event is event and generator._active:
        _reschedule(model, generator)


def _reschedule(model: Any, generator: Any) -> None:
    """What Mesa's generator does after a step that returned normally."""
    generator._execution_count += 1
    next_time = model.time + generator._get_interval()
    if not generator._should_stop(next_time):
        generator._schedule_next(next_time)
    else:
        generator._active = False
        generator._current_event = None
        generators = model._event_generators
        if generator in generators:
            generators.remove(generator)
