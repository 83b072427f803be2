"""Loss aggregation modes against hand-derived values and their edge cases."""

import math

import pytest
import torch

from megatron_dapo.algo.aggregation import (
    LOSS_AGGREGATIONS,
    LossNormalizers,
    count_loss_normalizers,
    get_loss_aggregation,
    segment_mean,
    segment_sum,
)

# Micro-batch of 5 packed tokens in 3 sequences; the 4th token is masked out (its loss, NaN, must
# be ignored). Global normalisers of the whole mini-batch: 8 tokens, 5 sequences.
TOKEN_LOSS = torch.tensor([1.0, 2.0, 3.0, math.nan, 5.0], dtype=torch.float64)
MASK = torch.tensor([1, 1, 1, 0, 1])
IDS = torch.tensor([0, 0, 1, 1, 2])
GLOBAL = LossNormalizers(num_tokens=8, num_sequences=5, norm_constant=4.0)


def aggregate(name: str, normalizers: LossNormalizers = GLOBAL) -> float:
    return get_loss_aggregation(name)(TOKEN_LOSS, MASK, IDS, normalizers).item()


def test_token_mean_uses_the_global_token_count() -> None:
    # (1 + 2 + 3 + 5) / 8 = 1.375
    assert aggregate("token-mean") == pytest.approx(1.375)


def test_seq_mean_token_mean_hand_value() -> None:
    # sequence means: (1 + 2) / 2 = 1.5, 3 / 1 = 3, 5 / 1 = 5 -> 9.5 / 5 = 1.9
    assert aggregate("seq-mean-token-mean") == pytest.approx(1.9)


def test_seq_mean_token_sum_norm_hand_value() -> None:
    # sequence sums / 4: 0.75, 0.75, 1.25 -> 2.75 / 5 = 0.55
    assert aggregate("seq-mean-token-sum-norm") == pytest.approx(0.55)


def test_seq_mean_token_sum_norm_needs_the_constant() -> None:
    with pytest.raises(ValueError, match=r"needs LossNormalizers\.norm_constant"):
        aggregate("seq-mean-token-sum-norm", LossNormalizers(8, 5))


def test_padded_layout() -> None:
    # [B=2, S=2], row = sequence: means 1.5 and 3 -> (1.5 + 3) / 2 = 2.25
    loss = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    rows = torch.tensor([[0, 0], [1, 1]])
    result = get_loss_aggregation("seq-mean-token-mean")(loss, mask, rows, LossNormalizers(3, 2))
    assert result.item() == pytest.approx(2.25)


@pytest.mark.parametrize("name", sorted(LOSS_AGGREGATIONS))
def test_zero_length_and_fully_masked_sequences_contribute_zero(name: str) -> None:
    # sequence 1 has no token at all, sequence 2 only masked-out tokens (NaN losses)
    token_loss = torch.tensor([1.0, 3.0, math.nan, math.nan], requires_grad=True)
    mask = torch.tensor([1, 1, 0, 0])
    ids = torch.tensor([0, 0, 2, 2])
    result = get_loss_aggregation(name)(token_loss, mask, ids, LossNormalizers(2, 1, 2.0))
    result.backward()
    # token-mean 4 / 2 = 2; seq-mean-token-mean 2 / 1 = 2; sum-norm (4 / 2) / 1 = 2
    assert result.item() == pytest.approx(2.0)
    assert token_loss.grad is not None and torch.isfinite(token_loss.grad).all()
    assert token_loss.grad[2:].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("name", sorted(LOSS_AGGREGATIONS))
def test_fully_masked_batch_gives_zero_loss_and_gradient(name: str) -> None:
    token_loss = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    mask = torch.zeros(3)
    ids = torch.tensor([0, 1, 1])
    normalizers = count_loss_normalizers([mask], [ids], norm_constant=10.0)
    assert normalizers == LossNormalizers(0, 0, 10.0)
    result = get_loss_aggregation(name)(token_loss, mask, ids, normalizers)
    result.backward()
    assert result.item() == 0.0
    assert token_loss.grad is not None and token_loss.grad.tolist() == [0.0, 0.0, 0.0]


def test_count_loss_normalizers_over_micro_batches() -> None:
    # micro-batch 1: 3 loss tokens in 2 sequences; micro-batch 2: 1 loss token, its sequence 0
    # is fully masked (not counted) -> 4 tokens, 3 sequences.
    masks = [torch.tensor([1, 1, 0, 1]), torch.tensor([[0, 0], [1, 0]])]
    ids = [torch.tensor([0, 0, 1, 1]), torch.tensor([[0, 0], [1, 1]])]
    assert count_loss_normalizers(masks, ids, 7.0) == LossNormalizers(4, 3, 7.0)
    with pytest.raises(ValueError, match="2 loss masks but 1 sequence_ids"):
        count_loss_normalizers(masks, ids[:1])


def test_segment_sum_and_mean() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 100.0, 5.0])
    ids = torch.tensor([0, 0, 2, 9, 2])  # id 9 is masked out, sequence 1 is empty
    mask = torch.tensor([True, True, True, False, True])
    assert segment_sum(values, ids, mask).tolist() == [3.0, 0.0, 8.0]
    assert segment_mean(values, ids, mask).tolist() == [1.5, 0.0, 4.0]
    assert (
        segment_sum(torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0)).numel() == 0
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_tokens": -1, "num_sequences": 0}, "num_tokens must be an int >= 0, got -1"),
        ({"num_tokens": 1, "num_sequences": 1.5}, "num_sequences must be an int >= 0, got 1.5"),
        (
            {"num_tokens": 1, "num_sequences": 1, "norm_constant": 0.0},
            "norm_constant must be finite and > 0",
        ),
    ],
)
def test_normalizers_are_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LossNormalizers(**kwargs)


def test_registry_lists_valid_names() -> None:
    assert set(LOSS_AGGREGATIONS) == {
        "token-mean",
        "seq-mean-token-mean",
        "seq-mean-token-sum-norm",
    }
    with pytest.raises(ValueError, match=r"unknown loss aggregation 'mean'; valid names: \["):
        get_loss_aggregation("mean")
