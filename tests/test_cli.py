"""The `megatron-dapo` command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_dapo.cli import main
from megatron_dapo.config.loading import ConfigError, load_config

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


SHIPPED = sorted((DEMO.parent).glob("*.yaml"))


@pytest.mark.parametrize("config", SHIPPED, ids=[path.name for path in SHIPPED])
def test_plan_prints_the_memory_table_of_every_shipped_config(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        load_config(config)
    except ConfigError as err:  # the architecture comes from a checkpoint (`make smollm2`)
        if "missing required key 'model." not in str(err):
            raise
        pytest.skip(f"{config.name}: its model.hf_checkpoint is not on this machine")
    assert main(["plan", str(config), "--gpu-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    for row in ("parameters", "gradients", "optimizer", "activations, no recompute", "logits"):
        assert row in out
    assert "trainer fits 80 GiB" in out or "trainer does NOT fit 80 GiB" in out
    assert "fleet:" in out
