"""Per-step policy statistics kept as globally reducible partial results.

Each statistic of a micro-batch is returned as sums and counts (0-dim tensors, no host sync),
plus minima and maxima where needed. Micro-batches are combined with `merge`; across ranks the
sums and counts are all-reduced with SUM, `minimum` with MIN and `maximum` with MAX. Only the
final ratios (`mean()`, the `*_fraction()` methods) divide.

Token layout: any shape, with a `loss_mask` of the same shape (nonzero = loss token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskedSum:
    """Sum of a per-token quantity over loss tokens, and how many tokens were summed.

    Attributes:
        total: 0-dim, units of the quantity.
        count: 0-dim, number of loss tokens.
    """

    total: torch.Tensor
    count: torch.Tensor

    def merge(self, other: MaskedSum) -> MaskedSum:
        """Partial result of both token sets."""
        return MaskedSum(self.total + other.total, self.count + other.count)

    def mean(self) -> torch.Tensor:
        """total / count, 0 when there are no tokens."""
        return self.total / self.count.clamp(min=1)


def masked_sum(values: torch.Tensor, loss_mask: torch.Tensor) -> MaskedSum:
    """Sum and count of `values` (any shape) over the loss tokens; detached from autograd."""
    mask = loss_mask.bool()
    values = values.detach()
    return MaskedSum(torch.where(mask, values, 0).sum(), mask.sum())


@dataclass(frozen=True)
class EntropyStats:
    """Policy entropy over loss tokens, in nats.

    Attributes:
        entropy: sum and count of per-token entropies.
        minimum: 0-dim; +inf when there are no loss tokens (identity of MIN).
        maximum: 0-dim; -inf when there are no loss tokens (identity of MAX).
    """

    entropy: MaskedSum
    minimum: torch.Tensor
    maximum: torch.Tensor

    def merge(self, other: EntropyStats) -> EntropyStats:
        """Statistics of both token sets."""
        return EntropyStats(
            self.entropy.merge(other.entropy),
            torch.minimum(self.minimum, other.minimum),
            torch.maximum(self.maximum, other.maximum),
        )

    def mean(self) -> torch.Tensor:
        """Mean entropy per loss token, 0 when there are none."""
        return self.entropy.mean()


def entropy_stats(entropy: torch.Tensor, loss_mask: torch.Tensor) -> EntropyStats:
    """Masked sum/count/min/max of per-token entropy (any shape, nats)."""
    mask = loss_mask.bool()
    entropy = entropy.detach()
    minimum = torch.where(mask, entropy, math.inf)
    maximum = torch.where(mask, entropy, -math.inf)
    return EntropyStats(
        masked_sum(entropy, mask),
        minimum.amin() if minimum.numel() else entropy.new_tensor(math.inf),
        maximum.amax() if maximum.numel() else entropy.new_tensor(-math.inf),
    )


@dataclass(frozen=True)
class ClipStats:
    """How many loss tokens had their gradient cut by each clip bound.

    The three sets are disjoint: the upper bound (1 + eps_high) only binds for A > 0, the lower
    bound (1 - eps_low) and the dual-clip cap (ratio > c) only for A < 0 and never together.

    Attributes:
        clipped_low, clipped_high, dual_clipped: 0-dim token counts.
        num_tokens: 0-dim count of loss tokens.
    """

    clipped_low: torch.Tensor
    clipped_high: torch.Tensor
    dual_clipped: torch.Tensor
    num_tokens: torch.Tensor

    def merge(self, other: ClipStats) -> ClipStats:
        """Counts of both token sets."""
        return ClipStats(
            self.clipped_low + other.clipped_low,
            self.clipped_high + other.clipped_high,
            self.dual_clipped + other.dual_clipped,
            self.num_tokens + other.num_tokens,
        )

    def _fraction(self, count: torch.Tensor) -> torch.Tensor:
        return count / self.num_tokens.clamp(min=1)

    def low_fraction(self) -> torch.Tensor:
        """Fraction in [0, 1] of loss tokens clipped at 1 - eps_low."""
        return self._fraction(self.clipped_low)

    def high_fraction(self) -> torch.Tensor:
        """Fraction in [0, 1] of loss tokens clipped at 1 + eps_high."""
        return self._fraction(self.clipped_high)

    def dual_fraction(self) -> torch.Tensor:
        """Fraction in [0, 1] of loss tokens capped by the dual clip."""
        return self._fraction(self.dual_clipped)

    def total_fraction(self) -> torch.Tensor:
        """Fraction in [0, 1] of loss tokens clipped by any bound."""
        return self._fraction(self.clipped_low + self.clipped_high + self.dual_clipped)


def clip_stats(
    clipped_low: torch.Tensor,
    clipped_high: torch.Tensor,
    dual_clipped: torch.Tensor,
    loss_mask: torch.Tensor,
) -> ClipStats:
    """Count the per-token clip indicators (bool, any shape, as in `PolicyLossOutput`)."""
    mask = loss_mask.bool()
    return ClipStats(
        (clipped_low & mask).sum(),
        (clipped_high & mask).sum(),
        (dual_clipped & mask).sum(),
        mask.sum(),
    )
