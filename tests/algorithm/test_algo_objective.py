"""The policy objective (loss + entropy bonus + aggregation + statistics) against hand values."""

import math

import pytest
import torch

from megatron_dapo.algo.aggregation import LossNormalizers, count_loss_normalizers
from megatron_dapo.algo.objective import ObjectiveConfig, ObjectiveStats, policy_objective
from megatron_dapo.algo.policy_loss import PolicyLossConfig

# DAPO, eps 0.2 / 0.28, dual clip c = 3; 7 loss tokens and a masked eighth:
#   r     1.5    1.2   0.5   0.5   1.5   3.0   4.0   (9.0 masked)
#   A     1      1     1     -1    -1    0     -1
#   loss  -1.28  -1.2  -0.5  0.8   1.5   0     3.0     high clip at t0, low at t3, dual at t6
#   sum = 2.32; token-mean over 7 tokens = 2.32 / 7
RATIOS = torch.tensor([1.5, 1.2, 0.5, 0.5, 1.5, 3.0, 4.0, 9.0], dtype=torch.float64)
ADVANTAGES = torch.tensor([1, 1, 1, -1, -1, 0, -1, 1], dtype=torch.float64)
MASK = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
ENTROPY = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.0, 1.0, 1.5, 99.0], dtype=torch.float64)
IDS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
DAPO = ObjectiveConfig("dapo", "token-mean", PolicyLossConfig(dual_clip_c=3.0))


def _objective(config: ObjectiveConfig, keep: slice = slice(None), normalizers=None):
    log_probs = RATIOS.log()[keep].clone().requires_grad_()
    entropy = ENTROPY[keep].clone().requires_grad_()
    normalizers = normalizers or count_loss_normalizers([MASK], [IDS])
    share, stats = policy_objective(
        log_probs,
        entropy,
        torch.zeros_like(log_probs),
        ADVANTAGES[keep],
        MASK[keep],
        IDS[keep],
        normalizers,
        config,
    )
    return share, stats, log_probs, entropy


def test_share_and_statistics_hand_values() -> None:
    share, stats, _, _ = _objective(DAPO)
    assert share.item() == pytest.approx(2.32 / 7)
    assert stats.loss.item() == pytest.approx(2.32 / 7)
    assert stats.num_tokens.item() == 7
    assert (stats.clip_fraction_low(), stats.clip_fraction_high()) == (1 / 7, 1 / 7)
    assert stats.dual_clip_fraction() == 1 / 7
    assert stats.mean_entropy() == pytest.approx(9.0 / 7)  # the masked 99 is left out
    k3 = sum(r - 1 - math.log(r) for r in RATIOS[:7].tolist())  # k3 = r - 1 - ln r
    assert stats.mean_approx_kl() == pytest.approx(k3 / 7)


def test_entropy_bonus_enters_the_share_and_its_gradient() -> None:
    # share = (2.32 - 0.1 * 9.0) / 7; d share / d entropy = -0.1 / 7 at loss tokens, 0 elsewhere
    config = ObjectiveConfig("dapo", "token-mean", DAPO.loss, entropy_coef=0.1)
    share, stats, _, entropy = _objective(config)
    share.backward()
    assert share.item() == pytest.approx((2.32 - 0.9) / 7)
    assert stats.loss.item() == pytest.approx(share.item())
    assert entropy.grad is not None
    assert entropy.grad.tolist() == pytest.approx([-0.1 / 7] * 7 + [0.0])
    _, _, _, without_bonus = _objective(DAPO)
    assert without_bonus.grad is None  # no entropy term: entropy stays out of the graph


def test_micro_batches_sum_to_the_whole() -> None:
    normalizers = count_loss_normalizers([MASK], [IDS])
    whole_share, whole, whole_lp, _ = _objective(DAPO, normalizers=normalizers)
    whole_share.backward()
    parts = [_objective(DAPO, keep, normalizers) for keep in (slice(0, 3), slice(3, 8))]
    for share, _, _, _ in parts:
        share.backward()
    summed = parts[0][1] + parts[1][1]
    torch.testing.assert_close(summed.as_tensor(), whole.as_tensor())
    assert sum(p[0].item() for p in parts) == pytest.approx(whole_share.item())
    split_grad = torch.cat([parts[0][2].grad, parts[1][2].grad])
    torch.testing.assert_close(split_grad, whole_lp.grad)


def test_statistics_travel_as_one_tensor() -> None:
    _, stats, _, _ = _objective(DAPO)
    flat = stats.as_tensor()
    assert flat.dtype == torch.float64 and flat.shape == (7,)
    again = ObjectiveStats.from_tensor(flat)
    torch.testing.assert_close(again.as_tensor(), flat)
    assert again.dual_clip_fraction() == stats.dual_clip_fraction()
    with pytest.raises(ValueError, match=r"expected 7 statistics, got shape \(6,\)"):
        ObjectiveStats.from_tensor(flat[:6])


def test_no_loss_tokens_gives_zero_statistics() -> None:
    nothing = torch.zeros(8, dtype=torch.bool)
    share, stats = policy_objective(
        RATIOS.log(),
        ENTROPY,
        torch.zeros(8, dtype=torch.float64),
        ADVANTAGES,
        nothing,
        IDS,
        LossNormalizers(0, 0),
        DAPO,
    )
    assert share.item() == 0.0 and stats.num_tokens.item() == 0
    assert (stats.mean_entropy(), stats.clip_fraction_high(), stats.mean_approx_kl()) == (0, 0, 0)


def test_sample_level_aggregation_uses_the_sequence_count() -> None:
    # seq-mean-token-mean: sequences (t0..t2), (t3..t5), (t6): means -2.98/3, 2.3/3, 3.0 over 3
    config = ObjectiveConfig("dapo", "seq-mean-token-mean", DAPO.loss)
    share, _, _, _ = _objective(config)
    assert share.item() == pytest.approx((-2.98 / 3 + 2.3 / 3 + 3.0) / 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policy_loss": "ppo"}, "unknown policy loss 'ppo'"),
        ({"loss_aggregation": "sum"}, "unknown loss aggregation 'sum'"),
        ({"entropy_coef": -0.1}, "entropy_coef must be >= 0, got -0.1"),
    ],
)
def test_config_is_validated(kwargs: dict, message: str) -> None:
    values = {"policy_loss": "dapo", "loss_aggregation": "token-mean", "loss": DAPO.loss}
    with pytest.raises(ValueError, match=message):
        ObjectiveConfig(**{**values, **kwargs})
