"""Per-token KL estimate (Schulman, "Approximating KL Divergence", 2020), in nats.

For tokens x ~ q and x = log(p(x) / q(x)),

    k3(x) = exp(x) - 1 - x         unbiased, low variance, always >= 0

estimates KL(q || p). The objective reports the approximate KL to pi_old with it: the tokens were
sampled from pi_old and x = log pi_theta - log pi_old (the policy loss's `log_ratio`), estimating
KL(pi_old || pi_theta).

Log-ratios are clamped to +-MAX_ABS_LOG_RATIO before exponentiating so that fp32 cannot overflow.
"""

from __future__ import annotations

import torch

MAX_ABS_LOG_RATIO = 20.0
"""Bound on |log ratio| before exp(); exp(20) ~ 4.9e8 is far outside any clip range."""


def k3_estimator(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp(x) - 1 - x per token (any shape, nats), x clamped to +-MAX_ABS_LOG_RATIO."""
    clamped = log_ratio.clamp(-MAX_ABS_LOG_RATIO, MAX_ABS_LOG_RATIO)
    return torch.expm1(clamped) - clamped
