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
