"""Shared fixtures of the training-plane tests."""

from __future__ import annotations

import pytest

from megatron_dapo.config.schema import ParallelismConfig
from megatron_dapo.mcore.parallel import DistributedEnv, destroy_parallel, initialize_parallel
from pipeline.sglang_server import free_port


@pytest.fixture(scope="module")
def single_rank():
    """A one-process gloo world with Megatron-Core's parallel state (TP = PP = EP = 1)."""
    port = free_port()
    env = DistributedEnv(
        rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=port
    )
    initialize_parallel(ParallelismConfig(backend="gloo"), env, seed=0)
    yield
    destroy_parallel()


@pytest.fixture(autouse=True)
def fresh_moe_loss_tracker():
    """Megatron-Core keeps MoE auxiliary losses in one process-wide tracker, its tensors sized
    by the first model's layer count: a test's MoE forward must not leak into the next test,
    whose model may have more layers (IndexError in `save_to_aux_losses_tracker`)."""
    yield
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()
