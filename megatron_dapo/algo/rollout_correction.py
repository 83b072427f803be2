"""The trainer/rollout mismatch: truncated importance weights and its per-step measurement.

Two policies produce log-probs of the same sampled tokens: the fleet that sampled them
(pi_rollout: SGLang's kernels, precision, MoE routing) and the trainer's policy before the
step's first update (pi_old, recomputed by a forward pass). The clipped ratio uses pi_old;
truncated importance sampling corrects the sampling distribution with a detached weight on each
token's loss (`importance_weights`):

    token:    w_it = min(pi_old(o_it) / pi_rollout(o_it), C)
    sequence: w_i  = min(exp(sum_t log pi_old(o_it) - log pi_rollout(o_it)), C)   for every t
    none:     w = 1 (the paper's objective)

`rollout_mismatch` measures the difference every step (whatever the mode): the k3 estimate of
KL(pi_rollout || pi_old) (tokens were sampled from pi_rollout, x = log pi_old - log pi_rollout),
mean and max |x|, and the fraction of loss tokens whose weight the threshold C truncated. In fp32
with identical weights pi_old equals pi_rollout within ~2e-3 per token.

Token layout as in `policy_loss`: one shape for every token tensor, `loss_mask` nonzero at loss
tokens, int64 `sequence_ids`; log-probs in nats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dapo.algo.aggregation import broadcast_to_tokens, segment_sum
from megatron_dapo.algo.kl import MAX_ABS_LOG_RATIO, k3_estimator

CORRECTION_MODES = ("none", "token", "sequence")


def importance_weights(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    loss_mask: torch.Tensor,
    sequence_ids: torch.Tensor,
    mode: str,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance weights of the loss tokens (see the module docstring).

    Args:
        old_log_probs, rollout_log_probs: log pi_old and log pi_rollout of the sampled tokens.
        loss_mask: nonzero = loss token.
        sequence_ids: int64 sequence of each token (sequence mode sums over it).
        mode: one of `CORRECTION_MODES`.
        threshold: C > 0, the largest weight.

    Returns:
        weights: detached, the token shape; 1 at masked-out positions and in mode `none`.
        truncated: bool, loss tokens whose weight was cut to C.
    """
    if mode not in CORRECTION_MODES:
        raise ValueError(f"unknown rollout correction {mode!r}; valid modes: {CORRECTION_MODES}")
    mask = loss_mask.bool()
    log_weight = torch.where(mask, old_log_probs.detach() - rollout_log_probs.detach(), 0)
    if mode == "none":
        return torch.ones_like(log_weight), torch.zeros_like(mask)
    if mode == "sequence":
        per_sequence = segment_sum(log_weight, sequence_ids, mask)
        log_weight = broadcast_to_tokens(per_sequence, sequence_ids, mask)
    weight = log_weight.clamp(max=MAX_ABS_LOG_RATIO).exp()
    truncated = mask & (weight > threshold)
    return torch.where(mask, weight.clamp(max=threshold), 1.0), truncated


@dataclass(frozen=True)
class RolloutMismatch:
    """The mismatch of one or more micro-batches; 0-dim float64 tensors.

    Reduce over micro-batches with `+` and over ranks by all-reducing `sums()` with SUM and
    `max_abs_diff` with MAX.

    Attributes:
        kl: summed k3 KL(pi_rollout || pi_old) of the loss tokens (nats).
        abs_diff: summed |log pi_old - log pi_rollout| (nats).
        truncated: loss tokens whose importance weight was truncated.
        num_tokens: loss tokens.
        max_abs_diff: the largest |log pi_old - log pi_rollout| (nats); 0 without loss tokens.
    """

    kl: torch.Tensor
    abs_diff: torch.Tensor
    truncated: torch.Tensor
    num_tokens: torch.Tensor
    max_abs_diff: torch.Tensor

    def __add__(self, other: RolloutMismatch) -> RolloutMismatch:
        return RolloutMismatch.from_reduced(
            self.sums() + other.sums(), torch.maximum(self.max_abs_diff, other.max_abs_diff)
        )

    def sums(self) -> torch.Tensor:
        """`[4]` float64 (kl, abs_diff, truncated, num_tokens): all-reduce with SUM."""
        return torch.stack([self.kl, self.abs_diff, self.truncated, self.num_tokens])

    @classmethod
    def from_reduced(cls, sums: torch.Tensor, max_abs_diff: torch.Tensor) -> RolloutMismatch:
        """Inverse of `sums()` plus the MAX-reduced `max_abs_diff`."""
        kl, abs_diff, truncated, num_tokens = sums.to(torch.float64).unbind()
        return cls(kl, abs_diff, truncated, num_tokens, max_abs_diff.to(torch.float64))

    def _per_token(self, total: torch.Tensor) -> float:
        return float(total / self.num_tokens.clamp(min=1))

    def mean_kl(self) -> float:
        """k3 KL(pi_rollout || pi_old) per loss token (nats)."""
        return self._per_token(self.kl)

    def mean_abs_diff(self) -> float:
        """Mean |log pi_old - log pi_rollout| per loss token (nats)."""
        return self._per_token(self.abs_diff)

    def truncated_fraction(self) -> float:
        """Fraction in [0, 1] of loss tokens whose importance weight was truncated."""
        return self._per_token(self.truncated)


def rollout_mismatch(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    loss_mask: torch.Tensor,
    sequence_ids: torch.Tensor,
    mode: str,
    threshold: float,
) -> RolloutMismatch:
    """The mismatch statistics of one micro-batch (arguments as in `importance_weights`)."""
    mask = loss_mask.bool()
    diff = torch.where(mask, old_log_probs.detach() - rollout_log_probs.detach(), 0)
    _, truncated = importance_weights(
        old_log_probs, rollout_log_probs, mask, sequence_ids, mode, threshold
    )

    def total(values: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, values, 0).sum(dtype=torch.float64)

    return RolloutMismatch(
        kl=total(k3_estimator(diff)),
        abs_diff=total(diff.abs()),
        truncated=total(truncated),
        num_tokens=total(torch.ones_like(diff)),
        max_abs_diff=(diff.abs().max() if diff.numel() else diff.new_zeros(())).to(torch.float64),
    )
