"""The dynamic-sampling queue end to end on the real CPU SGLang fleet, across a weight update."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import torch
from transformers import AutoTokenizer

from pipeline.advantages import AdvantageConfig
from pipeline.config import DynamicSamplingConfig, OverlongConfig, RolloutConfig
from pipeline.dynamic_sampling import DynamicSamplingQueue
from pipeline.prompts import PromptRow, PromptSource
from pipeline.rewards.base import FunctionScorer, RewardResult
from pipeline.rollout_client import RolloutClient
from pipeline.sglang_client import SGLangServerClient

pytestmark = [pytest.mark.slow, pytest.mark.server]
G = 4


def first_char_is_a_letter(response: str, ground_truth: str) -> RewardResult:
    """About half of a random-weight policy's responses pass: groups are mostly mixed."""
    return RewardResult.from_correctness(response[:1].isalpha(), response[:1])


def make_queue(
    tokenizer,
    client: RolloutClient,
    rollout: RolloutConfig,
    stop_token_ids: tuple[int, ...] = (),
    score_truncated: str = "wrong",
) -> DynamicSamplingQueue:
    """A queue of 2 groups over 64 "Count to i." prompts, scored by `first_char_is_a_letter`."""
    rows = [PromptRow([{"role": "user", "content": f"Count to {i}."}], "") for i in range(64)]
    return DynamicSamplingQueue(
        prompts=PromptSource(rows, tokenizer, max_prompt_length=64, seed=0),
        engine=client,
        scorer=FunctionScorer(first_char_is_a_letter),
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        advantage=AdvantageConfig(estimator="dr_grpo"),
        num_groups=2,
        rollout=rollout,
        sampling=DynamicSamplingConfig(max_generation_rounds=8),
        overlong=OverlongConfig(cache_length=4, filter_truncated=True),
        stop_token_ids=stop_token_ids,
        score_truncated=score_truncated,
    )


def test_queue_fills_batches_from_the_fleet_across_a_weight_update(
    tiny_models, live_urls, reference_logprobs
):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.base)

    async def main():
        async with aiohttp.ClientSession() as session:
            client = RolloutClient([SGLangServerClient(u, session, 8, 120.0) for u in live_urls])
            rollout = RolloutConfig(n_samples_per_prompt=G, max_response_length=12)
            queue = make_queue(tokenizer, client, rollout)
            first = await queue.next_batch(0)
            await client.update_weights_from_disk(str(tiny_models.other), weight_version=1)
            try:
                second = await queue.next_batch(1)
            finally:
                await client.update_weights_from_disk(str(tiny_models.base), weight_version=2)
            return first, second

    (batch0, stats0), (batch1, stats1) = asyncio.run(main())
    for batch, stats, version, model in (
        (batch0, stats0, 0, tiny_models.base),
        (batch1, stats1, 1, tiny_models.other),
    ):
        assert batch.num_samples == 2 * G and stats.kept >= 2
        assert batch.weight_versions.tolist() == [version] * (2 * G)
        assert (batch.response_lengths() <= 12).all()
        correct = torch.tensor([m["correct"] for m in batch.metadata]).view(2, G)
        assert ((correct.sum(1) > 0) & (correct.sum(1) < G)).all()
        starts, prompts = batch.sample_offsets[:-1], batch.prompt_lengths
        sample = int(torch.argmax(batch.response_lengths()))
        begin, end = int(starts[sample]), int(batch.sample_offsets[sample + 1])
        prompt_end = begin + int(prompts[sample])
        expected = reference_logprobs(
            model, batch.tokens[begin:prompt_end].tolist(), batch.tokens[prompt_end:end].tolist()
        )
        got = batch.rollout_log_probs[prompt_end:end].double()
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
    assert stats1.dropped_stale == stats0.carried_out, "max_staleness=0 drops every carried group"


def test_ignore_eos_generates_every_response_to_the_length_limit(tiny_models, live_urls):
    """`rollout.ignore_eos` reaches the server: with half the vocabulary as stop tokens,
    responses end early without it and all run to `max_response_length` with it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.base)
    stop = tuple(range(len(tokenizer) // 2))

    async def lengths(ignore_eos: bool) -> list[int]:
        async with aiohttp.ClientSession() as session:
            client = RolloutClient([SGLangServerClient(u, session, 8, 120.0) for u in live_urls])
            rollout = RolloutConfig(
                n_samples_per_prompt=G, max_response_length=12, ignore_eos=ignore_eos
            )
            queue = make_queue(tokenizer, client, rollout, stop, score_truncated="as_is")
            batch, _ = await queue.next_batch(0)
            return batch.response_lengths().tolist()

    assert min(asyncio.run(lengths(ignore_eos=False))) < 12
    assert asyncio.run(lengths(ignore_eos=True)) == [12] * (2 * G)
