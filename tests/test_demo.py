"""The built-in demo runs, prints its table and agrees with itself across modes."""

from __future__ import annotations

import pytest

from mesa_llm_parallel import demo


def test_demo_prints_one_row_per_way_and_same_outcome(capsys):
    assert demo.main(["--agents", "12", "--latency", "5", "--workers", "4"]) == 0
    out = capsys.readouterr().out
    assert "sequential" in out
    assert "asyncio mode" in out
    assert "threading mode (4 threads)" in out
    assert out.count("     12") == 3  # every agent made its call in every run
    assert "same opinions: yes" in out


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--agents", "0"], "--agents must be at least 1, got 0"),
        (["--workers", "0"], "--workers must be at least 1, got 0"),
        (["--latency", "-1"], "--latency must be >= 0, got -1"),
        (["--agents", "many"], "invalid int value: 'many'"),
    ],
)
def test_demo_rejects_bad_options(args, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(args)
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_demo_model_steps_the_same_in_parallel():
    import mesa_llm_parallel as mlp

    sequential = demo.OpinionModel(20, 0.001, seed=3)
    sequential.step()
    mlp.enable_automatic_parallel_stepping(mode="threading", max_workers=5)
    parallel = demo.OpinionModel(20, 0.001, seed=3)
    parallel.parallel_stepping = True
    parallel.step()
    assert parallel.opinions() == sequential.opinions()
    assert parallel.llm.calls == 20


def test_demo_server_mode_runs_the_table_over_real_http(capsys):
    pytest.importorskip("openai", reason="--server needs 'openai' (mesa_llm_parallel[llm])")
    assert demo.main(["--server", "--agents", "12", "--latency", "5", "--workers", "4"]) == 0
    out = capsys.readouterr().out
    assert "over real HTTP" in out
    assert "loopback server at http://127.0.0.1:" in out
    assert "sequential" in out
    assert "asyncio mode" in out
    assert "threading mode (4 threads)" in out
    table = [
        line for line in out.splitlines() if line.startswith(("sequential", "asyncio", "threading"))
    ]
    calls = [line.split()[-1] for line in table]
    assert calls == ["12", "12", "12"]  # every agent made its request in every run
    assert "The server answered 36 of 36 requests (0 refused with 429)" in out
    assert "same opinions: yes" in out


def test_demo_server_answers_like_the_simulated_model():
    pytest.importorskip("openai", reason="ServerLLM needs 'openai' (mesa_llm_parallel[llm])")
    from mesa_llm_parallel.testing import LoopbackLLMServer

    simulated = demo.OpinionModel(15, 0.001, seed=4)
    simulated.step()
    with LoopbackLLMServer(latency=demo.server_latency(0.001), seed=4) as server:
        llm = demo.ServerLLM(server.base_url)
        served = demo.OpinionModel(15, 0.001, seed=4, llm=llm)
        served.step()
        llm.close()
    assert served.opinions() == simulated.opinions()
    assert served.llm.calls == 15


def test_demo_server_mode_without_openai_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "openai" else real_find_spec(name, *args),
    )
    with pytest.raises(SystemExit) as info:
        demo.main(["--server", "--agents", "3"])
    assert info.value.code == 2
    assert "pip install 'mesa_llm_parallel[llm]'" in capsys.readouterr().err


def test_demo_runs_as_a_module_and_its_model_lives_in_testing():
    import subprocess
    import sys

    from mesa_llm_parallel import testing

    assert (demo.OpinionModel, demo.ServerLLM, demo.SimulatedLLM) == (
        testing.OpinionModel,
        testing.ServerLLM,
        testing.SimulatedLLM,
    )
    done = subprocess.run(
        [sys.executable, "-m", "mesa_llm_parallel.demo", "--agents", "4", "--latency", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "same opinions: yes" in done.stdout
