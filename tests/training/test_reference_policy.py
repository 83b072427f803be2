"""The KL penalty to a frozen reference policy on one rank, against an independent computation.

The run starts from a tiny HF checkpoint (`hf_worker.make_hf_checkpoint`); the batch's rollout
log-probs are transformers' log-probs of that checkpoint (`pi_old_worker.fleet_batch`), which is
also what the reference policy must compute. Step 1: the policy is the reference, the KL is 0.
Step 2, after one optimizer step: the trainer's reported KL, loss and gradient equal the
estimator applied by hand to transformers' reference log-probs and the current policy's
full-vocabulary log-probs (`unpacked_log_probs`), aggregated by hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hf_worker import make_hf_checkpoint
from pi_old_worker import fleet_batch
from training_helpers import random_train_batch, tiny_run_config, unpacked_log_probs

from megatron_dapo.algo.aggregation import count_loss_normalizers, get_loss_aggregation
from megatron_dapo.algo.kl import get_kl_estimator
from megatron_dapo.algo.policy_loss import get_policy_loss
from megatron_dapo.config.memory_plan import memory_plan
from megatron_dapo.config.schema import ModelConfig, RunConfig
from megatron_dapo.mcore.policy_step import PolicyTrainer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_rank")]

KL_COEF = 0.5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("reference") / "qwen2"
    make_hf_checkpoint("qwen2", directory, num_hidden_layers=4)
    return directory


def _config(checkpoint: Path, **algorithm: object) -> RunConfig:
    base = tiny_run_config()
    return base.model_copy(
        update={
            "model": ModelConfig(hf_checkpoint=str(checkpoint)),  # the architecture: config.json
            "algorithm": base.algorithm.model_copy(update=algorithm),
            "optimizer": base.optimizer.model_copy(update={"clip_grad": 0.0}),
        }
    )


def _parameter_bytes(chunks: list[torch.nn.Module]) -> int:
    return sum(p.numel() * p.element_size() for chunk in chunks for p in chunk.parameters())


@pytest.mark.parametrize(
    ("estimator", "aggregation"),
    [("k1", "token-mean"), ("k3", "seq-mean-token-mean"), ("low_var_kl", "token-mean")],
)
def test_reported_kl_loss_and_gradient_equal_a_hand_computation_against_transformers(
    checkpoint: Path, estimator: str, aggregation: str
) -> None:
    config = _config(
        checkpoint, kl_coef=KL_COEF, kl_estimator=estimator, loss_aggregation=aggregation
    )
    trainer = PolicyTrainer(config)
    batch = fleet_batch(checkpoint)  # rollout log-probs: transformers' under the checkpoint
    (first,) = trainer.train(batch).optimizer_steps
    assert first.reference_kl == 0.0  # the policy is the reference, bitwise

    # step 2: the policy moved; the reference did not
    (chunk,) = trainer.chunks
    params = list(trainer.models[0].parameters())
    chunk.zero_grad_buffer()
    log_probs, _, keep, ids = unpacked_log_probs(trainer, batch)
    mask = batch.loss_mask[keep]
    ref_log_probs = batch.rollout_log_probs[keep]
    normalizers = count_loss_normalizers([mask], [ids])
    aggregate = get_loss_aggregation(aggregation)
    policy = get_policy_loss("dapo")(  # pi_old is the current policy: recomputed
        log_probs,
        log_probs.detach(),
        batch.advantages[ids],
        mask,
        ids,
        config.algorithm.objective_at(1).loss,
    )
    token_kl = get_kl_estimator(estimator)(log_probs, ref_log_probs)
    kl = aggregate(token_kl, mask, ids, normalizers)
    expected_loss = aggregate(policy.token_loss, mask, ids, normalizers) + KL_COEF * kl
    expected_loss.backward()
    expected_grads = [p.main_grad.clone() for p in params]
    expected_kl = token_kl[mask].double().mean().item()

    (second,) = trainer.train(batch).optimizer_steps

    print(f"{estimator}: reference KL {second.reference_kl:.6e}, by hand {expected_kl:.6e}")
    assert abs(expected_kl) > 1e-4  # the policy did move away from the reference
    assert second.reference_kl == pytest.approx(expected_kl, rel=1e-3, abs=1e-7)
    assert second.loss == pytest.approx(expected_loss.item(), rel=1e-4, abs=1e-6)
    for param, expected in zip(params, expected_grads, strict=True):
        torch.testing.assert_close(param.main_grad, expected, atol=1e-6, rtol=1e-4)
    frozen = [p for chunk in trainer.reference for p in chunk.parameters()]
    assert not any(p.requires_grad or p.grad is not None for p in frozen)
    assert _parameter_bytes(trainer.reference) == _parameter_bytes(trainer.models)
    (stage,) = memory_plan(config).stages
    assert math.isclose(stage.reference, stage.parameters) and stage.reference > 0


def test_without_kl_coef_no_reference_is_built_and_the_step_is_unchanged(
    checkpoint: Path,
) -> None:
    """DAPO (kl_coef 0): no reference model, no reference log-probs, nothing in the plan; and a
    run with a k3 penalty takes bitwise the same first step (its KL and KL gradient are exactly
    0 while the policy is the reference)."""
    batch = random_train_batch(3, vocab=96)
    steps = []
    for kl_coef in (0.0, KL_COEF):
        trainer = PolicyTrainer(_config(checkpoint, kl_coef=kl_coef, kl_estimator="k3"))
        result = trainer.train(batch)
        steps.append((result, [p.detach().clone() for p in trainer.models[0].parameters()]))
        if kl_coef == 0.0:
            assert trainer.reference is None
            assert "ref_log_probs" not in trainer._log_prob_passes
    (without, params_without), (with_kl, params_with) = steps
    assert without.optimizer_steps[0].reference_kl is None
    assert with_kl.optimizer_steps[0].reference_kl == 0.0
    assert without.optimizer_steps[0].loss == with_kl.optimizer_steps[0].loss
    assert all(torch.equal(a, b) for a, b in zip(params_without, params_with, strict=True))
    (stage,) = memory_plan(_config(checkpoint)).stages
    assert stage.reference == 0.0
