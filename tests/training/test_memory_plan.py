"""`megatron_dapo.config.memory_plan` against the memory a real `PolicyTrainer` step uses on CPU.

One rank, a 20M-parameter GQA policy (4 layers x 512, SwiGLU 1536, 8 heads / 2 groups, vocab
8192) in float32 and in bfloat16 (fp32 master params) on one 512-token micro-batch. Measured
after one optimizer step: parameters, DDP's `main_grad` buffers and the optimizer's state (every
tensor of it that is not a model parameter or gradient buffer), bytes of the tensors
themselves. Activations: every tensor autograd saves during the forward of the micro-batch
(saved-tensor hooks around the forward step and the loss, not the backward, where recompute
saves again), counted once per storage and without parameters: exactly what the forward keeps
alive for backward. Each is compared with the plan of the same config within 20%, for no
recompute, selective and full recompute.
"""

from __future__ import annotations

import pytest
import torch
from training_helpers import random_train_batch

from megatron_dapo.config.memory_plan import (
    DTYPE_BYTES,
    memory_plan,
    recompute_activation_bytes,
)
from megatron_dapo.config.schema import RunConfig
from megatron_dapo.mcore.policy_step import PolicyTrainer

TOKENS = 512
VOCAB = 8192
LAYERS = 4
TOLERANCE = 0.20
GRANULARITIES = ("none", "selective", "full")
DTYPES = ("float32", "bfloat16")


def _config(granularity: str, dtype: str) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {
                "num_layers": LAYERS,
                "hidden_size": 512,
                "ffn_hidden_size": 1536,
                "num_attention_heads": 8,
                "num_query_groups": 2,
                "vocab_size": VOCAB,
                "max_position_embeddings": 1024,
                "params_dtype": dtype,
            },
            "parallelism": {"backend": "gloo"},
            "rollout": {"n_samples_per_prompt": 4, "max_response_length": TOKENS // 2},
            "data": {
                "source": "reasoning_gym",
                "task": "basic_arithmetic",
                "max_prompt_length": TOKENS // 2,
            },
            "reward": {"overlong": {"cache_length": 4}},
            "algorithm": {"old_log_probs": "rollout"},
            "training": {
                "steps": 1,
                "prompts_per_step": 1,
                "mini_batch_size": 4,
                "micro_batch_max_tokens": TOKENS,
                "log_prob_chunk_size": 128,
                "recompute": {"granularity": granularity, "num_layers": 2},
            },
        }
    )


class _SavedTensors:
    """Bytes autograd saves in the forward of each micro-batch, split into the model's forward
    and the loss (logits), one count per storage, parameters excluded."""

    def __init__(self, trainer: PolicyTrainer) -> None:
        self._excluded = {
            p.untyped_storage().data_ptr() for chunk in trainer.chunks for p in chunk.parameters()
        }
        self._seen: set[int] = set()
        self.bytes = {"model": 0, "loss": 0}
        forward_step = trainer._forward_step

        def measured_forward_step(*args, **kwargs):
            with self._phase("model"):
                output, loss = forward_step(*args, **kwargs)

            def measured_loss(*loss_args):
                with self._phase("loss"):
                    return loss(*loss_args)

            return output, measured_loss

        trainer._forward_step = measured_forward_step

    def _phase(self, phase: str) -> torch.autograd.graph.saved_tensors_hooks:
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer not in self._excluded and pointer not in self._seen:
                self._seen.add(pointer)
                self.bytes[phase] += storage.nbytes()
            return tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


def _tensor_bytes(tensors) -> int:
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
    return sum(unique.values())


def _static_bytes(trainer: PolicyTrainer) -> dict[str, int]:
    """Parameters, gradient buffers and optimizer state of this rank, from the tensors."""
    params = [p for chunk in trainer.chunks for p in chunk.parameters()]
    buffers = [b for chunk in trainer.chunks for b in chunk.buffers + chunk.expert_parallel_buffers]
    model_storage = {p.untyped_storage().data_ptr() for p in params} | {
        b.grad_data.untyped_storage().data_ptr() for b in buffers
    }
    state = []
    for optimizer in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        inner = optimizer.optimizer
        state += [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t)]
        state += [p for group in inner.param_groups for p in group["params"]]
    return {
        "parameters": _tensor_bytes(params),
        "gradients": _tensor_bytes([b.grad_data for b in buffers]),
        "optimizer": _tensor_bytes(
            [t for t in state if t.untyped_storage().data_ptr() not in model_storage]
        ),
    }


def _measure(granularity: str, dtype: str) -> tuple[RunConfig, dict[str, int]]:
    config = _config(granularity, dtype)
    trainer = PolicyTrainer(config)
    saved = _SavedTensors(trainer)
    trainer.step(random_train_batch(0, lengths=(TOKENS // 4,) * 4, vocab=VOCAB))
    return config, {**_static_bytes(trainer), **saved.bytes}


def _close(measured: float, estimated: float) -> bool:
    return abs(estimated - measured) <= TOLERANCE * measured


@pytest.fixture(scope="module")
def measured(single_rank) -> dict[tuple[str, str], tuple[RunConfig, dict[str, int]]]:
    return {(g, dtype): _measure(g, dtype) for g in GRANULARITIES for dtype in DTYPES}


@pytest.mark.parametrize("dtype", DTYPES)
def test_static_memory_matches_the_plan(measured, dtype: str) -> None:
    config, bytes_ = measured["none", dtype]
    (stage,) = memory_plan(config).stages
    for name in ("parameters", "gradients", "optimizer"):
        estimated = getattr(stage, name)
        assert _close(bytes_[name], estimated), (name, bytes_[name], estimated)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_saved_activations_match_the_plan(measured, granularity: str, dtype: str) -> None:
    """What the forward keeps for backward = the planned activations minus the working set that
    backward's recompute adds (no recompute: none); the logits the loss keeps = half the logits
    row (the other half is their gradient, which exists only in backward)."""
    config, bytes_ = measured[granularity, dtype]
    (stage,) = memory_plan(config).stages
    transient = recompute_activation_bytes(config, LAYERS, TOKENS)[1]
    estimated = stage.activations - transient
    assert _close(bytes_["model"], estimated), (bytes_["model"], estimated)
    held_logits = TOKENS * VOCAB * DTYPE_BYTES[dtype]
    assert _close(bytes_["loss"], held_logits), (bytes_["loss"], held_logits)
    assert stage.logits >= 2 * held_logits


@pytest.mark.parametrize("dtype", DTYPES)
def test_recompute_saves_what_the_plan_says(measured, dtype: str) -> None:
    """The measured ratio of recompute to no-recompute activations is the planned one."""
    baseline_config, baseline = measured["none", dtype]
    planned_baseline = memory_plan(baseline_config).stages[0].activations_no_recompute
    for granularity in ("selective", "full"):
        config, bytes_ = measured[granularity, dtype]
        stage = memory_plan(config).stages[0]
        planned = (
            stage.activations - recompute_activation_bytes(config, LAYERS, TOKENS)[1]
        ) / planned_baseline
        ratio = bytes_["model"] / baseline["model"]
        assert _close(ratio, planned), (granularity, ratio, planned)
