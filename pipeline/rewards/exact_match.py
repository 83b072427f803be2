"""Exact-match reward: the whole response, stripped of surrounding whitespace, is the answer.

For procedural tasks whose answer is the complete response (the CPU demo trains a tiny
random policy to answer with a single character, where no `Answer:` line is within reach).
"""

from __future__ import annotations

from pipeline.rewards.base import RewardResult


def exact_match_reward(response: str, ground_truth: str) -> RewardResult:
    """+1 if `response.strip() == ground_truth.strip()`, else -1."""
    prediction = response.strip()
    return RewardResult.from_correctness(prediction == ground_truth.strip(), prediction or None)
