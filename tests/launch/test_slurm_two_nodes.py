"""launch/slurm/ on a real two-node SLURM cluster (two slurmd daemons on this machine).

A real run: `submit.sh` with one trainer node (2 ranks of `megatron-dapo train` on the CPU demo
config) and one rollout node (a real SGLang server behind the real `sglang-router`). Two trainer
nodes meeting in one c10d rendezvous (the training command replaced by a gloo all_reduce
program, DAPO_TRAIN_CMD). A fleet whose real SGLang server cannot start.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from launch_test_helpers import (
    CPU_SGLANG_ARGS,
    DEMO_CONFIG,
    REPO,
    SBATCH,
    SUBMIT,
    clean_env,
    expected_sum,
    launch_env,
    read_ranks,
)
from slurm_cluster import SlurmCluster

from megatron_dapo.config.loading import load_config
from pipeline.sglang_server import free_port
from tests.e2e.train_runs import processes_mentioning, step_records

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.multirank]

STEPS = 2


def fleet_ports() -> dict[str, str]:
    """The rollout node's server and router on free 127.0.0.1 ports."""
    return {
        "DAPO_BIND_HOST": "127.0.0.1",
        "DAPO_SGLANG_PORT": str(free_port()),
        "DAPO_ROUTER_PORT": str(free_port()),
    }


def surviving_processes(text: str, settle_s: float = 15.0) -> list[int]:
    """PIDs whose command line holds `text` after up to `settle_s` for them to end."""
    deadline = time.monotonic() + settle_s
    while (pids := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return pids


def test_two_trainer_nodes_meet_in_one_rendezvous(
    slurm_two_nodes: SlurmCluster, tmp_path: Path
) -> None:
    env = launch_env(
        slurm_two_nodes.env(),
        tmp_path / "out",
        tmp_path / "logs",
        DAPO_NNODES="2",
        DAPO_NPROC_PER_NODE="1",
    )
    job = slurm_two_nodes.run_job(
        ["sbatch", "--nodes=2", str(SBATCH)], env, tmp_path / "job.out", cwd=REPO, timeout_s=150
    )

    assert job.exit_code == 0, job.output
    assert job.info["JobState"] == "COMPLETED"
    names = slurm_two_nodes.node_names
    assert f"trainer nodes {' '.join(names)}; rollout nodes none (embedded fleet)" in job.output
    ranks = read_ranks(tmp_path / "out")
    assert [r["rank"] for r in ranks] == [0, 1]
    assert sorted(r["group_rank"] for r in ranks) == [0, 1]  # one torchrun agent per node
    for record in ranks:
        assert record["world_size"] == 2
        assert record["all_reduce_sum"] == expected_sum(2)
    for name in names:
        log = (tmp_path / "logs" / f"trainer-{name}.log").read_text()
        assert f"node {name}: 2 node(s) x 1 rank(s), c10d rendezvous {job.job_id}" in log
        assert "[default0]:rank " in log


def test_submit_trains_on_a_trainer_node_with_a_real_fleet_on_a_rollout_node(
    slurm_two_nodes: SlurmCluster, tmp_path: Path
) -> None:
    trainer_node, fleet_node = slurm_two_nodes.node_names
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    overrides = [
        "launch.rollout_nodes=1",  # --nodes=2 through submit.sh, the fleet on the second node
        f"training.steps={STEPS}",
        "training.prompts_per_step=4",
        "rollout.n_samples_per_prompt=4",
        "training.mini_batch_size=8",
        "metrics.prometheus=false",
        f"model.hf_checkpoint={run_dir / 'initial-model'}",
        f"checkpoint.dir={run_dir / 'checkpoints'}",
    ]
    env = clean_env(
        slurm_two_nodes.env(),
        DAPO_CONFIG=str(DEMO_CONFIG),
        DAPO_MASTER_PORT=str(free_port()),
        DAPO_LOG_DIR=str(logs),
        DAPO_SGLANG_ARGS=CPU_SGLANG_ARGS,
        DAPO_FLEET_TIMEOUT="300",
        OMP_NUM_THREADS="1",
        **fleet_ports(),
    )
    job = slurm_two_nodes.run_job(
        [str(SUBMIT), "--", *overrides], env, tmp_path / "job.out", cwd=tmp_path, timeout_s=480
    )

    assert job.exit_code == 0, job.output
    assert job.info["JobState"] == "COMPLETED"
    assert job.info["NodeList"] == "node[1-2]"
    assert job.info["TimeLimit"] == load_config(DEMO_CONFIG).launch.slurm_time
    assert f"trainer nodes {trainer_node}; rollout nodes {fleet_node}" in job.output
    assert f"initial model: {run_dir / 'initial-model'}" in job.output  # written before the fleet

    # The run: one metrics line per step, and the final Megatron checkpoint.
    records = step_records(run_dir)
    assert [r["step"] for r in records] == list(range(STEPS))
    assert all(r["grad_norm"] > 0 for r in records)
    assert any((run_dir / "checkpoints" / f"step{STEPS}").iterdir())

    # Per-node logs: the trainer's step lines on its node, the fleet's on the rollout node.
    assert sorted(p.name for p in logs.glob("*.log")) == sorted(
        [f"trainer-{trainer_node}.log", f"sglang-{fleet_node}.log", f"router-{fleet_node}.log"]
    )
    trainer_log = (logs / f"trainer-{trainer_node}.log").read_text()
    assert re.findall(rf"step (\d+)/{STEPS} \| reward", trainer_log) == [
        str(step) for step in range(1, STEPS + 1)
    ]
    server_url = f"http://127.0.0.1:{env['DAPO_SGLANG_PORT']}"
    router_url = f"http://127.0.0.1:{env['DAPO_ROUTER_PORT']}"
    command = trainer_log.split("[torchrun.sh] command: ", 1)[1].splitlines()[0]
    assert command.split() == [
        "-m",
        "megatron_dapo.cli",
        "train",
        str(DEMO_CONFIG),
        *overrides,
        "rollout.mode=cluster",
        f"rollout.server_urls=[{server_url}]",
        f"rollout.router_url={router_url}",
    ]
    server_log = (logs / f"sglang-{fleet_node}.log").read_text()
    assert "POST /generate" in server_log  # the rollouts, sent through the router
    assert server_log.count('"POST /update_weights_from_disk HTTP/1.1" 200') >= STEPS
    assert server_url in (logs / f"router-{fleet_node}.log").read_text()

    assert surviving_processes(str(run_dir)) == [], "fleet processes outlived the job"


def test_a_fleet_that_fails_to_start_fails_the_job_without_waiting_out_the_timeout(
    slurm_two_nodes: SlurmCluster, tmp_path: Path
) -> None:
    missing_model = tmp_path / "no-such-model"
    env = launch_env(
        slurm_two_nodes.env(),
        tmp_path / "out",
        tmp_path / "logs",
        DAPO_NNODES="1",
        DAPO_NPROC_PER_NODE="2",
        DAPO_ROLLOUT_NODES="1",
        DAPO_SGLANG_MODEL=str(missing_model),
        DAPO_SGLANG_ARGS=CPU_SGLANG_ARGS,
        DAPO_FLEET_TIMEOUT="600",
        **fleet_ports(),
    )
    start = time.monotonic()
    job = slurm_two_nodes.run_job(
        ["sbatch", "--nodes=2", str(SBATCH)], env, tmp_path / "job.out", cwd=REPO, timeout_s=180
    )

    assert time.monotonic() - start < 180  # well inside DAPO_FLEET_TIMEOUT
    assert job.info["JobState"] == "FAILED"
    assert "has exited" in job.output
    assert "the SGLang servers did not come up" in job.output
    assert f"http://127.0.0.1:{env['DAPO_SGLANG_PORT']}/health" in job.output
    fleet_node = slurm_two_nodes.node_names[1]
    assert str(missing_model) in (tmp_path / "logs" / f"sglang-{fleet_node}.log").read_text()
    assert not list((tmp_path / "logs").glob("trainer-*.log"))  # the trainer never started
    assert read_ranks(tmp_path / "out") == []
