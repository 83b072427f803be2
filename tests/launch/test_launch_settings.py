"""launch/env.sh and launch/torchrun.sh before any rank starts: settings and their errors.

(The launches themselves run under real SLURM in test_slurm.py and test_slurm_two_nodes.py.)
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from launch_test_helpers import DEMO_CONFIG, REPO, SUBMIT, clean_env

from megatron_dapo.config.loading import load_config

TORCHRUN = REPO / "launch" / "torchrun.sh"
ENV_SH = REPO / "launch" / "env.sh"
SETTING_PREFIXES = ("DAPO_", "NCCL_", "GLOO_")


def shell_settings(env: dict[str, str], *overrides: str) -> dict[str, str]:
    """The DAPO_*, NCCL_* and GLOO_* variables a launcher sees after sourcing launch/env.sh with
    `env` and loading the config with `overrides`."""
    script = f'set -eu; source "{ENV_SH}"; dapo_load_config "$@"; env'
    done = subprocess.run(
        ["bash", "-c", script, "bash", *overrides],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    lines = done.stdout.splitlines()
    return dict(line.split("=", 1) for line in lines if line.startswith(SETTING_PREFIXES))


def test_config_fills_unset_settings_and_the_environment_wins() -> None:
    launch = load_config(DEMO_CONFIG).launch
    settings = shell_settings(clean_env(DAPO_CONFIG=str(DEMO_CONFIG), DAPO_NNODES="3"))

    assert settings["DAPO_NNODES"] == "3"
    assert settings["DAPO_NPROC_PER_NODE"] == str(launch.nproc_per_node)
    assert settings["DAPO_MASTER_PORT"] == str(launch.master_port)
    assert settings["DAPO_ROLLOUT_NODES"] == str(launch.rollout_nodes)
    assert settings["DAPO_SLURM_TIME"] == launch.slurm_time
    assert settings["DAPO_ROOT"] == str(REPO)


def test_a_bad_config_stops_the_launcher_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO_CONFIG.read_text().replace("nproc_per_node: 2", "nproc_per_node: 0"))
    done = subprocess.run(
        ["bash", str(TORCHRUN)],
        env=clean_env(DAPO_CONFIG=str(bad)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "launch.nproc_per_node" in done.stderr
    assert f"cannot read the launch settings of DAPO_CONFIG={bad}" in done.stderr


def test_torchrun_without_a_command_says_what_to_set() -> None:
    done = subprocess.run(
        ["bash", str(TORCHRUN)], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "set DAPO_CONFIG" in done.stderr


def test_overrides_apply_to_the_launch_settings() -> None:
    settings = shell_settings(
        clean_env(DAPO_CONFIG=str(DEMO_CONFIG)),
        "launch.rollout_nodes=3",
        "model.hf_checkpoint=/models/policy",
        "rollout.server_args=[--tp, '2']",
    )

    assert settings["DAPO_ROLLOUT_NODES"] == "3"
    assert settings["DAPO_SGLANG_MODEL"] == "/models/policy"
    assert settings["DAPO_SGLANG_ARGS"] == "--dtype float32 --tp 2"  # the policy's precision


def test_network_and_gpu_settings_come_from_the_config_unless_set() -> None:
    unset = shell_settings(clean_env(DAPO_CONFIG=str(DEMO_CONFIG)))
    assert unset["DAPO_SLURM_GPUS_PER_NODE"] == ""
    assert not {k for k in unset if k.startswith(("NCCL_", "GLOO_"))}  # the libraries choose

    overrides = ("launch.slurm_gpus=true", "launch.network_interface=eth1")
    settings = shell_settings(
        clean_env(DAPO_CONFIG=str(DEMO_CONFIG), NCCL_IB_HCA="mlx5_2"),
        *overrides,
        "launch.nccl_ib_hca=mlx5_0",
    )
    assert settings["DAPO_SLURM_GPUS_PER_NODE"] == str(
        load_config(DEMO_CONFIG).launch.nproc_per_node
    )
    assert settings["NCCL_SOCKET_IFNAME"] == settings["GLOO_SOCKET_IFNAME"] == "eth1"
    assert settings["NCCL_IB_HCA"] == "mlx5_2"  # the environment wins


def test_submit_asks_slurm_for_one_gpu_per_rank(tmp_path: Path) -> None:
    fake_sbatch = tmp_path / "sbatch"  # prints what it is given
    fake_sbatch.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake_sbatch.chmod(0o755)
    env = clean_env(DAPO_CONFIG=str(DEMO_CONFIG))
    env["PATH"] = f"{tmp_path}:{env['PATH']}"

    def sbatch_args(*overrides: str) -> list[str]:
        done = subprocess.run(
            ["bash", str(SUBMIT), "--", *overrides],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return done.stdout.splitlines()

    nproc = load_config(DEMO_CONFIG).launch.nproc_per_node
    assert f"--gpus-per-node={nproc}" in sbatch_args("launch.slurm_gpus=true")
    assert not [a for a in sbatch_args() if a.startswith("--gpus")]  # a CPU run asks for none


def test_torchrun_command_takes_settings_from_config_overrides_and_environment(
    tmp_path: Path,
) -> None:
    launch = load_config(DEMO_CONFIG).launch
    env = clean_env(
        DAPO_CONFIG=str(DEMO_CONFIG),
        DAPO_DRY_RUN="1",
        DAPO_NNODES="2",
        DAPO_NODE_NAME="n7",
        DAPO_LOG_DIR=str(tmp_path / "logs"),
    )
    done = subprocess.run(
        ["bash", str(TORCHRUN), "launch.master_port=12345", "training.steps=3"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )

    assert shlex.split(done.stdout) == [
        env["DAPO_PYTHON"],
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",  # the environment wins
        "--nproc-per-node",
        str(launch.nproc_per_node),  # the config
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{launch.master_addr}:12345",  # the override
        "--rdzv-id",
        "megatron-dapo",
        "--max-restarts",
        "0",
        "--log-dir",
        f"{tmp_path / 'logs'}/ranks-n7",
        "--tee",
        "3",
        "-m",
        "megatron_dapo.cli",
        "train",
        str(DEMO_CONFIG),
        "launch.master_port=12345",
        "training.steps=3",
    ]
    assert not (tmp_path / "logs").exists()  # a dry run starts nothing
