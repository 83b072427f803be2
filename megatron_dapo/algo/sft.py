"""The supervised fine-tuning loss of one micro-batch: a pure function of tensors.

    share = sft_loss(log_probs, loss_mask, sequence_ids, normalizers)

Cross-entropy of the response tokens, -log p(token | its prefix), averaged over every loss token
of the optimizer step (token-mean with the GLOBAL normaliser, `aggregation.token_mean`): each
micro-batch's result is its exact share of the step's mean negative log-likelihood, so summing
the shares of every micro-batch on every data-parallel rank gives the loss, and the gradient, of
the whole batch however it was split.
"""

from __future__ import annotations

import torch

from megatron_dapo.algo.aggregation import LossNormalizers, token_mean


def sft_loss(
    log_probs: torch.Tensor,
    loss_mask: torch.Tensor,
    sequence_ids: torch.Tensor,
    normalizers: LossNormalizers,
) -> torch.Tensor:
    """One micro-batch's share of the step's mean negative log-likelihood per loss token.

    Args:
        log_probs: log p of each target token (nats), any token shape, differentiable.
        loss_mask: same shape, nonzero = loss (response) token; other values are ignored.
        sequence_ids: int64, same shape, each token's sample within the micro-batch (the
            aggregation signature; token-mean does not need it).
        normalizers: the optimizer step's global counts (`num_tokens` is the divisor).

    Returns:
        0-dim share in nats per token, differentiable w.r.t. `log_probs`.
    """
    return token_mean(-log_probs, loss_mask, sequence_ids, normalizers)
