"""Exact resume: a 2-rank `megatron-dapo train` killed with SIGKILL in the middle of a run and
started again continues with the same losses and metrics as a run that was never interrupted,
sequential (`rollout.max_staleness: 0`) and with generation overlapping training
(`max_staleness: 1`: the checkpoint holds the groups prefetched for the next step).

Both runs use one real SGLang server in deterministic mode (`rollout.deterministic`: seeded
sampling per response, rounds admitted in prompt order), started here with the initial policy;
each run first loads its own policy onto it (cluster mode syncs weights at start).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megatron_dapo.ckpt.run_checkpoint import complete_checkpoints
from tests.e2e.train_runs import (
    command_line,
    descendants,
    finish,
    start,
    step_records,
    survivors,
    train_command,
)

STEPS = 5
SAVE_INTERVAL = 2
KILL_AFTER_LOGGED_STEPS = 3
"""SIGKILL once step 3 is logged: the newest checkpoint is after step 2, step 4 is running."""

COMPARED = (
    "loss",
    "entropy",
    "clip_fraction_low",
    "clip_fraction_high",
    "approx_kl",
    "reward_mean",
    "accuracy",
    "advantage_mean",
    "advantage_std",
    "grad_norm",
    "learning_rate",
    "trained_tokens",
    "response_length_mean",
    "moe_aux_loss",
    "kept_groups",
    "generated_groups",
    "generation_rounds",
)
RELATIVE_TOLERANCE = 1e-5
"""The sampling log-probs come from the server, whose CPU matmuls may differ in the last bits
between batch compositions; everything else is bitwise reproducible."""

pytestmark = [pytest.mark.slow, pytest.mark.multirank, pytest.mark.server]


def _command(run_dir: Path, initial_model: Path, server_url: str, staleness: int) -> list[str]:
    return train_command(
        run_dir,
        initial_model,
        server_url,
        f"training.steps={STEPS}",
        f"checkpoint.save_interval={SAVE_INTERVAL}",
        "checkpoint.resume=auto",
        "rollout.deterministic=true",
        f"rollout.max_staleness={staleness}",
    )


def _kill_when_logged(process: subprocess.Popen[bytes], run_dir: Path, log: Path) -> None:
    deadline = time.monotonic() + 600.0
    while len(step_records(run_dir)) < KILL_AFTER_LOGGED_STEPS:
        assert process.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "the run did not reach the kill point"
        time.sleep(0.2)
    started = descendants(process.pid)  # ranks, and the checkpoint writer's processes
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # torchrun starts its ranks in sessions of their own: they die with their parent
    # (`pipeline.parent_death`), not with the launcher's process group, and so do the
    # processes they started.
    left = [command_line(pid) for pid in survivors(started, timeout_s=30.0)]
    assert not left, f"processes of the run outlived the killed launcher: {left}"


@pytest.mark.parametrize("staleness", [0, 1])
def test_sigkilled_run_resumes_with_the_same_losses_and_metrics(
    tmp_path: Path, initial_model: Path, deterministic_server: str, staleness: int
) -> None:
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    reference_log, resumed_log = tmp_path / "reference.log", tmp_path / "resumed.log"

    finish(
        start(
            _command(reference_dir, initial_model, deterministic_server, staleness),
            reference_log,
        ),
        reference_log,
    )
    command = _command(resumed_dir, initial_model, deterministic_server, staleness)
    _kill_when_logged(start(command, resumed_log), resumed_dir, resumed_log)
    killed_at = [step for step, _ in complete_checkpoints(resumed_dir / "checkpoints")]
    assert killed_at == [SAVE_INTERVAL], killed_at
    finish(start(command, resumed_log), resumed_log)

    output = resumed_log.read_text()
    assert f"(after step {SAVE_INTERVAL})" in output
    reference, resumed = step_records(reference_dir), step_records(resumed_dir)
    assert [r["step"] for r in reference] == list(range(STEPS))
    assert [r["step"] for r in resumed] == list(range(STEPS))
    for ref, res in zip(reference, resumed, strict=True):
        for key in COMPARED:
            assert res[key] == pytest.approx(ref[key], rel=RELATIVE_TOLERANCE, abs=1e-7), (
                f"step {ref['step']} {key}: resumed {res[key]} vs uninterrupted {ref[key]}"
            )
    # Something was learned, so equal metrics are not equal by being constant.
    assert len({r["loss"] for r in reference}) > 1
    assert len({round(r["entropy"], 6) for r in reference}) == STEPS
    final = [step for step, _ in complete_checkpoints(resumed_dir / "checkpoints")]
    assert final[-1] == STEPS
