"""Packing scored groups into a `TrainBatch` on its own, without a queue (the queue's batches
are checked in `test_queue_dynamic_sampling`)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipeline.advantages import AdvantageConfig
from pipeline.batch_packing import pack_batch
from pipeline.prompts import Prompt
from pipeline.scoring import ScoredGroup
from pipeline.sglang_client import Generation


def group(row: int, finish_reasons: tuple[str, ...], routed: bool = False) -> ScoredGroup:
    """Row `row`'s prompt [row, row] answered by responses of i + 1 tokens, the first correct."""
    generations = []
    for i, reason in enumerate(finish_reasons):
        length = i + 1
        routes = None
        if routed:  # experts (row, row + 1) for every token but the last, at one layer
            routes = torch.tensor([[[row, row + 1]]] * (2 + length - 1), dtype=torch.uint8)
        generations.append(
            Generation(
                output_ids=(row + 10,) * length,
                output_logprobs=(-0.25,) * length,
                finish_reason=reason,
                server_weight_version="3",
                server_url="scripted",
                weight_version=3,
                routed_experts=routes,
            )
        )
    correct = tuple(i == 0 for i in range(len(finish_reasons)))
    scores = tuple(1.0 if c else -1.0 for c in correct)
    return ScoredGroup(
        prompt=Prompt(row_index=row, input_ids=(row, row), ground_truth="x"),
        generations=tuple(generations),
        correct=correct,
        scores=scores,
        rewards=scores,
    )


@pytest.mark.parametrize("filter_truncated", [False, True])
def test_groups_are_packed_in_order_with_ids_from_the_first(filter_truncated: bool) -> None:
    groups = [group(1, ("stop", "length")), group(2, ("length", "stop"))]
    batch = pack_batch(groups, AdvantageConfig(), 5, filter_truncated)
    assert batch.tokens.tolist() == [1, 1, 11, 1, 1, 11, 11, 2, 2, 12, 2, 2, 12, 12]
    assert batch.prompt_lengths.tolist() == [2] * 4
    assert batch.group_ids.tolist() == [5, 5, 6, 6]
    assert batch.weight_versions.tolist() == [3] * 4
    assert batch.rewards.tolist() == [1.0, -1.0, 1.0, -1.0]
    torch.testing.assert_close(
        batch.advantages, torch.tensor([0.7071, -0.7071] * 2), atol=1e-4, rtol=0
    )
    prompt, token = [0.0, 0.0], [-0.25]
    assert batch.rollout_log_probs.tolist() == (prompt + token + prompt + token * 2) * 2
    trained = [bool(batch.loss_mask[batch.sample_ids() == i].any()) for i in range(4)]
    assert trained == ([True, False, False, True] if filter_truncated else [True] * 4)
    assert [m["row_index"] for m in batch.metadata] == [1, 1, 2, 2]
    assert [m["response_length"] for m in batch.metadata] == [1, 2, 1, 2]
    assert batch.routed_experts is None


def test_routes_are_packed_and_every_response_must_carry_them() -> None:
    groups = [group(1, ("stop", "stop"), routed=True)]
    batch = pack_batch(groups, AdvantageConfig(), 0, False)
    assert batch.routed_experts.shape == (batch.num_tokens, 1, 2)
    last = batch.sample_offsets[1:] - 1
    assert batch.routed_experts[last].tolist() == [[[0, 1]]] * 2, "the last token is unrouted"
    routed = torch.ones(batch.num_tokens, dtype=torch.bool)
    routed[last] = False
    assert batch.routed_experts[routed].tolist() == [[[1, 2]]] * (batch.num_tokens - 2)

    half = replace(
        groups[0], generations=(groups[0].generations[0], group(1, ("stop",)).generations[0])
    )
    with pytest.raises(ValueError, match="1 of 2 responses carry routed experts"):
        pack_batch([half], AdvantageConfig(), 0, False)
