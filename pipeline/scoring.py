"""Scoring a finished group: the G responses to one prompt -> correctness, then shaped rewards.

Two steps, the first usable alone (an evaluator needs correctness, not shaping):

1. Correctness (`CorrectnessJudge.judge` -> `Judgement`): each response's text (`decode` of its
   token ids) is scored by the `RewardScorer` (`pipeline.rewards`) against the prompt's ground
   truth, in a worker thread. With `score_truncated="wrong"` a response cut at the length limit
   (`pipeline.overlong.TRUNCATED_FINISH_REASON`) is wrong whatever its prefix says and its
   reward call is skipped; `"as_is"` scores its text like any other. A response whose reward
   call times out or whose reward function raises (or returns a wrong type) is scored as wrong,
   counted (`Judgement.timeouts`, `Judgement.errors`) and logged as a warning.
2. Shaping (`scored_group` -> `ScoredGroup`): the reward is the correctness score plus, with
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
        results: one per response, in order (a skipped truncated response is wrong).
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


@dataclass(frozen=True)
class CorrectnessJudge:
    """Judges the responses to a prompt with a reward scorer; see the module docstring.

    Args:
        scorer: judges responses; called in a worker thread.
        decode: response token ids -> text for the scorer.
        score_truncated: `wrong` scores a response truncated at the length limit as wrong
            (its reward call is skipped), `as_is` scores its text like any other.
    """

    scorer: RewardScorer
    decode: Callable[[Sequence[int]], str]
    score_truncated: Literal["as_is", "wrong"] = "wrong"

    async def judge(self, prompt: Prompt, generations: Sequence[Generation]) -> Judgement:
        # `score_truncated: wrong`: a response cut at the length limit is wrong whatever its
        # prefix says (`Answer: 14` of a cut-off 144), and its reward call is saved.
        judged = [
            i
            for i, g in enumerate(generations)
            if self.score_truncated == "as_is" or g.finish_reason != TRUNCATED_FINISH_REASON
        ]
        pairs = [(self.decode(generations[i].output_ids), prompt.ground_truth) for i in judged]
        begin = time.monotonic()
        scored = await asyncio.to_thread(self.scorer.score_batch, pairs) if pairs else []
        seconds = time.monotonic() - begin
        results = [RewardResult.from_correctness(False, None)] * len(generations)
        for i, result in zip(judged, scored, strict=True):
            results[i] = result
        judgement = Judgement(results=tuple(results), seconds=seconds)
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
