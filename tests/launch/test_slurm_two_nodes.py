"""launch/slurm/dapo.sbatch on a real two-node SLURM cluster (two slurmd daemons on this machine).

Two trainer nodes meeting in a c10d rendezvous; and 1 trainer node + 1 rollout node, where the
rollout node runs a stand-in SGLang server (DAPO_SERVER_CMD) behind the real `sglang-router` and
the trainer node runs the gloo job in place of the trainer (DAPO_TRAIN_CMD), which records the
rollout overrides it is given.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from launch_test_helpers import REPO, SBATCH, expected_sum, launch_env, read_ranks
from slurm_cluster import SlurmCluster

from pipeline.sglang_server import free_port

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.multirank]

STUB_SERVER = Path(__file__).resolve().parent / "stub_sglang_server.py"


def fleet_env(cluster: SlurmCluster, tmp_path: Path, **extra: str) -> dict[str, str]:
    """1 trainer node with 2 ranks + 1 rollout node running the stub server, on 127.0.0.1."""
    return launch_env(
        cluster.env(),
        tmp_path / "out",
        tmp_path / "logs",
        DAPO_NNODES="1",
        DAPO_NPROC_PER_NODE="2",
        DAPO_ROLLOUT_NODES="1",
        DAPO_BIND_HOST="127.0.0.1",
        DAPO_SGLANG_PORT=str(free_port()),
        DAPO_ROUTER_PORT=str(free_port()),
        **extra,
    )


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


def test_rollout_nodes_run_the_fleet_and_router_for_the_trainer(
    slurm_two_nodes: SlurmCluster, tmp_path: Path
) -> None:
    trainer_node, fleet_node = slurm_two_nodes.node_names
    env = fleet_env(
        slurm_two_nodes,
        tmp_path,
        DAPO_SERVER_CMD=str(STUB_SERVER),
        DAPO_SGLANG_ARGS="--mem-fraction-static 0.5",
        DAPO_FLEET_TIMEOUT="90",
    )
    server_port, router_port = env["DAPO_SGLANG_PORT"], env["DAPO_ROUTER_PORT"]
    job = slurm_two_nodes.run_job(
        ["sbatch", "--nodes=2", str(SBATCH)], env, tmp_path / "job.out", cwd=REPO, timeout_s=150
    )

    assert job.exit_code == 0, job.output
    assert job.info["JobState"] == "COMPLETED"
    assert f"trainer nodes {trainer_node}; rollout nodes {fleet_node}" in job.output

    server_url, router_url = f"http://127.0.0.1:{server_port}", f"http://127.0.0.1:{router_port}"
    expected_overrides = [
        "rollout.mode=cluster",
        f"rollout.server_urls=[{server_url}]",
        f"rollout.router_url={router_url}",
    ]
    ranks = read_ranks(tmp_path / "out")
    assert [r["rank"] for r in ranks] == [0, 1]
    for record in ranks:
        assert record["all_reduce_sum"] == expected_sum(2)
        assert record["extra_args"] == expected_overrides

    logs = tmp_path / "logs"
    assert sorted(p.name for p in logs.glob("*.log")) == sorted(
        [f"trainer-{trainer_node}.log", f"sglang-{fleet_node}.log", f"router-{fleet_node}.log"]
    )
    server_log = (logs / f"sglang-{fleet_node}.log").read_text()
    argv = json.loads(server_log.split("stub server argv: ", 1)[1].splitlines()[0])
    assert argv == [
        "--host",
        "127.0.0.1",
        "--port",
        str(server_port),
        "--mem-fraction-static",
        "0.5",
    ]
    assert "request GET /health" in server_log  # the script's wait and the router's probe
    assert (
        f"node {trainer_node}: 1 node(s) x 2 rank(s)"
        in (logs / f"trainer-{trainer_node}.log").read_text()
    )


def test_a_fleet_that_fails_to_start_fails_the_job_without_waiting_out_the_timeout(
    slurm_two_nodes: SlurmCluster, tmp_path: Path
) -> None:
    env = fleet_env(
        slurm_two_nodes,
        tmp_path,
        DAPO_SERVER_CMD=f"{STUB_SERVER} --exit-code 4",
        DAPO_FLEET_TIMEOUT="600",
    )
    start = time.monotonic()
    job = slurm_two_nodes.run_job(
        ["sbatch", "--nodes=2", str(SBATCH)], env, tmp_path / "job.out", cwd=REPO, timeout_s=120
    )

    assert time.monotonic() - start < 120  # well inside DAPO_FLEET_TIMEOUT
    assert job.info["JobState"] == "FAILED"
    assert "has exited" in job.output
    assert "the SGLang servers did not come up" in job.output
    assert f"http://127.0.0.1:{env['DAPO_SGLANG_PORT']}/health" in job.output
    assert not list((tmp_path / "logs").glob("trainer-*.log"))  # the trainer never started
    assert read_ranks(tmp_path / "out") == []
