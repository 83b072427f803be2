"""Scoring a group on its own, without a queue: correctness (the truncation rule, reward failures
counted and logged) and the shaped rewards. The queue's use of it is in
`test_queue_dynamic_sampling`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest
import torch

from pipeline.config import OverlongConfig
from pipeline.prompts import Prompt
from pipeline.rewards.base import FunctionScorer, RewardResult
from pipeline.scoring import Judgement, judge, scored_group
from pipeline.sglang_client import Generation

PROMPT = Prompt(row_index=7, input_ids=(1, 2), ground_truth="yes")


def generation(text: str, finish_reason: str = "stop") -> Generation:
    """A response of one token per character."""
    return Generation(
        output_ids=tuple(map(ord, text)),
        output_logprobs=(-0.5,) * len(text),
        finish_reason=finish_reason,
        server_weight_version="0",
        server_url="scripted",
        weight_version=0,
    )


def text(ids: Sequence[int]) -> str:
    """The decoding of `generation`'s responses."""
    return "".join(map(chr, ids))


def yes_reward(response: str, ground_truth: str) -> RewardResult:
    return RewardResult.from_correctness(response.startswith(ground_truth), response[:3])


def judged(texts, score_truncated="wrong", reward=yes_reward, calls=None) -> Judgement:
    """Judge `texts` ((text, finish reason) pairs) against PROMPT; `calls` collects the texts
    the reward function saw."""

    def counted(response: str, ground_truth: str) -> RewardResult:
        if calls is not None:
            calls.append(response)
        return reward(response, ground_truth)

    generations = [generation(*t) for t in texts]
    return asyncio.run(judge(PROMPT, generations, FunctionScorer(counted), text, score_truncated))


@pytest.mark.parametrize("score_truncated", ["wrong", "as_is"])
def test_a_truncated_response_is_wrong_without_a_reward_call_unless_scored_as_is(
    score_truncated: str,
) -> None:
    calls: list[str] = []
    texts = [("yes.", "length"), ("yes", "stop"), ("no", "stop")]
    judgement = judged(texts, score_truncated, calls=calls)
    correct = [r.acc for r in judgement.results]
    if score_truncated == "as_is":
        assert correct == [True, True, False] and calls == ["yes.", "yes", "no"]
    else:
        assert correct == [False, True, False] and calls == ["yes", "no"]
        assert [r.score for r in judgement.results] == [-1.0, 1.0, -1.0]
    assert (judgement.timeouts, judgement.errors, judgement.first_error) == (0, 0, None)


def test_failed_reward_calls_are_wrong_counted_and_logged(caplog) -> None:
    def flaky(response: str, ground_truth: str) -> RewardResult:
        if response == "boom":
            raise ValueError("scripted failure")
        return "not a result" if response == "odd" else yes_reward(response, ground_truth)

    with caplog.at_level(logging.WARNING, logger="pipeline.scoring"):
        judgement = judged([("yes",), ("boom",), ("odd",)], reward=flaky)
    assert [r.score for r in judgement.results] == [1.0, -1.0, -1.0]
    assert (judgement.timeouts, judgement.errors) == (0, 2)
    assert str(judgement.first_error).startswith("ValueError: scripted failure")
    assert "prompt row 7: of 3 responses, 0 reward calls timed out and 2 failed" in caplog.text


def test_shaped_rewards_add_the_soft_overlong_punishment_when_switched_on() -> None:
    texts = [("yes.....", "length"), ("yes...",), ("no",), ("no",)]
    judgement = judged(texts, score_truncated="as_is")
    generations = [generation(*t) for t in texts]
    scores = [1.0, 1.0, -1.0, -1.0]
    for soft in (True, False):
        overlong = OverlongConfig(soft_punishment=soft, cache_length=4)
        group = scored_group(PROMPT, generations, judgement, 8, overlong)
        lengths = torch.tensor([8.0, 6.0, 2.0, 2.0])
        penalty = torch.clamp(((8 - 4) - lengths) / 4, -1.0, 0.0) if soft else 0.0  # Eq. 13
        torch.testing.assert_close(torch.tensor(group.rewards), torch.tensor(scores) + penalty)
        assert group.scores == tuple(scores) and group.correct == (True, True, False, False)
        assert group.generations == tuple(generations) and group.prompt == PROMPT
        assert group.scoring_seconds == judgement.seconds
