"""The policy objective of one micro-batch: a pure function of tensors.

    share, stats = policy_objective(log_probs, entropy, old_log_probs, advantages,
                                    loss_mask, sequence_ids, normalizers, config)

`share` is the micro-batch's exact share of the mini-batch loss (to minimise): the per-token
policy loss named by `config.policy_loss`, times the detached truncated importance weight of
the trainer/rollout mismatch when `config.rollout_correction` is not `none`
(`rollout_correction`), minus `entropy_coef` times the token entropy, reduced by
`config.loss_aggregation` with the GLOBAL normalisers of the optimizer step
(`aggregation.LossNormalizers`); with `kl_coef > 0` plus `kl_coef` times the per-token KL to the
reference policy (`kl.KL_ESTIMATORS[config.kl_estimator]`) reduced by the same aggregation and
normalisers (not importance-weighted), as verl adds `kl_loss_coef * agg_loss(kld)`. Summing the
shares of every micro-batch on every data-parallel rank gives the mini-batch loss and its
gradient however the batch was split. With `kl_coef == 0` the KL is never computed.

`stats` are the objective's statistics as sums over the micro-batch's loss tokens
(`ObjectiveStats`): micro-batches are combined with `+`, ranks by all-reducing
`as_tensor()` with SUM; the ratios (`clip_fraction_low()`, `mean_entropy()`, ...) divide only
at the end.

Token layout as in `policy_loss`: every token tensor has one shape (packed `[N]` or padded
`[B, S]`); log-probs and entropies in nats.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from megatron_dapo.algo.aggregation import LossNormalizers, get_loss_aggregation
from megatron_dapo.algo.kl import get_kl_estimator, k3_estimator
from megatron_dapo.algo.policy_loss import PolicyLossConfig, get_policy_loss
from megatron_dapo.algo.rollout_correction import CORRECTION_MODES, importance_weights


@dataclass(frozen=True)
class ObjectiveConfig:
    """The objective of one optimizer step (built once per step from the run config).

    Attributes:
        policy_loss: registered policy loss name (`policy_loss.POLICY_LOSSES`).
        loss_aggregation: registered aggregation name (`aggregation.LOSS_AGGREGATIONS`).
        loss: the loss hyper-parameters at this step (eps_high already scheduled).
        entropy_coef: weight of the entropy bonus (>= 0; 0 = none, DAPO's choice).
        rollout_correction: truncated importance sampling mode (`CORRECTION_MODES`).
        correction_threshold: its truncation C (> 0).
        kl_coef: weight of the KL penalty to the reference policy (>= 0; 0 = none, DAPO's
            choice).
        kl_estimator: registered per-token KL estimator (`kl.KL_ESTIMATORS`).
    """

    policy_loss: str
    loss_aggregation: str
    loss: PolicyLossConfig
    entropy_coef: float = 0.0
    rollout_correction: str = "none"
    correction_threshold: float = 2.0
    kl_coef: float = 0.0
    kl_estimator: str = "low_var_kl"

    def __post_init__(self) -> None:
        get_policy_loss(self.policy_loss)  # ValueError listing the valid names
        get_loss_aggregation(self.loss_aggregation)
        get_kl_estimator(self.kl_estimator)
        for name in ("entropy_coef", "kl_coef"):
            value = getattr(self, name)
            if not value >= 0.0:
                raise ValueError(f"ObjectiveConfig.{name} must be >= 0, got {value}")
        if self.rollout_correction not in CORRECTION_MODES:
            raise ValueError(
                f"ObjectiveConfig.rollout_correction must be one of {CORRECTION_MODES}, got "
                f"{self.rollout_correction!r}"
            )


@dataclass(frozen=True)
class ObjectiveStats:
    """Statistics of the objective as sums over loss tokens (0-dim float64 tensors, detached).

    Reduce over micro-batches with `+` and over ranks by all-reducing `as_tensor()` with SUM.

    Attributes:
        loss: sum of the micro-batches' loss shares (the global loss, once all are summed).
        num_tokens: loss tokens.
        clipped_low: loss tokens with A < 0 clipped at 1 - eps_low.
        clipped_high: loss tokens with A > 0 clipped at 1 + eps_high.
        dual_clipped: loss tokens with A < 0 capped by the dual clip.
        entropy: summed policy entropy of the loss tokens (nats).
        approx_kl: summed k3 estimate of KL(pi_old || pi_theta) of the loss tokens (nats).
        reference_kl: summed estimate (`ObjectiveConfig.kl_estimator`) of KL(pi_theta || pi_ref)
            of the loss tokens (nats); 0 without a KL penalty (`kl_coef == 0`).
    """

    loss: torch.Tensor
    num_tokens: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor
    dual_clipped: torch.Tensor
    entropy: torch.Tensor
    approx_kl: torch.Tensor
    reference_kl: torch.Tensor

    def _values(self) -> list[torch.Tensor]:
        return [getattr(self, field.name) for field in fields(self)]

    def __add__(self, other: ObjectiveStats) -> ObjectiveStats:
        pairs = zip(self._values(), other._values(), strict=True)
        return ObjectiveStats(*(a + b for a, b in pairs))

    def as_tensor(self) -> torch.Tensor:
        """`[len(fields)]` float64, in field order: the one tensor to all-reduce with SUM."""
        return torch.stack([value.to(torch.float64) for value in self._values()])

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> ObjectiveStats:
        """Inverse of `as_tensor`."""
        if values.shape != (len(fields(cls)),):
            raise ValueError(
                f"expected {len(fields(cls))} statistics, got shape {tuple(values.shape)}"
            )
        return cls(*values.to(torch.float64).unbind())

    def _per_token(self, total: torch.Tensor) -> float:
        return float(total / self.num_tokens.clamp(min=1))

    def clip_fraction_low(self) -> float:
        """Fraction in [0, 1] of loss tokens clipped at 1 - eps_low."""
        return self._per_token(self.clipped_low)

    def clip_fraction_high(self) -> float:
        """Fraction in [0, 1] of loss tokens clipped at 1 + eps_high."""
        return self._per_token(self.clipped_high)

    def dual_clip_fraction(self) -> float:
        """Fraction in [0, 1] of loss tokens capped by the dual clip."""
        return self._per_token(self.dual_clipped)

    def mean_entropy(self) -> float:
        """Mean policy entropy per loss token (nats); 0 without loss tokens."""
        return self._per_token(self.entropy)

    def mean_approx_kl(self) -> float:
        """Mean k3 estimate of KL(pi_old || pi_theta) per loss token (nats)."""
        return self._per_token(self.approx_kl)

    def mean_reference_kl(self) -> float:
        """Mean estimate of KL(pi_theta || pi_ref) per loss token (nats)."""
        return self._per_token(self.reference_kl)


def policy_objective(
    log_probs: torch.Tensor,
    entropy: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    sequence_ids: torch.Tensor,
    normalizers: LossNormalizers,
    config: ObjectiveConfig,
    rollout_log_probs: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ObjectiveStats]:
    """One micro-batch's share of the global objective, and its statistics.

    Args:
        log_probs: log pi_theta of the sampled tokens (nats), differentiable.
        entropy: policy entropy per token (nats); differentiable if `entropy_coef > 0`.
        old_log_probs: log pi_old of the same tokens (nats).
        advantages: each token's sequence advantage.
        loss_mask: nonzero = loss token.
        sequence_ids: int64 index of each token's sequence within the micro-batch.
        normalizers: the optimizer step's global loss normalisers.
        config: the objective of this optimizer step.
        rollout_log_probs: log pi_rollout of the same tokens (nats); needed unless
            `config.rollout_correction` is `none`.
        ref_log_probs: log pi_ref of the same tokens (nats), the frozen reference policy's;
            needed if `config.kl_coef > 0`, ignored otherwise.

    Returns:
        share: 0-dim loss share (advantage units, plus `kl_coef` x nats), differentiable
            w.r.t. `log_probs`.
        stats: the micro-batch's `ObjectiveStats`.
    """
    policy = get_policy_loss(config.policy_loss)(
        log_probs, old_log_probs, advantages, loss_mask, sequence_ids, config.loss
    )
    mask = loss_mask.bool()
    token_loss = policy.token_loss
    if config.rollout_correction != "none":
        if rollout_log_probs is None:
            raise ValueError(
                f"rollout_correction={config.rollout_correction!r} needs rollout_log_probs"
            )
        weights, _ = importance_weights(
            old_log_probs,
            rollout_log_probs,
            mask,
            sequence_ids,
            config.rollout_correction,
            config.correction_threshold,
        )
        token_loss = token_loss * weights
    if config.entropy_coef > 0:
        token_loss = token_loss - config.entropy_coef * torch.where(mask, entropy, 0)
    aggregate = get_loss_aggregation(config.loss_aggregation)
    share = aggregate(token_loss, mask, sequence_ids, normalizers)

    def masked_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, values.detach(), 0).sum(dtype=torch.float64)

    reference_kl = log_probs.new_zeros((), dtype=torch.float64)
    if config.kl_coef > 0:
        if ref_log_probs is None:
            raise ValueError(f"kl_coef={config.kl_coef} needs ref_log_probs")
        token_kl = get_kl_estimator(config.kl_estimator)(
            torch.where(mask, log_probs, 0), torch.where(mask, ref_log_probs, 0)
        )
        share = share + config.kl_coef * aggregate(token_kl, mask, sequence_ids, normalizers)
        reference_kl = masked_sum(token_kl)

    stats = ObjectiveStats(
        loss=share.detach().to(torch.float64),
        num_tokens=masked_sum(torch.ones_like(log_probs)),
        clipped_low=masked_sum(policy.clipped_low),
        clipped_high=masked_sum(policy.clipped_high),
        dual_clipped=masked_sum(policy.dual_clipped),
        entropy=masked_sum(entropy),
        approx_kl=masked_sum(k3_estimator(policy.log_ratio)),
        reference_kl=reference_kl,
    )
    return share, stats
