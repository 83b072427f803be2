"""Reward scorers by name (``get_reward_scorer("dapo_math")``) or by function import path."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from pipeline.rewards.base import FunctionScorer, RewardResult, RewardScorer
from pipeline.rewards.dapo_math import dapo_math_reward
from pipeline.rewards.exact_match import exact_match_reward
from pipeline.rewards.final_number import final_number_reward
from pipeline.rewards.math_verify_reward import MathVerifyScorer
from pipeline.rewards.pooled_scorer import DEFAULT_TIMEOUT_S, ProcessPoolScorer

ScorerFactory = Callable[[int, float], RewardScorer]
"""Builds a scorer from (num_workers, timeout_s); in-process scorers ignore both."""

REWARD_SCORERS: Mapping[str, ScorerFactory] = MappingProxyType(
    {
        "dapo_math": lambda num_workers, timeout_s: FunctionScorer(dapo_math_reward),
        "exact_match": lambda num_workers, timeout_s: FunctionScorer(exact_match_reward),
        "final_number": lambda num_workers, timeout_s: FunctionScorer(final_number_reward),
        "math_verify": MathVerifyScorer,
    }
)
"""Registered reward scorers by name; all but ``math_verify`` run in-process."""


def get_reward_scorer(
    name: str, num_workers: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S
) -> RewardScorer:
    """Build a reward scorer.

    Args:
        name: a registered name (see :data:`REWARD_SCORERS`), or ``"package.module:function"``
            of a user ``RewardFn``, which then runs in worker processes.
        num_workers: worker processes of process-pool scorers.
        timeout_s: hard per-call limit of process-pool scorers, seconds.

    Raises:
        ValueError: for an unknown name; the message lists the registered names.
    """
    if ":" in name:
        return ProcessPoolScorer(name, num_workers=num_workers, timeout_s=timeout_s)
    if name not in REWARD_SCORERS:
        raise ValueError(
            f"unknown reward {name!r}; registered rewards: {', '.join(sorted(REWARD_SCORERS))} "
            "(or give a 'package.module:function' import path)"
        )
    return REWARD_SCORERS[name](num_workers, timeout_s)


__all__ = [
    "REWARD_SCORERS",
    "FunctionScorer",
    "MathVerifyScorer",
    "ProcessPoolScorer",
    "RewardResult",
    "RewardScorer",
    "get_reward_scorer",
]
