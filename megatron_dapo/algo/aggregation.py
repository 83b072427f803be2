"""Reduce per-token losses of one micro-batch to a scalar, with GLOBAL normalisers.

Every mode divides by a normaliser that covers the whole mini-batch (all micro-batches of the
optimizer step on all data-parallel ranks), passed in as `LossNormalizers`. Each micro-batch's
result is therefore its exact share of the mini-batch loss: summing the micro-batch results (what
gradient accumulation and the DP gradient all-reduce do) gives the loss, and the gradient, of the
whole mini-batch however it was split.

Modes (L_it = per-token loss, M_it = loss mask, |o_i| = loss tokens of sequence i):
- `token-mean`:              sum_i sum_t L_it / num_tokens                (DAPO token-level loss)
- `seq-mean-token-mean`:     sum_i (sum_t L_it / |o_i|) / num_sequences   (GRPO sample-level)
- `seq-mean-token-sum-norm`: sum_i (sum_t L_it / norm_constant) / num_sequences   (Dr. GRPO)

Token layout: token tensors share any shape (packed `[N]` or padded `[B, S]`); `loss_mask`
(nonzero = loss token) and int64 `sequence_ids` (index 0..num_sequences-1 of each token's
sequence within the micro-batch) have that same shape. A sequence must not be split across
micro-batches for the `seq-*` modes. Sequences without loss tokens contribute 0 and are not
counted in `num_sequences`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipeline.registry import Registry


@dataclass(frozen=True)
class LossNormalizers:
    """Normalisers of one optimizer step, identical on every micro-batch and rank.

    Attributes:
        num_tokens: loss tokens in the whole mini-batch (all micro-batches, all DP ranks).
        num_sequences: sequences with at least one loss token, same scope.
        norm_constant: `seq-mean-token-sum-norm` divisor in tokens (Dr. GRPO: the maximum
            response length); None when that mode is not used.
    """

    num_tokens: int
    num_sequences: int
    norm_constant: float | None = None

    def __post_init__(self) -> None:
        for name in ("num_tokens", "num_sequences"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 0):
                raise ValueError(f"LossNormalizers.{name} must be an int >= 0, got {value!r}")
        if self.norm_constant is not None and not (0.0 < self.norm_constant < math.inf):
            raise ValueError(
                f"LossNormalizers.norm_constant must be finite and > 0, got {self.norm_constant!r}"
            )


def segment_sum(
    values: torch.Tensor, sequence_ids: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Sum of `values` over each sequence's loss tokens (differentiable w.r.t. `values`).

    Args:
        values: any token shape, floating.
        sequence_ids: int64, same shape; ignored where `loss_mask` is 0.
        loss_mask: same shape; nonzero = loss token.

    Returns:
        `[1 + max masked-in sequence id]` sums (shape `[0]` for an empty input), dtype of
        `values`. Sequences without loss tokens get 0. Reading the max id syncs with the host.
    """
    mask = loss_mask.bool().reshape(-1)
    ids = torch.where(mask, sequence_ids.reshape(-1), 0)
    masked_values = torch.where(mask, values.reshape(-1), 0)
    num_segments = int(ids.max()) + 1 if ids.numel() else 0
    return masked_values.new_zeros(num_segments).index_add(0, ids, masked_values)


def broadcast_to_tokens(
    sequence_values: torch.Tensor, sequence_ids: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Give every loss token the value of the sequence it belongs to (`segment_sum`'s inverse).

    Args:
        sequence_values: `[num_sequences]` one value per sequence.
        sequence_ids: int64, any token shape; index into `sequence_values` of each token.
            Ignored (may be out of range) where `loss_mask` is 0.
        loss_mask: same shape as `sequence_ids`; nonzero = loss token.

    Returns:
        Tensor shaped like `sequence_ids` with the dtype of `sequence_values`; 0 at masked-out
        positions.
    """
    mask = loss_mask.bool()
    safe_ids = torch.where(mask, sequence_ids, 0)
    return torch.where(mask, sequence_values[safe_ids], 0.0)


def segment_mean(
    values: torch.Tensor, sequence_ids: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Mean of `values` over each sequence's loss tokens; 0 for sequences without any.

    Shapes as in `segment_sum`; returns `[num_segments]` in the units of `values`.
    """
    sums = segment_sum(values, sequence_ids, loss_mask)
    counts = segment_sum(torch.ones_like(values), sequence_ids, loss_mask)
    return sums / counts.clamp(min=1.0)


def count_loss_normalizers(
    loss_masks: Sequence[torch.Tensor],
    sequence_ids: Sequence[torch.Tensor],
    norm_constant: float | None = None,
) -> LossNormalizers:
    """Count loss tokens and non-empty sequences over the given micro-batches.

    With data parallelism, each rank counts its own micro-batches and the counts are summed over
    the DP group (all-reduce) before building the `LossNormalizers` used by every rank.

    Args:
        loss_masks: one mask per micro-batch (any token shape, nonzero = loss token).
        sequence_ids: matching int64 sequence ids, one tensor per micro-batch.
        norm_constant: passed through to `LossNormalizers.norm_constant`.
    """
    if len(loss_masks) != len(sequence_ids):
        raise ValueError(
            f"got {len(loss_masks)} loss masks but {len(sequence_ids)} sequence_ids tensors"
        )
    num_tokens = 0
    num_sequences = 0
    for mask, ids in zip(loss_masks, sequence_ids, strict=True):
        tokens_per_sequence = segment_sum(mask.bool().to(torch.int64), ids, mask)  # exact ints
        num_tokens += int(tokens_per_sequence.sum())
        num_sequences += int((tokens_per_sequence > 0).sum())
    return LossNormalizers(num_tokens, num_sequences, norm_constant)


LossAggregation = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, LossNormalizers], torch.Tensor
]

LOSS_AGGREGATIONS = Registry[LossAggregation]("loss aggregation")
register_loss_aggregation = LOSS_AGGREGATIONS.register
get_loss_aggregation = LOSS_AGGREGATIONS.get


@register_loss_aggregation("token-mean")
def token_mean(
    token_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    sequence_ids: torch.Tensor,
    normalizers: LossNormalizers,
) -> torch.Tensor:
    """sum of the micro-batch's loss tokens / global `num_tokens` (1 if the batch has none).

    Args:
        token_loss: any token shape, per-token loss (values at masked-out positions ignored).
        loss_mask: same shape, nonzero = loss token.
        sequence_ids: same shape; unused by this mode (common aggregation signature).
        normalizers: global counts of the optimizer step.

    Returns:
        0-dim tensor in the units of `token_loss`.
    """
    del sequence_ids
    masked_loss = torch.where(loss_mask.bool(), token_loss, 0)
    return masked_loss.sum() / max(normalizers.num_tokens, 1)


@register_loss_aggregation("seq-mean-token-mean")
def seq_mean_token_mean(
    token_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    sequence_ids: torch.Tensor,
    normalizers: LossNormalizers,
) -> torch.Tensor:
    """sum over sequences of their token-mean loss / global `num_sequences`.

    Shapes and units as in `token_mean`; returns a 0-dim tensor.
    """
    per_sequence = segment_mean(token_loss, sequence_ids, loss_mask)
    return per_sequence.sum() / max(normalizers.num_sequences, 1)


@register_loss_aggregation("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(
    token_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    sequence_ids: torch.Tensor,
    normalizers: LossNormalizers,
) -> torch.Tensor:
    """sum over sequences of (token-sum loss / norm_constant) / global `num_sequences`.

    Dr. GRPO's length-unbiased form. Needs `normalizers.norm_constant`. Shapes and units as in
    `token_mean`; returns a 0-dim tensor.
    """
    del sequence_ids  # the sum over sequences of their token sums is the plain masked sum
    if normalizers.norm_constant is None:
        raise ValueError("seq-mean-token-sum-norm needs LossNormalizers.norm_constant (got None)")
    masked_loss = torch.where(loss_mask.bool(), token_loss, 0)
    return masked_loss.sum() / normalizers.norm_constant / max(normalizers.num_sequences, 1)
