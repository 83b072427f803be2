"""Pack a `TrainBatch` into token-budgeted micro-batches, split over data-parallel ranks.

Samples are packed back to back (first-fit decreasing into bins of at most `max_tokens` tokens),
never split. A micro-batch is one row `[1, T]` whose segments are its samples, then the padding
block if any, described by `cu_seqlens` (cumulative segment lengths, as in flash-attention's
varlen API). Each layer spec turns that into its packed-sequence mechanism at forward time, on
the model's device:

* Transformer Engine: `packed_seq_params` (THD format, `cu_seqlens`): varlen attention within
  each segment and RoPE restarted per segment; no attention mask at all.
* local spec (no varlen attention): `attention_mask`, the block-diagonal causal `[1, 1, T, T]`
  mask of the same segments. With RoPE the attention score depends only on the distance
  between query and key, so a packed sample computes exactly what it computes alone.

Position ids restart at 0 for every segment. Padding fills each row up to a multiple of
`pad_multiple` (sequence parallelism splits rows over TP ranks) or, with pipeline parallelism,
up to one length shared by every micro-batch (fixed p2p shapes); it is one more segment, whose
tokens carry no loss; `MicroBatchPlan.padding_fraction` measures it.

Every DP rank gets the same number of micro-batches (EP all-to-alls pair them up across ranks),
a multiple of `per_rank_multiple` (the interleaved schedule needs a multiple of the PP size):
bins are split, or empty micro-batches added, until the count fits.

Targets are next tokens: position q of a sample predicts its token q + 1, so row position q
carries `loss_mask`, `rollout_log_probs` of TrainBatch position q + 1 (see
`pipeline.train_batch`); the routes (MoE routing replay) are those of position q itself, and
padding is routed to experts 0..K-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.train_batch import TrainBatch, unrouted


@dataclass(frozen=True)
class MicroBatch:
    """One packed row; every tensor is `[1, T]` unless stated.

    Attributes:
        tokens: int64 input token ids (0 at padding).
        position_ids: int64, 0.. within each segment.
        cu_seqlens: int32 `[segments + 1]`, 0 then the cumulative segment lengths (the samples
            in row order, then the padding block if any); the last entry is T.
        max_seqlen: length of the longest segment.
        targets: int64 next token of each position (0 where there is none).
        rollout_log_probs: float32 the fleet's sampling log-prob of the target (nats), 0 off the
            loss mask.
        old_log_probs: float32 log pi_old of the target (nats): the rollout's as built, the
            policy's own once recomputed (`PolicyTrainer`, `algorithm.old_log_probs`).
        advantages: float32 advantage of the position's sample.
        loss_mask: bool, True where the target is a loss token.
        sequence_ids: int64 index of the position's sample within this micro-batch.
        samples: indices into the `TrainBatch` of the packed samples, in row order.
        routed_experts: `[1, T, L, K]` uint8/int16 the fleet's experts of each input token at
            each MoE layer (routing replay); None when the batch carries no routes.
        ref_log_probs: float32 log pi_ref of the target (nats), 0 off the loss mask: the frozen
            reference policy's, computed beside pi_old (`PolicyTrainer`, `algorithm.kl_coef`
            > 0, last pipeline stage); None as built and without a reference policy.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    targets: torch.Tensor
    rollout_log_probs: torch.Tensor
    old_log_probs: torch.Tensor
    advantages: torch.Tensor
    loss_mask: torch.Tensor
    sequence_ids: torch.Tensor
    samples: tuple[int, ...]
    routed_experts: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """T, padded row length in tokens."""
        return self.tokens.shape[1]

    def attention_mask(self) -> torch.Tensor:
        """`[1, 1, T, T]` bool on the row's device, True = masked (Megatron-Core's convention):
        causal within each segment, nothing across segments (local layer spec)."""
        segment = torch.repeat_interleave(
            torch.arange(len(self.cu_seqlens) - 1, device=self.tokens.device),
            self.cu_seqlens.diff(),
            output_size=self.length,
        )
        causal = torch.ones(self.length, self.length, dtype=torch.bool, device=segment.device)
        allowed = causal.tril_() & (segment[:, None] == segment[None, :])
        return ~allowed.view(1, 1, self.length, self.length)

    def packed_seq_params(self):
        """Megatron-Core `PackedSeqParams` of the row in THD format (Transformer Engine)."""
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
        )


@dataclass(frozen=True)
class MicroBatchPlan:
    """Which samples go into which micro-batch on which DP rank, and the padded row length.

    Attributes:
        bins: `bins[rank][i]` = TrainBatch sample indices of micro-batch i on DP rank `rank`.
        row_length: common padded length with pipeline parallelism; None = per row.
        pad_multiple: every row length is a multiple of it.
    """

    bins: tuple[tuple[tuple[int, ...], ...], ...]
    row_length: int | None
    pad_multiple: int

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per DP rank (the same on every rank)."""
        return len(self.bins[0])

    def padding_fraction(self, batch: TrainBatch) -> float:
        """Padding tokens / row slots over all ranks and micro-batches, in [0, 1)."""
        lengths = batch.sample_offsets.diff().tolist()
        real = slots = 0
        for rank_bins in self.bins:
            for samples in rank_bins:
                tokens = sum(lengths[i] for i in samples)
                real += tokens
                slots += self.row_length or _round_up(max(tokens, 1), self.pad_multiple)
        return 1.0 - real / max(slots, 1)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _first_fit_decreasing(samples: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    room: list[int] = []
    for sample in sorted(samples, key=lambda i: (-lengths[i], i)):
        for index, free in enumerate(room):
            if lengths[sample] <= free:
                bins[index].append(sample)
                room[index] -= lengths[sample]
                break
        else:
            bins.append([sample])
            room.append(capacity - lengths[sample])
    return bins


def _split_in_two(samples: list[int], lengths: list[int]) -> list[list[int]]:
    """Two non-empty bins of similar token counts (longest first into the lighter bin)."""
    halves: list[list[int]] = [[], []]
    for sample in sorted(samples, key=lambda i: (-lengths[i], i)):
        lighter = min(halves, key=lambda half: (sum(lengths[i] for i in half), len(half)))
        lighter.append(sample)
    return halves


def plan_micro_batches(
    batch: TrainBatch,
    max_tokens: int,
    data_parallel_size: int,
    pad_multiple: int = 1,
    common_length: bool = False,
    per_rank_multiple: int = 1,
) -> MicroBatchPlan:
    """Pack samples into bins of <= `max_tokens` tokens and deal them to DP ranks.

    Bins are dealt largest first in snake order, so ranks get similar token counts.

    Args:
        batch: the samples of one optimizer step.
        max_tokens: token budget of one micro-batch (`training.micro_batch_max_tokens`).
        data_parallel_size: DP ranks the bins are split over.
        pad_multiple: row lengths are rounded up to a multiple of it (TP size with SP).
        common_length: pad every row to the longest one (pipeline parallelism).
        per_rank_multiple: micro-batches per rank must be a multiple of it.

    Raises:
        ValueError: a sample is longer than `max_tokens`.
    """
    lengths = batch.sample_offsets.diff().tolist()
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        raise ValueError(
            f"samples {too_long[:5]} are longer than micro_batch_max_tokens={max_tokens} "
            f"(longest {max(lengths)} tokens)"
        )
    bins = _first_fit_decreasing(list(range(batch.num_samples)), lengths, max_tokens)
    while len(bins) % (data_parallel_size * per_rank_multiple):
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            bins.append([])
            continue
        largest = max(splittable, key=lambda b: sum(lengths[i] for i in b))
        bins.remove(largest)
        bins.extend(_split_in_two(largest, lengths))
    bins.sort(key=lambda b: -sum(lengths[i] for i in b))
    per_rank: list[list[tuple[int, ...]]] = [[] for _ in range(data_parallel_size)]
    for index, samples in enumerate(bins):
        lap, position = divmod(index, data_parallel_size)
        rank = position if lap % 2 == 0 else data_parallel_size - 1 - position
        per_rank[rank].append(tuple(samples))
    row_length = None
    if common_length:
        longest = max((sum(lengths[i] for i in b) for b in bins), default=1)
        row_length = _round_up(max(longest, 1), pad_multiple)
    return MicroBatchPlan(
        bins=tuple(tuple(rank_bins) for rank_bins in per_rank),
        row_length=row_length,
        pad_multiple=pad_multiple,
    )


def build_micro_batch(
    batch: TrainBatch, samples: tuple[int, ...], row_length: int | None, pad_multiple: int
) -> MicroBatch:
    """Pack `samples` of `batch` into one padded row (see `MicroBatch`)."""
    selected = batch.select(torch.tensor(samples, dtype=torch.int64))
    num_real = selected.num_tokens
    length = row_length or _round_up(max(num_real, 1), pad_multiple)
    pad = length - num_real
    sample_of_token = selected.sample_ids()
    starts = selected.sample_offsets[sample_of_token]
    position = torch.arange(num_real) - starts
    is_last = position == selected.sample_offsets.diff()[sample_of_token] - 1
    next_index = torch.where(is_last, 0, torch.arange(num_real) + 1)

    def row(values: torch.Tensor, fill: float | bool | int) -> torch.Tensor:
        return torch.cat([values, values.new_full((pad,), fill)]).unsqueeze(0)

    has_target = ~is_last
    segments = [*selected.sample_offsets.diff().tolist(), *([pad] if pad else [])]
    cu_seqlens = torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    rollout_log_probs = row(
        torch.where(has_target, selected.rollout_log_probs[next_index], 0.0), 0.0
    )
    return MicroBatch(
        tokens=row(selected.tokens, 0),
        position_ids=torch.cat([position, torch.arange(pad)]).unsqueeze(0),
        cu_seqlens=cu_seqlens,
        max_seqlen=max(segments),
        targets=row(torch.where(has_target, selected.tokens[next_index], 0), 0),
        rollout_log_probs=rollout_log_probs,
        old_log_probs=rollout_log_probs,
        advantages=row(selected.advantages[sample_of_token], 0.0),
        loss_mask=row(has_target & selected.loss_mask[next_index], False),
        sequence_ids=row(sample_of_token, 0),
        samples=tuple(samples),
        routed_experts=_routes_row(selected.routed_experts, pad),
    )


def _routes_row(routes: torch.Tensor | None, pad: int) -> torch.Tensor | None:
    """`[N, L, K]` routes of the packed samples -> `[1, N + pad, L, K]`, padding routed to
    experts 0..K-1; None stays None."""
    if routes is None:
        return None
    return torch.cat([routes, unrouted(pad, routes)]).unsqueeze(0)
