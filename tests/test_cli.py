"""The `megatron-dapo` command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_dapo.cli import main

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo-cpu.yaml"


def test_check_config_prints_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(DEMO), "algorithm.eps_high=0.31"]) == 0
    out = capsys.readouterr()
    assert "eps_high: 0.31" in out.out
    assert "is valid" in out.err


def test_bad_config_exits_2_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(DEMO), "algorithm.eps_low=-1"]) == 2
    assert "algorithm.eps_low = -1" in capsys.readouterr().err


def test_multi_node_training_is_not_started_from_one_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="launch.nnodes=2: start every node"):
        main(["train", str(DEMO), "launch.nnodes=2"])
