"""Shared fixtures of the end-to-end tests: the demo's initial policy and one real SGLang
server in deterministic mode serving it (module scope, stopped by PID)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from megatron_dapo.config.loading import load_config
from megatron_dapo.hf.initial_checkpoint import write_random_checkpoint
from pipeline.config import RolloutConfig
from pipeline.fleet import EmbeddedFleetOptions, RolloutFleet
from tests.e2e.train_runs import DEMO


@pytest.fixture(scope="session")
def initial_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = load_config(DEMO)
    path = tmp_path_factory.mktemp("initial") / "model"
    return write_random_checkpoint(config.model, path, config.training.seed)


@pytest.fixture(scope="session")
def deterministic_server(
    initial_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    rollout = RolloutConfig(num_servers=1, max_inflight_per_server=16, deterministic=True)
    log_dir = tmp_path_factory.mktemp("sglang-logs")
    options = EmbeddedFleetOptions(str(initial_model), log_dir, start_timeout_s=400.0)
    with RolloutFleet(rollout, options) as fleet:
        yield fleet.worker_urls[0]
