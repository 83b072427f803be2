"""Multi-rank parity: every layout computes the single-rank loss, gradients and update.

Three torchrun launches (see `parity_worker.py`): a 1-rank reference; a 2-rank launch running
dense TP=2 + SP, dense PP=2 (tied embeddings), MoE PP=2 x VPP=2, MoE EP=2 (DP=2), MoE TP=2 with
expert TP=2 + SP, and dense DP=2; a 4-rank launch running MoE TP=2 x EP=2 x expert TP=2 (DP=2),
MoE TP=2 x PP=2 x EP=2 + SP, and reloading the dense DP=2 checkpoint with DP=4. All use the
distributed optimizer. Each scenario starts from the reference's initial weights; after one step
the loss, every gradient (full shape) and every parameter must match the reference within fp32
round-off, and step 2 must match both when continued and when resumed from a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch_helpers import run_torchrun

pytestmark = [pytest.mark.slow, pytest.mark.multirank]

WORKER = Path(__file__).with_name("parity_worker.py")
# fp32 round-off of a differently ordered reduction, far below one Adam step (lr = 1e-2)
LOSS_TOL = 1e-6
TENSOR_TOL = 2e-6


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("parity")
    for num_ranks, phase in ((1, "reference"), (2, "two"), (4, "four")):
        run_torchrun(WORKER, f"--phase={phase}", f"--out={out}", nproc=num_ranks, timeout=420)
    return {
        **json.loads((out / "two.json").read_text()),
        **json.loads((out / "four.json").read_text()),
    }


LAYOUTS = [
    "dense_tp2_sp",
    "dense_pp2_tied",
    "moe_pp2_vpp2",
    "moe_ep2_dp2",
    "moe_tp2_etp2_sp",
    "dense_dp2",
    "moe_tp2_ep2_etp2_sp",
    "moe_tp2_pp2_ep2_sp",
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_first_step_matches_single_rank(reports: dict[str, dict], layout: str) -> None:
    report = reports[layout]
    assert report["loss"] <= LOSS_TOL
    assert report["grad_norm"] <= LOSS_TOL
    assert report["grads"] <= TENSOR_TOL
    assert report["params"] <= TENSOR_TOL


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resumed_step_matches_continued_step(reports: dict[str, dict], layout: str) -> None:
    report = reports[layout]
    for how in ("continued", "resumed"):
        assert report[f"{how}_loss2"] <= LOSS_TOL, how
        assert report[f"{how}_params2"] <= TENSOR_TOL, how


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resumed_adam_steps_are_separate_and_counted_once(
    reports: dict[str, dict], layout: str
) -> None:
    adam = reports[layout]["adam"]
    assert adam["step_tensors"] == adam["states"]
    assert adam["step_values"] == [2.0]  # one step before the checkpoint, one after


def test_checkpoint_reloads_with_another_data_parallel_size(reports: dict[str, dict]) -> None:
    report = reports["dense_dp2_checkpoint_on_dp4"]
    assert report["resumed_loss2"] <= LOSS_TOL
    assert report["resumed_params2"] <= TENSOR_TOL
