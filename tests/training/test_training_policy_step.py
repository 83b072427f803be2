"""One policy step on one rank, checked against an independent unpacked computation."""

from __future__ import annotations

import contextlib

import pytest
import torch
from training_helpers import random_train_batch, tiny_run_config, unpacked_log_probs

from megatron_dapo.algo.aggregation import LossNormalizers, get_loss_aggregation
from megatron_dapo.algo.policy_loss import get_policy_loss
from megatron_dapo.config.schema import RolloutCorrectionConfig
from megatron_dapo.mcore.parallel import DistributedEnv, destroy_parallel, initialize_parallel
from megatron_dapo.mcore.policy_step import PolicyTrainer
from pipeline.sglang_server import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    port = free_port()
    config = tiny_run_config()
    initialize_parallel(config.parallelism, DistributedEnv(0, 1, 0, "127.0.0.1", port), seed=7)
    yield
    destroy_parallel()


def _with(config, **sections):
    return config.model_copy(
        update={
            name: getattr(config, name).model_copy(update=values)
            for name, values in sections.items()
        }
    )


def _unpacked_loss(trainer: PolicyTrainer, batch, normalizers: LossNormalizers):
    """The global loss of the unpacked log-probs; pi_old is them (detached) when recomputed."""
    algorithm = trainer.config.algorithm
    log_probs, entropy, keep, ids = unpacked_log_probs(trainer, batch)
    mask = batch.loss_mask[keep]
    recompute = algorithm.old_log_probs == "recompute"
    old_log_probs = log_probs.detach() if recompute else batch.rollout_log_probs[keep]
    policy = get_policy_loss(algorithm.policy_loss)(
        log_probs,
        old_log_probs,
        batch.advantages[ids],
        mask,
        ids,
        algorithm.objective_at(0).loss,
    )
    loss = get_loss_aggregation(algorithm.loss_aggregation)(
        policy.token_loss, mask, ids, normalizers
    )
    mean_entropy = (entropy * mask).sum() / mask.sum()
    return loss, mean_entropy.item()


@pytest.mark.parametrize(
    ("policy_loss", "aggregation", "temperature", "old_log_probs"),
    [
        ("dapo", "token-mean", 1.0, "rollout"),
        ("grpo", "seq-mean-token-mean", 0.7, "rollout"),
        ("dapo", "token-mean", 0.7, "recompute"),
    ],
)
def test_packed_micro_batched_gradient_equals_unpacked_full_batch_gradient(
    policy_loss: str, aggregation: str, temperature: float, old_log_probs: str
) -> None:
    config = _with(
        tiny_run_config(max_tokens=40),
        algorithm={
            "policy_loss": policy_loss,
            "loss_aggregation": aggregation,
            "old_log_probs": old_log_probs,
        },
        optimizer={"clip_grad": 0.0},
        rollout={"temperature": temperature},
    )
    trainer = PolicyTrainer(config)
    batch = random_train_batch(5)
    (chunk,) = trainer.chunks
    params = [p for p in chunk.module.parameters()]
    loss_tokens_per_sample = torch.zeros(batch.num_samples, dtype=torch.int64).index_add(
        0, batch.sample_ids(), batch.loss_mask.long()
    )
    normalizers = LossNormalizers(
        int(loss_tokens_per_sample.sum()), int((loss_tokens_per_sample > 0).sum())
    )
    chunk.zero_grad_buffer()
    expected_loss, expected_entropy = _unpacked_loss(trainer, batch, normalizers)
    expected_loss.backward()
    expected_grads = [p.main_grad.clone() for p in params]

    metrics = trainer.step(batch)

    assert metrics.num_microbatches > 1
    assert metrics.num_loss_tokens == normalizers.num_tokens
    assert metrics.loss == pytest.approx(expected_loss.item(), abs=1e-6)
    assert metrics.entropy == pytest.approx(expected_entropy, abs=1e-5)
    for param, expected in zip(params, expected_grads, strict=True):
        torch.testing.assert_close(param.main_grad, expected, atol=1e-6, rtol=1e-4)


def test_lr_warms_up_linearly_from_zero_over_mini_batches() -> None:
    config = tiny_run_config()  # lr 1e-2, 2 warm-up steps, mini-batches of 8 samples
    trainer = PolicyTrainer(config)
    batch = random_train_batch(0, (9, 7, 12, 5, 6, 11, 8, 10) * 3)
    metrics = trainer.train(batch).optimizer_steps
    assert [m.lr for m in metrics] == pytest.approx([0.5e-2, 1e-2, 1e-2])
    loss_tokens = [int(batch.select(torch.arange(i, i + 8)).loss_mask.sum()) for i in (0, 8, 16)]
    assert [m.num_loss_tokens for m in metrics] == loss_tokens


@pytest.mark.parametrize("mode", ["none", "token", "sequence"])
def test_recomputed_pi_old_and_the_rollout_mismatch_match_an_unpacked_forward(mode: str) -> None:
    config = _with(
        tiny_run_config(max_tokens=40),
        algorithm={"rollout_correction": RolloutCorrectionConfig(mode=mode, threshold=1.5)},
    )
    trainer = PolicyTrainer(config)
    batch = random_train_batch(4)
    log_probs, _, keep, ids = unpacked_log_probs(trainer, batch)
    mask = batch.loss_mask[keep]
    diff = (log_probs.detach() - batch.rollout_log_probs[keep])[mask].double()
    weights = diff.exp()  # pi_old / pi_rollout per token, or per sequence in sequence mode
    if mode == "sequence":
        per_sequence = torch.zeros(batch.num_samples, dtype=torch.float64).index_add(
            0, ids[mask], diff
        )
        weights = per_sequence.exp()[ids[mask]]

    result = trainer.train(batch)

    (step,) = result.optimizer_steps
    mismatch = result.mismatch
    # pi_old is the policy itself before the first update: ratio 1, nothing clipped
    assert (step.clip_fraction_low, step.clip_fraction_high, step.approx_kl) == (0.0, 0.0, 0.0)
    k3 = diff.exp() - 1 - diff  # KL(pi_rollout || pi_old), tokens sampled from pi_rollout
    assert mismatch.mean_kl() == pytest.approx(k3.mean().item(), rel=1e-4)
    assert mismatch.mean_abs_diff() == pytest.approx(diff.abs().mean().item(), rel=1e-5)
    assert float(mismatch.max_abs_diff) == pytest.approx(diff.abs().max().item(), rel=1e-5)
    truncated = (weights > 1.5).double().mean().item() if mode != "none" else 0.0
    assert mismatch.truncated_fraction() == pytest.approx(truncated)
    assert int(mismatch.num_tokens) == int(mask.sum()) and result.old_log_prob_seconds > 0
    rollout = PolicyTrainer(_with(tiny_run_config(), algorithm={"old_log_probs": "rollout"}))
    assert rollout.train(batch).mismatch is None


def test_moe_step_reports_aux_loss_and_expert_load() -> None:
    trainer = PolicyTrainer(tiny_run_config(moe=True, max_tokens=32))
    batch = random_train_batch(1, (20, 12, 20, 12, 18, 14, 18, 14))
    metrics = trainer.step(batch)
    moe = trainer.config.model.moe
    assert len(metrics.expert_load) == trainer.config.model.num_layers
    for layer in metrics.expert_load:
        assert len(layer) == moe.num_experts
        assert sum(layer) == moe.router_topk * batch.num_tokens  # no padding in these rows
    # Switch load-balancing loss: E * sum_e f_e P_e, 1 for a perfectly uniform router
    assert 0.9 < metrics.moe_aux_loss < 2.0


def test_bf16_policy_with_fp32_main_params_lowers_the_loss_on_a_fixed_batch() -> None:
    # a fixed pi_old (the rollout's): with pi_old recomputed every step the surrogate's value
    # is -mean(A) before each update, whatever the policy
    trainer = PolicyTrainer(
        _with(
            tiny_run_config(),
            model={"params_dtype": "bfloat16"},
            algorithm={"old_log_probs": "rollout"},
        )
    )
    assert next(trainer.chunks[0].parameters()).dtype == torch.bfloat16
    batch = random_train_batch(0)
    losses = [trainer.step(batch).loss for _ in range(3)]
    assert losses[0] > losses[1] > losses[2]


@contextlib.contextmanager
def _overflowing_forward(trainer: PolicyTrainer):
    """Within the block, the first transformer layer's output holds an inf (a transient
    overflow, as in low precision): the loss and the gradients become non-finite."""
    layer = trainer.chunks[0].module.decoder.layers[0]

    def overflow(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden.view(-1)[0] = float("inf")
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = layer.register_forward_hook(overflow)
    try:
        yield
    finally:
        handle.remove()


def test_nonfinite_loss_skips_the_optimizer_step_and_leaves_parameters_unchanged() -> None:
    trainer = PolicyTrainer(tiny_run_config())
    batch = random_train_batch(2, (9, 7, 12, 5, 6, 11, 8, 10))
    params = list(trainer.chunks[0].parameters())
    before = [p.detach().clone() for p in params]
    with _overflowing_forward(trainer):
        (skipped,) = trainer.train(batch).optimizer_steps
    assert not skipped.update_successful
    assert all(torch.equal(b, p) for b, p in zip(before, params, strict=True))
    (taken,) = trainer.train(batch).optimizer_steps  # the next finite step trains normally
    assert taken.update_successful and torch.isfinite(torch.tensor(taken.grad_norm))
    assert any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))


def test_nonfinite_loss_stops_the_run_when_configured() -> None:
    trainer = PolicyTrainer(_with(tiny_run_config(), training={"on_nonfinite": "stop"}))
    batch = random_train_batch(3, (9, 7, 12, 5, 6, 11, 8, 10))
    with (
        _overflowing_forward(trainer),
        pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\).*on_nonfinite=stop"),
    ):
        trainer.train(batch)
