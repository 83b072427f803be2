"""Scoring a finished group: the G responses to one prompt -> a `ScoredGroup` with shaped rewards.

1. Correctness (`judge` -> `Judgement`): the reward scorer's verdict on each response, with the
   run's rule for responses cut at the length limit (`reward.score_truncated`), in a worker
   thread; the held-out evaluation judges its samples the same way, without step 2.
   A response whose reward call times out or whose reward function raises (or returns a wrong
   type) is scored as wrong, counted (`Judgement.timeouts`, `Judgement.errors`) and logged as a
   warning.
2. Shaping (`scored_group`): the reward is the correctness score plus, with
   `overlong.soft_punishment`, the soft overlong punishment (`pipeline.overlong`, DAPO Eq. 13).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from pipeline.config import OverlongConfig
from pipeline.overlong import TRUNCATED_FINISH_REASON, soft_overlong_punishment
from pipeline.prompts import Prompt
from pipeline.rewards.base import RewardResult, RewardScorer
from pipeline.sglang_client import Generation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredGroup:
    """The G responses to one prompt, scored.

    Attributes:
        prompt: the prompt.
        generations: G responses.
        correct: [G] correctness judged by the reward scorer.
        scores: [G] correctness rewards.
        rewards: [G] shaped rewards (scores plus the soft overlong punishment).
        reward_timeouts: responses whose reward call timed out (scored as wrong).
        reward_errors: responses whose reward function failed (scored as wrong).
    """

    prompt: Prompt
    generations: tuple[Generation, ...]
    correct: tuple[bool, ...]
    scores: tuple[float, ...]
    rewards: tuple[float, ...]
    reward_timeouts: int = 0
    reward_errors: int = 0
    scoring_seconds: float = 0.0
    """Wall time of the group's reward calls."""

    @property
    def weight_version(self) -> int:
        """The oldest policy version among the responses."""
        return min(g.weight_version for g in self.generations)


@dataclass(frozen=True)
class Judgement:
    """The correctness of a group's responses.

    Attributes:
        results: one per response, in order.
        seconds: wall time of the reward calls.
    """

    results: tuple[RewardResult, ...]
    seconds: float

    @property
    def timeouts(self) -> int:
        """Responses whose reward call timed out."""
        return sum(r.timed_out for r in self.results)

    @property
    def errors(self) -> int:
        """Responses whose reward function raised or returned a wrong type."""
        return sum(r.error is not None for r in self.results)

    @property
    def first_error(self) -> str | None:
        """What the first failed reward function raised, None if none failed."""
        return next((r.error for r in self.results if r.error is not None), None)


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


async def judge(
    prompt: Prompt,
    generations: Sequence[Generation],
    scorer: RewardScorer,
    decode: Callable[[Sequence[int]], str],
    score_truncated: Literal["as_is", "wrong"],
) -> Judgement:
    """The correctness of the responses to `prompt` (`judge_responses` in a worker thread),
    timed, its reward failures logged."""
    begin = time.monotonic()
    results = await asyncio.to_thread(
        judge_responses, generations, prompt.ground_truth, scorer, decode, score_truncated
    )
    judgement = Judgement(results=tuple(results), seconds=time.monotonic() - begin)
    if judgement.timeouts or judgement.errors:
        first = judgement.first_error
        logger.warning(
            "prompt row %d: of %d responses, %d reward calls timed out and %d failed%s; "
            "scored as wrong",
            prompt.row_index,
            len(results),
            judgement.timeouts,
            judgement.errors,
            f" (first: {first})" if first is not None else "",
        )
    return judgement


def scored_group(
    prompt: Prompt,
    generations: Sequence[Generation],
    judgement: Judgement,
    max_response_length: int,
    overlong: OverlongConfig,
) -> ScoredGroup:
    """The group with its shaped rewards: the judged scores plus, with
    `overlong.soft_punishment`, the soft overlong punishment of each response's length."""
    scores = torch.tensor([r.score for r in judgement.results], dtype=torch.float32)
    rewards = scores
    if overlong.soft_punishment:
        lengths = [len(g.output_ids) for g in generations]
        rewards = scores + soft_overlong_punishment(
            lengths, max_response_length, overlong.cache_length
        )
    return ScoredGroup(
        prompt=prompt,
        generations=tuple(generations),
        correct=tuple(r.acc for r in judgement.results),
        scores=tuple(scores.tolist()),
        rewards=tuple(rewards.tolist()),
        reward_timeouts=judgement.timeouts,
        reward_errors=judgement.errors,
        scoring_seconds=judgement.seconds,
    )
