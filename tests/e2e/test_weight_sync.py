"""The trainer's weight sync without a disk: `rollout.weight_sync=distributed` (a broadcast group
with the servers, gloo on CPU) and `tensor` (serialized tensors in the request) load every new
policy version on a real SGLang server."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.train_runs import finish, start, step_records, train_command

STEPS = 2

pytestmark = [pytest.mark.slow, pytest.mark.multirank, pytest.mark.server]


def _served_weight_version(server_url: str) -> str:
    with urllib.request.urlopen(f"{server_url}/model_info", timeout=30) as response:
        return str(json.load(response)["weight_version"])


@pytest.mark.parametrize("weight_sync", ["distributed", "tensor"])
def test_every_step_loads_the_new_policy_without_a_checkpoint_on_disk(
    weight_sync: str, tmp_path: Path, initial_model: Path, deterministic_server: str
) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    command = train_command(
        run_dir,
        initial_model,
        deterministic_server,
        f"training.steps={STEPS}",
        f"rollout.weight_sync={weight_sync}",
        "rollout.weight_sync_address=127.0.0.1",
    )
    finish(start(command, log), log)

    assert [r["step"] for r in step_records(run_dir)] == list(range(STEPS))
    assert _served_weight_version(deterministic_server) == str(STEPS)
    assert not (run_dir / "weights").exists(), "weights went through the disk"
    assert "weight_sync" in step_records(run_dir)[-1]["phase_seconds"]
