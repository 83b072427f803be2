"""Per-token KL estimates (Schulman, "Approximating KL Divergence", 2020), in nats.

For tokens x ~ q and x = log(p(x) / q(x)),

    k1(x) = -x                     unbiased, high variance, may be negative
    k3(x) = exp(x) - 1 - x         unbiased, low variance, always >= 0

estimate KL(q || p). Two KLs of the objective use them:

* the approximate KL to pi_old (a statistic): the tokens were sampled from pi_old and
  x = log pi_theta - log pi_old (the policy loss's `log_ratio`), estimating
  KL(pi_old || pi_theta) with `k3_estimator`;
* the KL penalty to a frozen reference policy pi_ref (`algorithm.kl_coef > 0`, GRPO): the
  tokens were sampled from pi_old ~ pi_theta, x = log pi_ref - log pi_theta, estimating
  KL(pi_theta || pi_ref). Its estimators are registered by name in `KL_ESTIMATORS`, each a
  pure function `(log_probs, ref_log_probs) -> per-token KL` of two tensors of one (any) shape
  (log pi_theta, differentiable, and log pi_ref, in nats) that returns that shape, following
  verl's `kl_penalty_forward` (verl/trainer/ppo/core_algos.py; verl maps `k3` and `low_var_kl`
  to the same clamped form, here `k3` is the unclamped estimate):

      k1:          log pi_theta - log pi_ref
      k3:          exp(log pi_ref - log pi_theta) - (log pi_ref - log pi_theta) - 1
      low_var_kl:  k3 clamped to [-LOW_VAR_KL_BOUND, LOW_VAR_KL_BOUND]

Log-ratios are clamped to +-MAX_ABS_LOG_RATIO before exponentiating so that fp32 cannot overflow
(as verl's +-20); a token beyond the clamp gets no gradient from k3.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.registry import Registry

MAX_ABS_LOG_RATIO = 20.0
"""Bound on |log ratio| before exp(); exp(20) ~ 4.9e8 is far outside any clip range."""

LOW_VAR_KL_BOUND = 10.0
"""`low_var_kl` clamps each token's k3 estimate to +-this (nats), as verl does."""


def k3_estimator(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp(x) - 1 - x per token (any shape, nats), x clamped to +-MAX_ABS_LOG_RATIO."""
    clamped = log_ratio.clamp(-MAX_ABS_LOG_RATIO, MAX_ABS_LOG_RATIO)
    return torch.expm1(clamped) - clamped


KLEstimatorFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

KL_ESTIMATORS = Registry[KLEstimatorFn]("KL estimator")
register_kl_estimator = KL_ESTIMATORS.register
get_kl_estimator = KL_ESTIMATORS.get


@register_kl_estimator("k1")
def k1_reference_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """log pi_theta - log pi_ref per token (nats); its gradient w.r.t. log pi_theta is 1."""
    return log_probs - ref_log_probs


@register_kl_estimator("k3")
def k3_reference_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """exp(x) - x - 1 with x = log pi_ref - log pi_theta per token (nats, >= 0); its gradient
    w.r.t. log pi_theta is 1 - exp(x), 0 where the policy equals the reference."""
    return k3_estimator(ref_log_probs - log_probs)


@register_kl_estimator("low_var_kl")
def low_var_reference_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """`k3_reference_kl` clamped to [-LOW_VAR_KL_BOUND, LOW_VAR_KL_BOUND] per token (nats);
    verl's default `kl_loss_type`. A clamped token gets no gradient."""
    return k3_reference_kl(log_probs, ref_log_probs).clamp(-LOW_VAR_KL_BOUND, LOW_VAR_KL_BOUND)
