"""launch/container_entrypoint.sh, the image's entrypoint, run on this machine (no Docker): the
command line of each role (DAPO_DRY_RUN=1) from its arguments, the environment and the config,
its errors, and the fleet and router roles serving a generation for real on CPU."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from launch_test_helpers import CPU_SGLANG_ARGS, DEMO_CONFIG, REPO, clean_env

from megatron_dapo.config.loading import load_config
from pipeline.sglang_server import ManagedProcess, free_port, http_get
from tests.e2e.train_runs import children

ENTRYPOINT = REPO / "launch" / "container_entrypoint.sh"
INITIAL_MODEL = REPO / "launch" / "initial_model.py"


def entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=60
    )


def dry_run(*args: str, **env: str) -> list[str]:
    """The command line the entrypoint would run for `args`, as an argv."""
    done = entrypoint(clean_env(DAPO_DRY_RUN="1", **env), *args)
    assert done.returncode == 0, done.stderr
    return shlex.split(done.stdout)


def test_trainer_role_runs_torchrun_sh_with_the_overrides(tmp_path: Path) -> None:
    argv = dry_run(
        "trainer",
        "training.steps=2",
        DAPO_CONFIG=str(DEMO_CONFIG),
        DAPO_NODE_NAME="trainer-0",
        DAPO_LOG_DIR=str(tmp_path),
    )
    launch = load_config(DEMO_CONFIG).launch

    assert argv[1:3] == ["-m", "torch.distributed.run"]
    assert argv[argv.index("--nproc-per-node") + 1] == str(launch.nproc_per_node)
    assert argv[argv.index("--log-dir") + 1] == f"{tmp_path}/ranks-trainer-0"
    assert argv[-5:] == ["-m", "megatron_dapo.cli", "train", str(DEMO_CONFIG), "training.steps=2"]


def test_fleet_role_serves_the_configured_model_with_env_and_argument_flags() -> None:
    python = clean_env()["DAPO_PYTHON"]
    from_config = dry_run("fleet", DAPO_CONFIG=str(DEMO_CONFIG))
    from_env = dry_run(
        "fleet",
        "--mem-fraction-static",
        "0.8",
        DAPO_SGLANG_MODEL="/models/policy",
        DAPO_SGLANG_ARGS="--tp 8 --dtype bfloat16",
        DAPO_BIND_HOST="10.0.0.5",
        DAPO_SGLANG_PORT="31000",
    )

    model = load_config(DEMO_CONFIG).model.hf_checkpoint
    server = [python, "-m", "sglang.launch_server", "--model-path"]
    policy_dtype = ["--dtype", "float32"]  # the fleet computes in the policy's dtype
    assert from_config == [*server, model, "--host", "0.0.0.0", "--port", "30000", *policy_dtype]
    assert from_env == [
        *server,
        "/models/policy",
        "--host",
        "10.0.0.5",
        "--port",
        "31000",
        "--tp",
        "8",
        "--dtype",
        "bfloat16",
        "--mem-fraction-static",
        "0.8",
    ]


def test_router_role_fronts_the_given_servers() -> None:
    workers = ["http://10.0.0.5:30000", "http://10.0.0.6:30000"]
    argv = dry_run("router", *workers, DAPO_ROUTER_PORT="32000", DAPO_FLEET_TIMEOUT="600")

    assert argv == [
        clean_env()["DAPO_PYTHON"],
        "-m",
        "sglang_router.launch_router",
        "--host",
        "0.0.0.0",
        "--port",
        "32000",
        "--policy",
        "round_robin",
        "--worker-startup-timeout-secs",
        "600",
        "--worker-startup-check-interval",
        "2",
        "--worker-urls",
        *workers,
    ]


def test_roles_without_what_they_need_fail_with_the_reason() -> None:
    env = clean_env()
    cases = {
        ("trainer",): "set DAPO_CONFIG",
        ("fleet",): "the SGLang fleet needs a model",
        ("router",): "sglang-router needs at least one worker URL",
        ("evaluate",): "unknown role 'evaluate'",
    }
    for args, reason in cases.items():
        done = entrypoint(env, *args)
        assert done.returncode == 1, args
        assert reason in done.stderr, (args, done.stderr)


def test_help_lists_the_roles() -> None:
    done = entrypoint(clean_env(), "help")

    assert done.returncode == 0
    for role in ("trainer [key=value ...]", "fleet [server flag ...]", "router WORKER_URL"):
        assert role in done.stdout
    assert "#" not in done.stdout  # the header comment, as text


@pytest.mark.slow
@pytest.mark.server
def test_fleet_and_router_roles_serve_a_generation_on_cpu(tmp_path: Path) -> None:
    model = tmp_path / "model"
    subprocess.run(
        [sys.executable, str(INITIAL_MODEL), str(DEMO_CONFIG), f"model.hf_checkpoint={model}"],
        env=clean_env(),
        check=True,
        timeout=300,
    )
    server_port, router_port = free_port(), free_port()
    server_url, router_url = f"http://127.0.0.1:{server_port}", f"http://127.0.0.1:{router_port}"
    env = clean_env(
        DAPO_SGLANG_MODEL=str(model),
        DAPO_SGLANG_ARGS=CPU_SGLANG_ARGS,
        DAPO_BIND_HOST="127.0.0.1",
        DAPO_SGLANG_PORT=str(server_port),
        DAPO_ROUTER_PORT=str(router_port),
        OMP_NUM_THREADS="1",
    )
    fleet = ManagedProcess("fleet", [str(ENTRYPOINT), "fleet"], tmp_path / "fleet.log", env)
    router = ManagedProcess(
        "router", [str(ENTRYPOINT), "router", server_url], tmp_path / "router.log", env
    )
    try:
        fleet.start()
        router.start()
        fleet.wait_until(lambda: http_get(f"{server_url}/health")[0] == 200, 300, "healthy")
        router.wait_until(
            lambda: server_url in http_get(f"{router_url}/workers")[1].decode(), 60, "registered"
        )
        # The role execs its process: the entrypoint (the group reaper's one child; the
        # container's main process) is the server itself.
        (entrypoint,) = children(fleet.pid)
        cmdline = Path(f"/proc/{entrypoint}/cmdline").read_bytes().split(b"\0")
        assert b"sglang.launch_server" in cmdline

        request = urllib.request.Request(
            f"{router_url}/generate",
            data=json.dumps(
                {"text": "1+2=", "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    finally:
        router.stop()
        fleet.stop()

    assert 1 <= answer["meta_info"]["completion_tokens"] <= 3
    assert isinstance(answer["text"], str)
    assert "POST /generate" in (tmp_path / "fleet.log").read_text()  # reached through the router
