"""The policy objective (loss + entropy bonus + aggregation + statistics) against hand values."""

import math

import pytest
import torch

from megatron_dapo.algo.aggregation import (
    LossNormalizers,
    count_loss_normalizers,
    get_loss_aggregation,
)
from megatron_dapo.algo.objective import ObjectiveConfig, ObjectiveStats, policy_objective
from megatron_dapo.algo.policy_loss import PolicyLossConfig, get_policy_loss

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


def _objective(
    config: ObjectiveConfig, keep: slice = slice(None), normalizers=None, ref_log_probs=None
):
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
        ref_log_probs=ref_log_probs,
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
    assert flat.dtype == torch.float64 and flat.shape == (8,)
    again = ObjectiveStats.from_tensor(flat)
    torch.testing.assert_close(again.as_tensor(), flat)
    assert again.dual_clip_fraction() == stats.dual_clip_fraction()
    with pytest.raises(ValueError, match=r"expected 8 statistics, got shape \(7,\)"):
        ObjectiveStats.from_tensor(flat[:7])


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
        ({"kl_coef": -0.1}, "kl_coef must be >= 0, got -0.1"),
        ({"kl_estimator": "k2"}, "unknown KL estimator 'k2'"),
    ],
)
def test_config_is_validated(kwargs: dict, message: str) -> None:
    values = {"policy_loss": "dapo", "loss_aggregation": "token-mean", "loss": DAPO.loss}
    with pytest.raises(ValueError, match=message):
        ObjectiveConfig(**{**values, **kwargs})


# the reference policy's log-probs of the 8 tokens (the eighth masked, NaN: never read)
REF_LOG_PROBS = torch.tensor(
    [-0.3, 0.4, -1.0, -0.2, 0.9, 1.0, 1.2, float("nan")], dtype=torch.float64
)


def _kl_gradient_by_hand(estimator: str, aggregation: str) -> torch.Tensor:
    """d(aggregated KL) / d log pi_theta per token, from the estimators' derivatives:
    k1 -> 1; k3 -> 1 - exp(ref - logp); low_var_kl -> k3's where |k3| <= 10, else 0; times
    each token's aggregation weight (token-mean 1/7; seq-mean-token-mean 1/(|o_i| x 3))."""
    log_probs = RATIOS.log()
    x = (REF_LOG_PROBS - log_probs)[:7]
    derivative = {
        "k1": torch.ones(7, dtype=torch.float64),
        "k3": 1 - x.exp(),
        "low_var_kl": torch.where(x.exp() - x - 1 <= 10, 1 - x.exp(), 0.0),
    }[estimator]
    lengths = torch.tensor([3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 1.0], dtype=torch.float64)  # |o_i|
    weight = 1 / 7 if aggregation == "token-mean" else 1 / (lengths * 3)
    return torch.cat([derivative * weight, torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("estimator", ["k1", "k3", "low_var_kl"])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_kl_penalty_adds_kl_coef_times_the_aggregated_kl_gradient(
    estimator: str, aggregation: str
) -> None:
    policy_only = ObjectiveConfig("dapo", aggregation, DAPO.loss)
    with_kl = ObjectiveConfig("dapo", aggregation, DAPO.loss, kl_coef=0.1, kl_estimator=estimator)
    results = []
    for config in (policy_only, with_kl):
        share, stats, log_probs, _ = _objective(config, ref_log_probs=REF_LOG_PROBS)
        share.backward()
        results.append((share, stats, log_probs.grad))
    (policy_share, policy_stats, policy_grad), (share, stats, grad) = results
    expected_grad = policy_grad + 0.1 * _kl_gradient_by_hand(estimator, aggregation)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    x = (REF_LOG_PROBS - RATIOS.log())[:7]
    token_kl = {"k1": -x, "k3": x.exp() - x - 1, "low_var_kl": (x.exp() - x - 1).clamp(max=10)}
    kl = token_kl[estimator]
    assert stats.mean_reference_kl() == pytest.approx(kl.mean().item(), rel=1e-12)
    if aggregation == "token-mean":
        aggregated = kl.sum() / 7
    else:
        aggregated = (kl[:3].mean() + kl[3:6].mean() + kl[6:].mean()) / 3
    assert share.item() == pytest.approx(policy_share.item() + 0.1 * aggregated.item(), rel=1e-12)
    assert stats.loss.item() == pytest.approx(share.item())
    assert policy_stats.reference_kl.item() == 0.0  # no penalty: not computed


def test_kl_penalty_needs_the_reference_log_probs() -> None:
    config = ObjectiveConfig("dapo", "token-mean", DAPO.loss, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_log_probs"):
        _objective(config)


def test_without_kl_coef_the_share_is_bitwise_the_policy_loss_alone() -> None:
    # DAPO keeps kl_coef 0: given reference log-probs or not, the share and its gradient are
    # bitwise the aggregated policy loss, the objective before the KL penalty existed
    normalizers = count_loss_normalizers([MASK], [IDS])
    outcomes = []
    for ref_log_probs in (None, REF_LOG_PROBS):
        share, stats, log_probs, _ = _objective(DAPO, ref_log_probs=ref_log_probs)
        share.backward()
        outcomes.append((share.detach(), log_probs.grad, stats.as_tensor()))
    log_probs = RATIOS.log().clone().requires_grad_()
    policy = get_policy_loss("dapo")(
        log_probs, torch.zeros(8, dtype=torch.float64), ADVANTAGES, MASK, IDS, DAPO.loss
    )
    alone = get_loss_aggregation("token-mean")(policy.token_loss, MASK, IDS, normalizers)
    alone.backward()
    for share, grad, stats in outcomes:
        assert torch.equal(share, alone.detach()) and torch.equal(grad, log_probs.grad)
        assert torch.equal(stats, outcomes[0][2]) and stats[-1] == 0.0  # reference_kl
