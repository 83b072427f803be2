"""launch/slurm/dapo.sbatch on a real one-node SLURM cluster (munged, slurmctld, slurmd).

The training command is replaced (DAPO_TRAIN_CMD) by a 2-rank gloo all_reduce job, so the
sbatch script, `srun`, launch/torchrun.sh and the c10d rendezvous run for real (the real
training runs under SLURM in test_slurm_two_nodes.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from launch_test_helpers import (
    DEMO_CONFIG,
    REPO,
    SBATCH,
    SUBMIT,
    expected_sum,
    launch_env,
    read_ranks,
)
from slurm_cluster import SlurmCluster

from megatron_dapo.config.loading import load_config

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.multirank]

NODE = "localhost"  # the `slurm_cluster` fixture's node, at 127.0.0.1


def test_sbatch_runs_the_training_command_on_two_ranks(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    launch = load_config(DEMO_CONFIG).launch
    world = launch.nnodes * launch.nproc_per_node
    env = launch_env(
        slurm_cluster.env(), tmp_path / "out", tmp_path / "logs", DAPO_CONFIG=str(DEMO_CONFIG)
    )
    overrides = ["launch.slurm_time=00:20:00", "training.steps=7"]
    job = slurm_cluster.run_job(
        [str(SUBMIT), "--", *overrides], env, tmp_path / "job.out", cwd=REPO
    )

    assert job.exit_code == 0, job.output
    assert job.info["JobState"] == "COMPLETED"
    assert job.info["ExitCode"] == "0:0"
    assert job.info["NodeList"] == NODE
    assert job.info["TimeLimit"] == "00:20:00"  # the config with its overrides, via submit.sh
    assert f"trainer nodes {NODE}; rollout nodes none (embedded fleet)" in job.output

    ranks = read_ranks(tmp_path / "out")
    assert [r["rank"] for r in ranks] == list(range(world))
    for record in ranks:
        assert record["world_size"] == world
        assert record["all_reduce_sum"] == expected_sum(world)
        assert record["slurm_job_id"] == job.job_id
        assert record["extra_args"] == overrides  # no rollout nodes: no cluster-mode overrides

    node_log = (tmp_path / "logs" / f"trainer-{NODE}.log").read_text()
    assert f"node {NODE}: {launch.nnodes} node(s) x {launch.nproc_per_node} rank(s)" in (node_log)
    assert f"rendezvous {job.job_id} at 127.0.0.1:{env['DAPO_MASTER_PORT']}" in node_log
    for rank in range(world):
        line = f"rank {rank}/{world}: all_reduce sum {expected_sum(world)}"
        assert f"[default{rank}]:{line}" in node_log
        (rank_log,) = (tmp_path / "logs" / f"ranks-{NODE}").glob(f"*/attempt_0/{rank}/stdout.log")
        assert line in rank_log.read_text()


def test_a_failing_rank_fails_the_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    env = launch_env(
        slurm_cluster.env(),
        tmp_path / "out",
        tmp_path / "logs",
        DAPO_NPROC_PER_NODE="2",
        DAPO_TEST_FAIL_RANK="1",
    )
    job = slurm_cluster.run_job(
        ["sbatch", "--nodes=1", str(SBATCH)], env, tmp_path / "job.out", cwd=REPO
    )

    assert job.exit_code != 0
    assert job.info["JobState"] == "FAILED"
    assert job.info["ExitCode"] != "0:0"
    assert "rank 1: failing on purpose" in (tmp_path / "logs" / f"trainer-{NODE}.log").read_text()
    assert read_ranks(tmp_path / "out") == []  # rank 0 never completes its all_reduce


def test_a_node_count_mismatch_stops_before_launching(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    env = launch_env(
        slurm_cluster.env(), tmp_path / "out", tmp_path / "logs", DAPO_ROLLOUT_NODES="1"
    )
    job = slurm_cluster.run_job(
        ["sbatch", "--nodes=1", str(SBATCH)], env, tmp_path / "job.out", cwd=REPO
    )

    assert job.info["JobState"] == "FAILED"
    assert (
        f"the job has 1 node(s) ({NODE}) but the run needs 1 trainer + 1 rollout node(s)"
        in job.output
    )
    assert not (tmp_path / "logs").exists()  # no trainer and no fleet step ran
