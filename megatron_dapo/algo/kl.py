"""Per-token KL estimators (Schulman, "Approximating KL Divergence", 2020), in nats.

For samples x ~ q and x = log(p(x) / q(x)):
    k1(x) = -x                     unbiased, high variance, can be negative
    k3(x) = exp(x) - 1 - x         unbiased, low variance, always >= 0
both estimate KL(q || p).

Two uses in training:
- approx KL to pi_old (a metric): tokens were sampled from pi_old, x = log pi_theta - log pi_old
  (the policy loss's `log_ratio`), estimating KL(pi_old || pi_theta).
- the optional GRPO penalty towards a frozen reference policy (a loss term): tokens are treated as
  samples of pi_theta, x = log pi_ref - log pi_theta, estimating KL(pi_theta || pi_ref) with k3.

Log-ratios are clamped to +-MAX_ABS_LOG_RATIO before exponentiating so that fp32 cannot overflow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_dapo.algo.stats import MaskedSum, masked_sum

MAX_ABS_LOG_RATIO = 20.0
"""Bound on |log ratio| before exp(); exp(20) ~ 4.9e8 is far outside any clip range."""


def k1_estimator(log_ratio: torch.Tensor) -> torch.Tensor:
    """-x per token (any shape, nats)."""
    return -log_ratio


def k3_estimator(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp(x) - 1 - x per token (any shape, nats), x clamped to +-MAX_ABS_LOG_RATIO."""
    clamped = log_ratio.clamp(-MAX_ABS_LOG_RATIO, MAX_ABS_LOG_RATIO)
    return torch.expm1(clamped) - clamped


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": k1_estimator,
    "k3": k3_estimator,
}


def approx_kl_to_old(
    log_ratio: torch.Tensor, loss_mask: torch.Tensor, estimator: str = "k3"
) -> MaskedSum:
    """Approximate KL(pi_old || pi_theta) over the loss tokens, as a reducible sum and count.

    Args:
        log_ratio: any token shape, log pi_theta - log pi_old (e.g. `PolicyLossOutput.log_ratio`).
        loss_mask: same shape, nonzero = loss token.
        estimator: "k1" or "k3".

    Returns:
        `MaskedSum` in nats; `.mean()` is the per-token KL.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; valid names: {sorted(KL_ESTIMATORS)}"
        )
    mask = loss_mask.bool()
    safe_log_ratio = torch.where(mask, log_ratio, 0)
    return masked_sum(KL_ESTIMATORS[estimator](safe_log_ratio), mask)


def reference_kl_penalty(
    log_probs: torch.Tensor, ref_log_probs: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """k3 estimate of KL(pi_theta || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1.

    Differentiable w.r.t. `log_probs`; add `kl_coef * penalty` to the per-token policy loss before
    aggregation.

    Args:
        log_probs: any token shape, log pi_theta of the sampled tokens.
        ref_log_probs: same shape, log pi_ref of the same tokens.
        loss_mask: same shape, nonzero = loss token.

    Returns:
        Same shape, nats, >= 0; 0 at masked-out positions.
    """
    mask = loss_mask.bool()
    log_ratio = torch.where(mask, ref_log_probs, 0) - torch.where(mask, log_probs, 0)
    return torch.where(mask, k3_estimator(log_ratio), 0)
