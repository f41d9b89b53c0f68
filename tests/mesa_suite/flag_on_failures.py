"""Mesa's tests that may fail when every model steps its agents in parallel.

The single list of known failures of the run with ``mesa.Model.parallel_stepping = True``
for every model (``harness.py --force-on``): test id -> (the modes in which it may fail,
the semantic difference of parallel stepping that makes it fail). Each one depends on
thread timing, so in a given run it may fail or pass. ``docs/mesa-suite.md`` lists the
same entries; ``tests/test_mesa_suite.py`` checks that the two agree.

A race is listed for both modes even where it is rare in one of them: in asyncio mode
each of Mesa's agent classes (all synchronous) runs in the library's thread pool, as in
threading mode, until 16 of its calls have been measured cheap (then inline on the loop),
so its code can overlap in threads in both. How often each failed (Mesa 3.5.1,
2 cores) is noted per entry; "forced switches" means a thread switch interval of 1e-4 s
or less (``sys.setswitchinterval``, 5e-3 s by default), which makes races more likely.
"""

from __future__ import annotations

ASYNCIO = "asyncio"
THREADING = "threading"
#: The modes of parallel stepping.
MODES = (ASYNCIO, THREADING)
BOTH = frozenset(MODES)

#: Test id (relative to the suite folder) -> (modes where it may fail, reason).
FLAG_ON_FAILURES: dict[str, tuple[frozenset[str], str]] = {
    # asyncio: every run. threading: only with forced switches.
    "tests/test_agentset.py::test_agentset_shuffle_do": (
        BOTH,
        "Each agent removes a random other agent, and an agent removed after it has "
        "started still runs (in asyncio mode most agents start before the first removal) "
        "where Mesa's loop would skip it, so the test's agent raises.",
    ),
    # threading: every run. asyncio: now and then on a loaded machine, often with
    # forced switches.
    "tests/examples/test_examples.py::test_epstein": (
        BOTH,
        "Citizens and cops running at once can move into the same empty cell of a grid "
        "that holds one agent per cell, so the second move fails with 'Cell is full'.",
    ),
    # Both modes, only with forced switches.
    "tests/examples/test_examples.py::test_wolf_sheep": (
        BOTH,
        "Sheep eating grass in several threads at once schedule its regrowth on the "
        "model's event list, which is not thread-safe, so a push can fail with "
        "'RuntimeError: list changed size during iteration'.",
    ),
    # threading: rarely, only with forced switches; asyncio: not seen, but the same
    # agent code runs in the thread pool there.
    "tests/examples/test_examples.py::test_schelling_model": (
        BOTH,
        "Unhappy agents running at once can move into the same empty cell of a grid that "
        "holds one agent per cell, so the second move fails with 'Cell is full'.",
    ),
}


def known_failures(mode: str) -> dict[str, str]:
    """The tests that may fail in ``mode``, with the reason of each.

    Raises:
        ValueError: ``mode`` is not one of :data:`MODES`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    return {test: reason for test, (modes, reason) in FLAG_ON_FAILURES.items() if mode in modes}
