"""Settings: validation, all-or-nothing updates, thread safety, and bad input."""

from __future__ import annotations

import threading

import pytest
from support import agent_set_classes

import mesa_llm_parallel as mlp
from mesa_llm_parallel import DEFAULT_MAX_WORKERS, UnknownSettingError, settings

AgentSet, _HardKeyAgentSet = agent_set_classes()

ORIGINAL = _HardKeyAgentSet.__dict__["shuffle_do"]


def test_defaults():
    assert settings.mode == "asyncio"
    assert settings.max_workers == DEFAULT_MAX_WORKERS
    assert settings.max_concurrency is None
    assert settings.parallel_methods == frozenset({"step"})
    assert settings.run_sync_inline == "auto"
    assert settings.loop == "auto"


def test_assignment_validates_and_applies():
    settings.mode = "threading"
    settings.max_workers = 3
    settings.max_concurrency = 2
    settings.parallel_methods = ["step", "act"]
    assert settings.snapshot() == mlp.SettingsSnapshot(
        mode="threading",
        max_workers=3,
        max_concurrency=2,
        parallel_methods=frozenset({"step", "act"}),
    )
    settings.max_workers = None  # back to the default
    assert settings.max_workers == DEFAULT_MAX_WORKERS


def test_env_var_sets_the_default_pool_size(monkeypatch):
    monkeypatch.setenv("MESA_LLM_PARALLEL_MAX_WORKERS", "7")
    settings.reset()
    assert settings.max_workers == 7
    monkeypatch.setenv("MESA_LLM_PARALLEL_MAX_WORKERS", "zero")
    with pytest.raises(ValueError, match="'zero'"):
        settings.max_workers = None


@pytest.mark.parametrize(
    ("name", "value", "error", "words"),
    [
        ("mode", "parallel", ValueError, ["'parallel'", "'asyncio'", "'threading'"]),
        ("mode", None, ValueError, ["None", "'asyncio'"]),
        ("max_workers", 0, ValueError, ["max_workers", "0", ">= 1"]),
        ("max_workers", -3, ValueError, ["-3"]),
        ("max_workers", 2.5, TypeError, ["2.5", "positive int"]),
        ("max_workers", "8", TypeError, ["'8'", "positive int"]),
        ("max_workers", True, TypeError, ["True"]),
        ("max_concurrency", 0, ValueError, ["max_concurrency", "0"]),
        ("max_concurrency", 1.0, TypeError, ["1.0"]),
        ("parallel_methods", [], ValueError, ["at least one"]),
        ("parallel_methods", ["not a name"], ValueError, ["'not a name'"]),
        ("parallel_methods", [3], TypeError, ["3"]),
        ("run_sync_inline", 1, ValueError, ["True, False or 'auto'", "1"]),
        ("loop", "uvloop", ValueError, ["'uvloop'", "'auto'", "'background'"]),
    ],
)
def test_bad_values_name_the_value_and_what_is_accepted(name, value, error, words):
    before = settings.snapshot()
    with pytest.raises(error) as info:
        setattr(settings, name, value)
    for word in words:
        assert word in str(info.value)
    assert settings.snapshot() is before


def test_unknown_setting_is_both_attribute_and_type_error():
    with pytest.raises(UnknownSettingError, match=r"'max_worker'.*max_workers") as info:
        settings.max_worker = 4
    assert isinstance(info.value, AttributeError)
    assert isinstance(info.value, TypeError)
    with pytest.raises(AttributeError, match="unknown setting 'colour'"):
        _ = settings.colour


def test_update_is_all_or_nothing():
    before = settings.snapshot()
    with pytest.raises(ValueError, match="max_concurrency"):
        settings.update(mode="threading", max_workers=4, max_concurrency=0)
    assert settings.snapshot() is before


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"mode": "multiprocessing"}, ValueError, "'multiprocessing'"),
        ({"mode": "threading", "max_workers": 0}, ValueError, "max_workers"),
        ({"mode": "threading", "max_workers": "4"}, TypeError, "'4'"),
        ({"max_concurrency": -1}, ValueError, "-1"),
        ({"mode": "threading", "workers": 4}, TypeError, "unknown setting 'workers'"),
    ],
)
def test_failed_enable_leaves_previous_state_intact(kwargs, error, fragment):
    mlp.enable_automatic_parallel_stepping(mode="asyncio", max_workers=5)
    patched = _HardKeyAgentSet.__dict__["shuffle_do"]
    before = settings.snapshot()
    with pytest.raises(error, match=fragment):
        mlp.enable_automatic_parallel_stepping(**kwargs)
    assert settings.snapshot() is before
    assert _HardKeyAgentSet.__dict__["shuffle_do"] is patched

    mlp.disable_automatic_parallel_stepping()
    with pytest.raises(error):
        mlp.enable_automatic_parallel_stepping(**kwargs)
    assert _HardKeyAgentSet.__dict__["shuffle_do"] is ORIGINAL  # not installed either


def test_enable_keeps_pool_size_and_cap_unless_given():
    settings.update(max_workers=9, max_concurrency=4)
    mlp.enable_automatic_parallel_stepping()  # as a model's __init__ would, on every reset
    assert (settings.max_workers, settings.max_concurrency) == (9, 4)
    mlp.enable_automatic_parallel_stepping("threading", max_workers=2, loop="background")
    assert (settings.mode, settings.max_workers, settings.loop) == ("threading", 2, "background")


def test_concurrent_writers_never_leave_a_torn_snapshot():
    pairs = [(n, n) for n in range(1, 40)]
    stop = threading.Event()
    torn: list[object] = []

    def writer():
        for n, m in pairs * 20:
            settings.update(max_workers=n, max_concurrency=m)

    def reader():
        while not stop.is_set():
            snap = settings.snapshot()
            if snap.max_workers != snap.max_concurrency and snap.max_concurrency is not None:
                torn.append(snap)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer) for _ in range(3)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert torn == []


def test_repr_and_dir_list_every_setting():
    text = repr(settings)
    for name in settings.names():
        assert f"{name}=" in text
        assert name in dir(settings)
