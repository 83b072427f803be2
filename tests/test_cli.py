"""The `megatron-dapo` command line and the stand-in main job (algorithm core on a toy policy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_dapo.algorithm_demo import run_algorithm_demo
from megatron_dapo.cli import main
from megatron_dapo.yaml_config import load_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo-cpu.yaml"


def test_check_config_prints_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(DEMO), "algorithm.eps_high=0.31"]) == 0
    out = capsys.readouterr()
    assert "eps_high: 0.31" in out.out
    assert "is valid" in out.err


def test_bad_config_exits_2_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(DEMO), "algorithm.eps_low=-1"]) == 2
    assert "algorithm.eps_low = -1" in capsys.readouterr().err


def test_demo_accuracy_rises() -> None:
    reports = run_algorithm_demo(load_config(DEMO), progress=lambda report: None)
    first = sum(r.accuracy for r in reports[:5]) / 5
    last = sum(r.accuracy for r in reports[-5:]) / 5
    assert last > first + 0.2, (first, last)
    assert reports[-1].entropy < reports[0].entropy


def test_demo_stops_when_dynamic_sampling_cannot_fill_the_batch() -> None:
    config = load_config(
        DEMO,
        [
            "algorithm.dynamic_sampling.max_generation_rounds=1",
            "rollout.n_samples_per_prompt=2",
            "training.prompts_per_step=32",
            "training.mini_batch_size=64",
        ],
    )
    with pytest.raises(RuntimeError, match="after 1 generation rounds"):
        run_algorithm_demo(config, progress=lambda report: None)
