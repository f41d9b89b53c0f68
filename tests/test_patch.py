"""The patch: where it installs, when it is parallel, and what it leaves untouched."""

from __future__ import annotations

import threading

import mesa
import pytest
from models import AsyncAgent, SyncAgent, ToyModel
from support import run_python

import mesa_llm_parallel as mlp
from mesa_llm_parallel import _patch

# Where the classes live depends on the Mesa release; what a model uses does not.
AgentSet = mesa.agent.AgentSet
_HardKeyAgentSet = type(mesa.Model().agents)  # AgentSet itself before Mesa 3.5
ORIGINALS = {cls: cls.__dict__["shuffle_do"] for cls in (AgentSet, _HardKeyAgentSet)}


def test_import_changes_nothing_in_mesa():
    # In a fresh interpreter: reloading the module here would leave the package root
    # exporting functions other than the module's, for every later test.
    code = (
        "import mesa\n"
        "classes = (mesa.agent.AgentSet, type(mesa.Model().agents))\n"
        "before = [c.__dict__['shuffle_do'] for c in classes]\n"
        "import mesa_llm_parallel, mesa_llm_parallel.parallel_stepping\n"
        "assert [c.__dict__['shuffle_do'] for c in classes] == before\n"
        "assert not mesa_llm_parallel.is_automatic_parallel_stepping_enabled()\n"
        "print('unchanged')\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    # (Mesa 3.0 prints a notice about SolaraViz on import.)
    assert result.stdout.strip().splitlines()[-1] == "unchanged"


def test_enable_patches_both_agent_set_classes_and_disable_restores_identity():
    mlp.enable_automatic_parallel_stepping()
    assert set(_patch.installed_classes()) == {AgentSet, _HardKeyAgentSet}
    for cls, original in ORIGINALS.items():
        assert cls.__dict__["shuffle_do"] is not original
        assert cls.shuffle_do.__wrapped__ is original
    mlp.disable_automatic_parallel_stepping()
    for cls, original in ORIGINALS.items():
        assert cls.__dict__["shuffle_do"] is original
    assert not mlp.is_automatic_parallel_stepping_enabled()


def test_enable_twice_is_idempotent_and_one_disable_restores():
    mlp.enable_automatic_parallel_stepping()
    first = _HardKeyAgentSet.__dict__["shuffle_do"]
    mlp.enable_automatic_parallel_stepping(mode="threading")
    assert _HardKeyAgentSet.__dict__["shuffle_do"] is first
    assert mlp.settings.mode == "threading"
    mlp.disable_automatic_parallel_stepping()
    mlp.disable_automatic_parallel_stepping()
    assert _HardKeyAgentSet.__dict__["shuffle_do"] is ORIGINALS[_HardKeyAgentSet]


def test_another_library_patching_after_us_does_not_stick_around():
    mlp.enable_automatic_parallel_stepping()

    def foreign(self, method, *args, **kwargs):  # what another package might install
        raise AssertionError("foreign patch ran")

    AgentSet.shuffle_do = foreign
    mlp.enable_automatic_parallel_stepping()  # ours takes precedence again
    assert AgentSet.shuffle_do.__wrapped__ is ORIGINALS[AgentSet]
    mlp.disable_automatic_parallel_stepping()
    assert AgentSet.__dict__["shuffle_do"] is ORIGINALS[AgentSet]


def test_enable_and_disable_from_many_threads_at_once():
    errors: list[BaseException] = []

    def flip(i: int) -> None:
        try:
            for _ in range(50):
                if i % 2:
                    mlp.enable_automatic_parallel_stepping()
                else:
                    mlp.disable_automatic_parallel_stepping()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=flip, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    mlp.enable_automatic_parallel_stepping()
    assert AgentSet.shuffle_do.__wrapped__ is ORIGINALS[AgentSet]
    mlp.disable_automatic_parallel_stepping()
    for cls, original in ORIGINALS.items():
        assert cls.__dict__["shuffle_do"] is original


def test_enable_raises_when_mesa_offers_nothing_to_patch(monkeypatch):
    monkeypatch.setattr(_patch, "patchable_classes", lambda name="shuffle_do": [])
    with pytest.raises(RuntimeError, match=rf"Mesa {mesa.__version__}: no agent-set class"):
        mlp.enable_automatic_parallel_stepping(mode="threading")
    assert mlp.settings.mode == "asyncio"  # nothing half-applied
    assert not mlp.is_automatic_parallel_stepping_enabled()


@pytest.mark.mesa_min("3.5", why="model.agents is a second agent-set class")
def test_enable_refuses_when_a_models_own_agent_sets_would_stay_sequential(monkeypatch):
    # A Mesa whose model.agents class is not found (as on Mesa 3.5.0 for a lookup by
    # module): enable must not succeed and silently step those sets sequentially.
    monkeypatch.setattr(_patch, "patchable_classes", lambda name="shuffle_do": [AgentSet])
    with pytest.raises(RuntimeError) as raised:
        mlp.enable_automatic_parallel_stepping(mode="threading")
    message = str(raised.value)
    assert f"Mesa {mesa.__version__}" in message
    assert "_HardKeyAgentSet" in message
    assert "model.agents" in message
    assert not mlp.is_automatic_parallel_stepping_enabled()  # nothing left patched
    assert AgentSet.shuffle_do is ORIGINALS[AgentSet]
    assert mlp.settings.mode == "asyncio"


def test_agent_set_classes_are_found_wherever_mesa_keeps_them(monkeypatch):
    # Mesa 3.5.0 has no mesa.agentset module: the classes are found from what a model
    # uses (model.agents) and from mesa.agent.AgentSet, not from a module name.
    from mesa_llm_parallel._agentsets import patchable_classes

    monkeypatch.delattr(mesa, "agentset", raising=False)
    monkeypatch.delattr(mesa, "AgentSet", raising=False)
    assert set(patchable_classes("shuffle_do")) == {AgentSet, _HardKeyAgentSet}
    assert set(patchable_classes("do")) == {AgentSet, _HardKeyAgentSet}


def _sequential_run(model_factory, steps=3):
    model = model_factory()
    for _ in range(steps):
        model.step()
    return model


def _state(model):
    return (
        [(a.unique_id, a.calls, a.model.tracker.starts) for a in model.agents],
        model.random.random(),
        float(model.rng.random()),
    )


@pytest.mark.parametrize("agent_cls", [AsyncAgent, SyncAgent])
def test_flag_off_runs_mesas_original_with_identical_results(agent_cls):
    def make():
        return ToyModel(30, agent_cls, seed=7, parallel=None)

    untouched = _state(_sequential_run(make))
    mlp.enable_automatic_parallel_stepping()
    patched = _state(_sequential_run(make))
    assert patched == untouched
    # and explicitly False behaves the same
    model = ToyModel(30, agent_cls, seed=7, parallel=False)
    for _ in range(3):
        model.step()
    assert _state(model) == untouched


def test_flag_off_agents_run_in_calling_thread_one_at_a_time():
    mlp.enable_automatic_parallel_stepping(mode="threading")
    model = ToyModel(10, SyncAgent, parallel=False, delay=0.001)
    model.step()
    assert model.tracker.threads == {threading.get_ident()}
    assert model.tracker.peak == 1


def test_method_not_in_parallel_methods_runs_sequentially():
    mlp.enable_automatic_parallel_stepping(mode="threading")
    model = ToyModel(10, SyncAgent, delay=0.001)
    # "advance" is not a parallel method: Mesa's original calls it in this thread.
    seen: list[int] = []

    def advance(agent):
        seen.append(threading.get_ident())

    for agent in model.agents:
        agent.advance = advance.__get__(agent)
    assert model.agents.shuffle_do("advance") is model.agents
    assert set(seen) == {threading.get_ident()}
    assert len(seen) == 10


def test_parallel_methods_setting_adds_names():
    mlp.enable_automatic_parallel_stepping(mode="threading", parallel_methods={"step", "act"})
    model = ToyModel(8, SyncAgent, delay=0.02)
    SyncAgent.act = SyncAgent.step
    try:
        model.agents.shuffle_do("act")
    finally:
        del SyncAgent.act
    assert model.tracker.peak > 1
    assert len(model.tracker.starts) == 8


def test_callable_named_like_a_parallel_method_runs_in_parallel_and_lambda_does_not():
    mlp.enable_automatic_parallel_stepping(mode="threading")
    model = ToyModel(8, SyncAgent, delay=0.02)
    model.agents.shuffle_do(SyncAgent.step, "x", k=1)
    assert model.tracker.peak > 1
    assert all(a.calls == [(("x",), {"k": 1})] for a in model.agents)
    model.tracker.peak = 0
    model.agents.shuffle_do(lambda a: a.step())
    assert model.tracker.peak == 1


def _import_foreign_patch(tmp_path, monkeypatch, name="foreign_patch"):
    """A module that patches AgentSet.shuffle_do on import, as mesa_llm 0.3 does."""
    (tmp_path / f"{name}.py").write_text(
        "from mesa.agent import AgentSet\n"
        "_original_shuffle_do = AgentSet.shuffle_do\n"
        "calls = []\n"
        "def _enhanced_shuffle_do(self, method, *args, **kwargs):\n"
        "    calls.append(method)\n"
        "    return _original_shuffle_do(self, method, *args, **kwargs)\n"
        "AgentSet.shuffle_do = _enhanced_shuffle_do\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    # Whatever happens in the test, Mesa's own method is back afterwards (monkeypatch
    # puts back the value it replaced: make that Mesa's, keep the current one).
    current = AgentSet.__dict__["shuffle_do"]
    AgentSet.shuffle_do = ORIGINALS[AgentSet]
    monkeypatch.setattr(AgentSet, "shuffle_do", current)
    import importlib

    return importlib.import_module(name)


def test_a_library_that_patched_first_is_taken_over_and_mesas_original_restored(
    tmp_path, monkeypatch
):
    foreign = _import_foreign_patch(tmp_path, monkeypatch)
    assert AgentSet.shuffle_do is foreign._enhanced_shuffle_do
    mlp.enable_automatic_parallel_stepping(mode="threading", max_workers=4)
    assert AgentSet.shuffle_do.__wrapped__ is ORIGINALS[AgentSet]  # ours wraps Mesa's own
    model = ToyModel(8, SyncAgent, delay=0.01)
    model.agents.select().shuffle_do("step")
    assert model.tracker.peak > 1
    assert foreign.calls == []  # the foreign patch no longer runs
    mlp.disable_automatic_parallel_stepping()
    assert AgentSet.__dict__["shuffle_do"] is ORIGINALS[AgentSet]  # nothing left dangling


def test_a_library_that_patches_after_us_is_overridden_by_enable(tmp_path, monkeypatch):
    mlp.enable_automatic_parallel_stepping()
    ours = AgentSet.__dict__["shuffle_do"]
    foreign = _import_foreign_patch(tmp_path, monkeypatch, "late_patch")
    assert AgentSet.shuffle_do is foreign._enhanced_shuffle_do
    mlp.enable_automatic_parallel_stepping()
    assert AgentSet.__dict__["shuffle_do"] is not foreign._enhanced_shuffle_do
    assert AgentSet.shuffle_do.__wrapped__ is ORIGINALS[AgentSet]
    assert ours.__wrapped__ is ORIGINALS[AgentSet]
    mlp.disable_automatic_parallel_stepping()
    assert AgentSet.__dict__["shuffle_do"] is ORIGINALS[AgentSet]


def test_a_library_that_patches_after_us_is_taken_back_at_the_next_parallel_step(
    tmp_path, monkeypatch
):
    mlp.enable_automatic_parallel_stepping(mode="threading", max_workers=4)
    foreign = _import_foreign_patch(tmp_path, monkeypatch, "later_patch")
    model = ToyModel(8, SyncAgent, delay=0.01)
    with pytest.warns(RuntimeWarning, match=r"later_patch\._enhanced_shuffle_do"):
        model.step()  # model.agents is ours on Mesa 3.5; it notices the replacement
    assert AgentSet.__dict__["shuffle_do"].__wrapped__ is ORIGINALS[AgentSet]
    model.tracker.peak = 0
    model.agents.select().shuffle_do("step")  # a plain AgentSet: ours again
    assert model.tracker.peak > 1
    # Before Mesa 3.5, model.agents is an AgentSet too: its first step went through the
    # late library (which called ours, as "Mesa's original", and ours took back).
    assert foreign.calls == ([] if _HardKeyAgentSet is not AgentSet else ["step"])

    mlp.disable_automatic_parallel_stepping()
    assert AgentSet.__dict__["shuffle_do"] is ORIGINALS[AgentSet]
    # The late library kept our function as "Mesa's original"; disabled, it is Mesa's.
    assert getattr(foreign._original_shuffle_do, "__wrapped__", None) is ORIGINALS[AgentSet]
    model.tracker.peak = 0
    agents = model.agents.select()
    assert foreign._original_shuffle_do(agents, "step") is agents
    assert model.tracker.peak == 1


@pytest.mark.mesa_min(
    "3.5",
    why="the model's own set is a second class that stays ours; before, Mesa's method put "
    "back on AgentSet is the only one a model uses, and no code of ours runs to notice",
)
def test_mesas_method_put_back_by_another_librarys_disable_is_taken_back(monkeypatch):
    mlp.enable_automatic_parallel_stepping(mode="threading", max_workers=4)
    monkeypatch.setattr(AgentSet, "shuffle_do", ORIGINALS[AgentSet])  # its disable did this
    model = ToyModel(8, SyncAgent, delay=0.01)
    with pytest.warns(RuntimeWarning, match="set back to Mesa's own method") as caught:
        model.step()
    assert "disable_automatic_parallel_stepping()" in str(caught[0].message)
    assert AgentSet.__dict__["shuffle_do"].__wrapped__ is ORIGINALS[AgentSet]
    model.tracker.peak = 0
    model.agents.select().shuffle_do("step")
    assert model.tracker.peak > 1


def test_a_leftover_function_of_an_earlier_enable_is_replaced_and_restored(monkeypatch):
    mlp.enable_automatic_parallel_stepping()
    leftover = AgentSet.__dict__["shuffle_do"]
    mlp.disable_automatic_parallel_stepping()
    monkeypatch.setattr(AgentSet, "shuffle_do", leftover)  # put back by someone after disable
    mlp.enable_automatic_parallel_stepping()
    assert AgentSet in _patch.installed_classes()
    mlp.disable_automatic_parallel_stepping()
    assert AgentSet.__dict__["shuffle_do"] is ORIGINALS[AgentSet]


def test_an_unrecoverable_replacement_is_reported(monkeypatch):
    def replacement(self, method, *args, **kwargs):  # keeps no trace of Mesa's function
        return self

    monkeypatch.setattr(AgentSet, "shuffle_do", replacement)
    with pytest.warns(RuntimeWarning, match="Mesa's own function could not be found"):
        mlp.enable_automatic_parallel_stepping()
    mlp.disable_automatic_parallel_stepping()
    assert AgentSet.__dict__["shuffle_do"] is replacement


# -- do: the unshuffled form ------------------------------------------------------------
@pytest.mark.parametrize("mode", ["asyncio", "threading"])
@pytest.mark.parametrize("agent_cls", [AsyncAgent, SyncAgent])
@pytest.mark.parametrize("which", ["agents", "agents_by_type", "select"])
def test_do_steps_agents_in_parallel_in_the_sets_order(mode, agent_cls, which):
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=8, max_concurrency=1)
    model = ToyModel(8, agent_cls, delay=0.0)
    agentset = {
        "agents": lambda: model.agents,
        "agents_by_type": lambda: model.agents_by_type[agent_cls],
        "select": model.agents.select,
    }[which]()
    state = model.random.getstate()
    assert agentset.do("step", 1, key="v") is agentset
    assert model.random.getstate() == state  # no shuffle: no random number drawn
    # One at a time (cap 1), so the start order is observable: the set's own order.
    assert model.tracker.starts == [agent.unique_id for agent in agentset]
    assert all(agent.calls == [((1,), {"key": "v"})] for agent in agentset)
    report = mlp.last_step_report(model)
    assert (report.mode, report.completed, report.agents) == (mode, 8, 8)


@pytest.mark.parametrize("mode", ["asyncio", "threading"])
def test_do_overlaps_agents_and_steps_async_only_agents(mode):
    mlp.enable_automatic_parallel_stepping(mode=mode, max_workers=8)
    model = ToyModel(8, AsyncAgent, delay=0.02)
    model.agents.do("step")  # Mesa's own do would call the no-op step: nothing at all
    assert len(model.tracker.starts) == 8
    assert model.tracker.peak > 1


def test_do_with_the_flag_off_is_mesas_own():
    mlp.enable_automatic_parallel_stepping()
    model = ToyModel(5, SyncAgent, parallel=False)
    model.agents.do("step")
    assert model.tracker.peak == 1
    assert mlp.last_step_report(model) is None
    assert len(model.tracker.starts) == 5


def test_map_stays_mesas_own():
    mlp.enable_automatic_parallel_stepping()
    model = ToyModel(5, SyncAgent)
    assert model.agents.map(lambda agent: agent.unique_id) == [a.unique_id for a in model.agents]
    assert mlp.last_step_report(model) is None


def test_a_user_subclass_that_overrides_do_and_shuffle_do_keeps_its_own():
    mlp.enable_automatic_parallel_stepping()
    calls = []

    class Logged(AgentSet):
        def do(self, method, *args, **kwargs):
            calls.append("do")
            return self

        def shuffle_do(self, method, *args, **kwargs):
            calls.append("shuffle_do")
            return self

    model = ToyModel(4, SyncAgent)
    logged = Logged(list(model.agents), random=model.random)
    logged.do("step")
    logged.shuffle_do("step")
    assert calls == ["do", "shuffle_do"]
    assert model.tracker.starts == []
    assert "do" in vars(AgentSet)
    assert getattr(AgentSet.do, "__wrapped__", None) is not None  # Mesa's class: patched
