"""Every tensor the project hands a collective would be accepted by NCCL (CUDA tensors only):
a real 2-rank training step, checkpoint save and load and weight export in three layouts, with
`torch.distributed`'s collectives wrapped (`collective_device_worker.py`, one torchrun launch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from collective_device_worker import SCENARIOS
from launch_helpers import run_torchrun

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.multirank
def test_collectives_receive_only_model_device_tensors(tmp_path: Path) -> None:
    out = tmp_path / "violations.json"
    run_torchrun(HERE / "collective_device_worker.py", str(tmp_path), str(out))
    results = json.loads(out.read_text())
    control = results.pop("control")
    assert [(v["collective"], v["where"].split(":")[0]) for v in control] == [
        ("all_reduce", "tests/training/collective_device_worker.py")
    ] * 2, control  # the host-made and the `.cpu()` tensor, not the moved one
    assert set(results) == set(SCENARIOS)
    for scenario, violations in results.items():
        assert violations == [], (scenario, violations)
