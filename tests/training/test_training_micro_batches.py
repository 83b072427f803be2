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


def _expected_segments(batch, samples: tuple[int, ...], length: int) -> list[int]:
    """Segment of every row position from the batch's own sample lengths (padding last)."""
    lengths = batch.sample_offsets.diff().tolist()
    segments = [index for index, sample in enumerate(samples) for _ in range(lengths[sample])]
    return segments + [len(samples)] * (length - len(segments))


@pytest.mark.parametrize(("pad_multiple", "common"), [(1, False), (8, False), (2, True)])
def test_thd_metadata_and_dense_mask_describe_the_same_packing(
    pad_multiple: int, common: bool
) -> None:
    """Token for token, the Transformer Engine path (THD `PackedSeqParams`) and the local path
    (block-diagonal causal mask) let a query see exactly the earlier keys of its own sample."""
    batch = random_train_batch(5, LENGTHS)
    plan = plan_micro_batches(batch, 40, 2, pad_multiple, common)
    rows = [
        build_micro_batch(batch, samples, plan.row_length, plan.pad_multiple)
        for rank_bins in plan.bins
        for samples in rank_bins
    ]
    padded = [row.length > sum(LENGTHS[i] for i in row.samples) for row in rows]
    assert any(padded) == (pad_multiple > 1 or common)  # padding is a segment of its own
    for row in rows:
        segment = torch.tensor(_expected_segments(batch, row.samples, row.length))
        expected = (segment[:, None] == segment[None, :]) & torch.ones(
            row.length, row.length, dtype=torch.bool
        ).tril()
        assert torch.equal(~row.attention_mask()[0, 0], expected)

        params = row.packed_seq_params()
        assert params.qkv_format == "thd"
        assert params.cu_seqlens_q.dtype == torch.int32  # what TE's varlen kernels take
        assert torch.equal(params.cu_seqlens_q, params.cu_seqlens_kv)
        bounds = params.cu_seqlens_q.tolist()
        thd_segment = torch.bucketize(
            torch.arange(row.length), torch.tensor(bounds[1:]), right=True
        )
        assert torch.equal(thd_segment, segment)
        assert bounds[0] == 0 and bounds[-1] == row.length
        assert params.max_seqlen_q == params.max_seqlen_kv == max(torch.tensor(bounds).diff())
        starts = torch.tensor(bounds[:-1])[segment]  # RoPE restarts per THD segment
        assert torch.equal(row.position_ids[0], torch.arange(row.length) - starts)


def test_dp_ranks_get_equal_counts_even_with_fewer_bins_than_ranks() -> None:
    batch = random_train_batch(0, (30, 30))
    plan = plan_micro_batches(batch, 64, data_parallel_size=4)
    assert plan.num_microbatches == 1
    empty = [samples for rank_bins in plan.bins for samples in rank_bins if not samples]
    assert len(empty) == 2
    row = build_micro_batch(batch, (), row_length=None, pad_multiple=2)
    assert row.length == 2 and not row.loss_mask.any()
    assert torch.equal(row.sequence_ids, torch.zeros(1, 2, dtype=torch.int64))
