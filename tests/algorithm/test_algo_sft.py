"""The supervised warm-up's loss (`megatron_dapo.algo.sft`)."""

from __future__ import annotations

import torch

from megatron_dapo.algo.aggregation import count_loss_normalizers
from megatron_dapo.algo.sft import sft_loss


def test_shares_of_any_split_sum_to_the_mean_nll_of_the_loss_tokens_and_its_gradient() -> None:
    log_probs = torch.tensor([-0.5, -1.0, -2.0, -3.0, -0.25, -4.0], requires_grad=True)
    mask = torch.tensor([False, True, True, False, True, True])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    parts = [slice(0, 2), slice(2, 6)]  # two micro-batches, one sample split between them
    normalizers = count_loss_normalizers([mask[p] for p in parts], [ids[p] for p in parts])
    total = sum(sft_loss(log_probs[p], mask[p], ids[p], normalizers) for p in parts)
    total.backward()
    assert total.item() == (1.0 + 2.0 + 0.25 + 4.0) / 4
    assert log_probs.grad is not None
    assert log_probs.grad.tolist() == [0.0, -0.25, -0.25, 0.0, -0.25, -0.25]
