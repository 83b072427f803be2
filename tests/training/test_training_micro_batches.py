"""Packing a TrainBatch into token-budgeted micro-batches split over DP ranks."""

from __future__ import annotations

import pytest
import torch
from training_helpers import random_train_batch

from megatron_dapo.mcore.micro_batches import build_micro_batch, plan_micro_batches

LENGTHS = (17, 9, 30, 5, 22, 12, 26, 8)


@pytest.mark.parametrize(
    ("max_tokens", "dp", "per_rank_multiple", "pad_multiple", "common"),
    [(64, 1, 1, 1, False), (32, 2, 1, 2, False), (64, 2, 2, 1, True), (40, 4, 1, 4, True)],
)
def test_plan_places_every_sample_once_within_budget(
    max_tokens: int, dp: int, per_rank_multiple: int, pad_multiple: int, common: bool
) -> None:
    batch = random_train_batch(0, LENGTHS)
    plan = plan_micro_batches(batch, max_tokens, dp, pad_multiple, common, per_rank_multiple)
    placed = [s for rank_bins in plan.bins for samples in rank_bins for s in samples]
    assert sorted(placed) == list(range(len(LENGTHS)))
    assert len(plan.bins) == dp
    assert {len(rank_bins) for rank_bins in plan.bins} == {plan.num_microbatches}
    assert plan.num_microbatches % per_rank_multiple == 0
    for rank_bins in plan.bins:
        for samples in rank_bins:
            assert sum(LENGTHS[i] for i in samples) <= max_tokens
    rows = [
        build_micro_batch(batch, samples, plan.row_length, plan.pad_multiple)
        for rank_bins in plan.bins
        for samples in rank_bins
    ]
    assert all(row.length % pad_multiple == 0 for row in rows)
    if common:
        assert {row.length for row in rows} == {plan.row_length}
    slots = sum(row.length for row in rows)
    assert plan.padding_fraction(batch) == pytest.approx(1 - sum(LENGTHS) / slots)


def test_without_packing_every_sample_is_its_own_micro_batch() -> None:
    plan = plan_micro_batches(random_train_batch(0, LENGTHS), 64, 2, pack=False)
    assert sorted(s for rank_bins in plan.bins for (s,) in rank_bins) == list(range(8))


def test_sample_longer_than_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than micro_batch_max_tokens"):
        plan_micro_batches(random_train_batch(0, LENGTHS), 29, 1)


def test_row_targets_masks_and_positions_follow_each_sample() -> None:
    batch = random_train_batch(3, LENGTHS)
    samples = (4, 1, 7)
    row = build_micro_batch(batch, samples, row_length=None, pad_multiple=8)
    offsets = batch.sample_offsets.tolist()
    cursor = 0
    for local_id, sample in enumerate(samples):
        start, end = offsets[sample], offsets[sample + 1]
        n = end - start
        span = slice(cursor, cursor + n)
        assert row.tokens[0, span].tolist() == batch.tokens[start:end].tolist()
        assert row.position_ids[0, span].tolist() == list(range(n))
        next_tokens = batch.tokens[start + 1 : end].tolist()
        assert row.targets[0, cursor : cursor + n - 1].tolist() == next_tokens
        expected_mask = batch.loss_mask[start + 1 : end].tolist() + [False]
        assert row.loss_mask[0, span].tolist() == expected_mask
        expected_old = batch.rollout_log_probs[start + 1 : end].tolist() + [0.0]
        assert row.rollout_log_probs[0, span].tolist() == pytest.approx(expected_old)
        assert torch.equal(row.old_log_probs, row.rollout_log_probs)  # until recomputed
        assert torch.equal(row.advantages[0, span], batch.advantages[sample].expand(n))
        assert set(row.sequence_ids[0, span].tolist()) == {local_id}
        cursor += n
    assert row.length == -(-cursor // 8) * 8
    assert not row.loss_mask[0, cursor:].any()


def test_attention_mask_is_block_diagonal_causal() -> None:
    batch = random_train_batch(3, LENGTHS)
    row = build_micro_batch(batch, (3, 7), row_length=20, pad_multiple=1)
    masked = row.attention_mask[0, 0]
    blocks = [0] * 5 + [1] * 8 + [2] * 7  # samples 3 (5 tokens), 7 (8 tokens), padding
    for query in range(20):
        for key in range(20):
            allowed = key <= query and blocks[key] == blocks[query]
            assert bool(masked[query, key]) == (not allowed), (query, key)


def test_dp_ranks_get_equal_counts_even_with_fewer_bins_than_ranks() -> None:
    batch = random_train_batch(0, (30, 30))
    plan = plan_micro_batches(batch, 64, data_parallel_size=4)
    assert plan.num_microbatches == 1
    empty = [samples for rank_bins in plan.bins for samples in rank_bins if not samples]
    assert len(empty) == 2
    row = build_micro_batch(batch, (), row_length=None, pad_multiple=2)
    assert row.length == 2 and not row.loss_mask.any()
    assert torch.equal(row.sequence_ids, torch.zeros(1, 2, dtype=torch.int64))
