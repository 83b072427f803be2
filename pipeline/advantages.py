"""Group-relative advantages from scalar rewards, selected by name.

An estimator maps rewards shaped `[num_groups, G]` (row g holds the rewards of the G responses
sampled for prompt g, in reward units) to advantages of the same shape; every token of response
o_i then gets the advantage of o_i. `compute_advantages(rewards, config)` runs the estimator that
`config.estimator` names: this is the data plane's reward -> advantage step.

Estimators:
- `grpo`:    A_i = (R_i - mean(R)) / (std(R) + std_eps)   (dimensionless; DAPO paper, GRPO)
- `dr_grpo`: A_i = R_i - mean(R)                          (reward units; Dr. GRPO, no std)

Std convention: by default the unbiased (Bessel-corrected, divide by G - 1) group std, which is
what `torch.std` computes and what the DAPO/verl reference code uses. `unbiased_std=False`
selects the population std (divide by G). A group whose rewards are all equal (which includes
every group of size G = 1) has no learning signal and gets advantages of exactly 0 under every
estimator, never NaN, whatever `std_eps` is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field, field_validator

from pipeline.config import Section
from pipeline.registry import Registry


class AdvantageConfig(Section):
    """Which advantage estimator runs, and its options (the run config's `algorithm.advantage`)."""

    estimator: str = "grpo"
    """Registered estimator name (`ADVANTAGE_ESTIMATORS`)."""
    std_eps: float = Field(1e-6, ge=0.0, allow_inf_nan=False)
    """Added to the group std before dividing (grpo), in reward units."""
    unbiased_std: bool = True
    """True = divide the squared deviations by G - 1, False = by G."""

    @field_validator("estimator")
    @classmethod
    def _registered(cls, name: str) -> str:
        ADVANTAGE_ESTIMATORS.get(name)  # ValueError listing the valid names
        return name


AdvantageEstimator = Callable[[torch.Tensor, AdvantageConfig], torch.Tensor]

ADVANTAGE_ESTIMATORS = Registry[AdvantageEstimator]("advantage estimator")
register_advantage_estimator = ADVANTAGE_ESTIMATORS.register
get_advantage_estimator = ADVANTAGE_ESTIMATORS.get


def _centered_group_rewards(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R - mean(R) per group, exactly 0 in constant groups.

    Args:
        rewards: `[num_groups, G]` finite floating rewards.

    Returns:
        centered: `[num_groups, G]`, reward units.
        constant_group: `[num_groups, 1]` bool, True where all G rewards are equal.
    """
    if rewards.ndim != 2:
        raise ValueError(
            f"rewards must be shaped [num_groups, G], got shape {tuple(rewards.shape)}"
        )
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating tensor, got dtype {rewards.dtype}")
    num_non_finite = int((~torch.isfinite(rewards)).sum())
    if num_non_finite:
        raise ValueError(f"rewards has {num_non_finite} non-finite value(s)")
    constant_group = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    # The mean of equal floats can differ from them in the last bit; force exact zeros.
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    return torch.where(constant_group, 0.0, centered), constant_group


@register_advantage_estimator("grpo")
def grpo_advantages(rewards: torch.Tensor, config: AdvantageConfig) -> torch.Tensor:
    """(R - mean) / (std + std_eps) within each group (see the module docstring for the std).

    Args:
        rewards: `[num_groups, G]` floating rewards.
        config: std convention and epsilon.

    Returns:
        `[num_groups, G]` dimensionless advantages; 0 in constant groups.
    """
    centered, constant_group = _centered_group_rewards(rewards)
    group_size = rewards.shape[1]
    divisor = max(group_size - 1, 1) if config.unbiased_std else group_size
    std = (centered.square().sum(dim=1, keepdim=True) / divisor).sqrt()
    # Constant groups have centered == 0; dividing them by 1 keeps std_eps = 0 NaN-free.
    scale = torch.where(constant_group, 1.0, std + config.std_eps)
    return centered / scale


@register_advantage_estimator("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, config: AdvantageConfig) -> torch.Tensor:
    """R - mean within each group (Dr. GRPO, arXiv 2503.20783: no std normalisation).

    Args:
        rewards: `[num_groups, G]` floating rewards.
        config: unused (Dr. GRPO has no std); present for the common estimator signature.

    Returns:
        `[num_groups, G]` advantages in reward units; 0 in constant groups.
    """
    del config
    return _centered_group_rewards(rewards)[0]


def compute_advantages(rewards: torch.Tensor, config: AdvantageConfig) -> torch.Tensor:
    """Advantages `[num_groups, G]` of rewards `[num_groups, G]` by `config.estimator`."""
    return get_advantage_estimator(config.estimator)(rewards, config)
