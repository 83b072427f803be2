"""Correctness of generated responses: the reward scorer's verdict on each, with the run's
rule for responses cut at the length limit (`reward.score_truncated`). No overlong shaping:
that is the training reward's, applied on top of these scores by `pipeline.scoring`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from pipeline.overlong import TRUNCATED_FINISH_REASON
from pipeline.rewards.base import RewardResult, RewardScorer
from pipeline.sglang_client import Generation


def judge_responses(
    generations: Sequence[Generation],
    ground_truth: str,
    scorer: RewardScorer,
    decode: Callable[[Sequence[int]], str],
    score_truncated: Literal["as_is", "wrong"],
) -> list[RewardResult]:
    """One `RewardResult` per generation, in order (blocking: run it in a worker thread).

    `score_truncated: wrong` judges a response cut at the length limit (finish reason
    `length`) wrong without calling the scorer (`Answer: 14` of a cut-off 144 is no answer);
    `as_is` scores its text like any other.
    """
    judged = [
        i
        for i, g in enumerate(generations)
        if score_truncated == "as_is" or g.finish_reason != TRUNCATED_FINISH_REASON
    ]
    pairs = [(decode(generations[i].output_ids), ground_truth) for i in judged]
    scored = scorer.score_batch(pairs) if pairs else []
    results = [RewardResult.from_correctness(False, None)] * len(generations)
    for i, result in zip(judged, scored, strict=True):
        results[i] = result
    return results
