"""Model construction choices and the distributed environment, without building a model."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from training_helpers import tiny_run_config

from megatron_dapo.ckpt.dist_checkpoint import check_checkpointable
from megatron_dapo.mcore.model import build_model_chunks, layer_spec, transformer_config
from megatron_dapo.mcore.parallel import DistributedEnv, resolve_backend


@pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is not None,
    reason="Transformer Engine is installed here",
)
def test_transformer_engine_without_the_package_is_a_clear_error() -> None:
    model = tiny_run_config().model.model_copy(update={"transformer_impl": "transformer_engine"})
    with pytest.raises(RuntimeError, match="transformer_engine is not installed"):
        layer_spec(model)


def test_local_spec_uses_rmsnorm_and_moe_layers_when_configured() -> None:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    dense = layer_spec(tiny_run_config().model)
    moe = layer_spec(tiny_run_config(moe=True).model)
    assert dense.submodules.mlp.module is not MoELayer
    assert moe.submodules.mlp.module is MoELayer


def test_transformer_config_carries_the_architecture() -> None:
    config = tiny_run_config(moe=True, world_size=2, expert=2)
    tc = transformer_config(config.model, config.parallelism)
    assert tc.normalization == "RMSNorm"
    assert tc.gated_linear_unit and not tc.add_bias_linear
    assert tc.add_qkv_bias and tc.qk_layernorm
    assert tc.num_query_groups == 2
    assert tc.num_moe_experts == 4 and tc.moe_router_topk == 2
    assert tc.moe_shared_expert_intermediate_size == 32
    assert tc.hidden_dropout == 0.0 and tc.attention_dropout == 0.0
    assert not tc.calculate_per_token_loss  # policy_step's loss scaling relies on it


def test_grouped_gemm_on_cpu_is_refused() -> None:
    config = tiny_run_config(moe=True)
    moe = config.model.moe.model_copy(update={"grouped_gemm": True})
    model = config.model.model_copy(update={"moe": moe})
    with pytest.raises(ValueError, match="grouped_gemm needs CUDA"):
        transformer_config(model, config.parallelism)


def test_vocabulary_must_split_over_tensor_parallel_ranks() -> None:
    config = tiny_run_config(world_size=2, tensor=2)
    model = config.model.model_copy(update={"vocab_size": 129})
    with pytest.raises(ValueError, match="multiple of parallelism.tensor"):
        build_model_chunks(model, config.parallelism)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {
                "RANK": "3",
                "WORLD_SIZE": "4",
                "LOCAL_RANK": "1",
                "MASTER_ADDR": "10.0.0.2",
                "MASTER_PORT": "1234",
                "SLURM_PROCID": "9",
            },
            DistributedEnv(3, 4, 1, "10.0.0.2", 1234),
        ),
        (
            {
                "SLURM_PROCID": "5",
                "SLURM_NTASKS": "8",
                "SLURM_LOCALID": "1",
                "MASTER_ADDR": "node1",
            },
            DistributedEnv(5, 8, 1, "node1", 29500),
        ),
        ({}, DistributedEnv(0, 1, 0, "127.0.0.1", 29500)),
    ],
)
def test_environment_from_torchrun_slurm_or_nothing(environ: dict, expected) -> None:
    assert DistributedEnv.from_environ(environ) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks NCCL with CUDA")
def test_auto_backend_is_gloo_without_cuda() -> None:
    parallelism = tiny_run_config().parallelism
    assert resolve_backend(parallelism.model_copy(update={"backend": "auto"})) == "gloo"
    assert resolve_backend(parallelism.model_copy(update={"backend": "nccl"})) == "nccl"


def test_tied_embeddings_with_virtual_pipeline_are_not_checkpointed() -> None:
    check_checkpointable(tiny_run_config(world_size=2, pipeline=2))  # tied, no VPP: fine
    check_checkpointable(tiny_run_config(moe=True, world_size=2, pipeline=2, virtual_pipeline=2))
    with pytest.raises(NotImplementedError, match="tie_embeddings"):
        check_checkpointable(tiny_run_config(world_size=2, pipeline=2, virtual_pipeline=2))
