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


def test_queue_fills_batches_from_the_fleet_across_a_weight_update(
    tiny_models, live_urls, reference_logprobs
):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.base)
    rows = [PromptRow([{"role": "user", "content": f"Count to {i}."}], "") for i in range(64)]

    async def main():
        async with aiohttp.ClientSession() as session:
            client = RolloutClient([SGLangServerClient(u, session, 8, 120.0) for u in live_urls])
            queue = DynamicSamplingQueue(
                prompts=PromptSource(rows, tokenizer, max_prompt_length=64, seed=0),
                engine=client,
                scorer=FunctionScorer(first_char_is_a_letter),
                decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                advantage=AdvantageConfig(estimator="dr_grpo"),
                num_groups=2,
                rollout=RolloutConfig(n_samples_per_prompt=G, max_response_length=12),
                sampling=DynamicSamplingConfig(max_generation_rounds=8),
                overlong=OverlongConfig(cache_length=4, filter_truncated=True),
            )
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
