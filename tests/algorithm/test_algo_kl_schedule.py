"""KL estimators, policy statistics and the eps_high schedule against hand-derived values."""

import math

import pytest
import torch

from megatron_dapo.algo.eps_schedule import EpsHighSchedule
from megatron_dapo.algo.kl import approx_kl_to_old, k1_estimator, k3_estimator, reference_kl_penalty
from megatron_dapo.algo.policy_loss import PolicyLossConfig, dapo_policy_loss
from megatron_dapo.algo.stats import clip_stats, entropy_stats, masked_sum

LN2 = math.log(2.0)


def test_kl_estimators_hand_values() -> None:
    # x = log r = [ln 2, 0, (masked) 7]: k1 = [-ln 2, 0], k3 = [2 - 1 - ln 2, 0] = [0.3068528, 0]
    log_ratio = torch.tensor([LN2, 0.0, 7.0], dtype=torch.float64)
    mask = torch.tensor([1, 1, 0])
    k1 = approx_kl_to_old(log_ratio, mask, "k1")
    k3 = approx_kl_to_old(log_ratio, mask, "k3")
    assert (k1.total.item(), k1.count.item()) == (pytest.approx(-LN2), 2)
    assert k3.total.item() == pytest.approx(0.3068528194400547)
    assert k3.mean().item() == pytest.approx(0.15342640972002736)
    assert k1_estimator(log_ratio)[0].item() == pytest.approx(-LN2)
    assert k3_estimator(torch.tensor([-50.0, 0.0, 1e-9])).min().item() >= 0.0
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k2'; valid names: \['k1', 'k3'\]"):
        approx_kl_to_old(log_ratio, mask, "k2")


def test_reference_kl_penalty_hand_values() -> None:
    # logp = ln 0.5, ref = ln 0.25: x = ref - logp = -ln 2,
    #   k3 = exp(x) - x - 1 = 0.5 + ln 2 - 1 = 0.1931472, d/dlogp = 1 - exp(x) = 0.5.
    # The masked-out token holds -inf log-probs and must stay finite with zero gradient.
    log_probs = torch.tensor([math.log(0.5), -math.inf], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([math.log(0.25), -3.0], dtype=torch.float64)
    penalty = reference_kl_penalty(log_probs, ref, torch.tensor([1, 0]))
    penalty.sum().backward()
    assert penalty.tolist() == [pytest.approx(0.1931471805599453), 0.0]
    assert log_probs.grad is not None and log_probs.grad.tolist() == [pytest.approx(0.5), 0.0]


def test_entropy_stats_and_merge() -> None:
    # loss tokens 0.5, 1.0, 2.0 (9.0 masked out): mean 3.5 / 3, min 0.5, max 2.0
    stats = entropy_stats(torch.tensor([0.5, 1.0, 2.0, 9.0]), torch.tensor([1, 1, 1, 0]))
    assert stats.mean().item() == pytest.approx(3.5 / 3)
    assert (stats.minimum.item(), stats.maximum.item()) == (0.5, 2.0)
    empty = entropy_stats(torch.tensor([4.0]), torch.tensor([0]))
    assert (empty.mean().item(), empty.minimum.item(), empty.maximum.item()) == (
        0.0,
        math.inf,
        -math.inf,
    )
    merged = stats.merge(empty).merge(entropy_stats(torch.tensor([3.0]), torch.tensor([1])))
    # 0.5 + 1 + 2 + 3 = 6.5 over 4 tokens, max 3
    assert (merged.mean().item(), merged.minimum.item(), merged.maximum.item()) == (1.625, 0.5, 3.0)
    assert entropy_stats(torch.zeros(0), torch.zeros(0)).minimum.item() == math.inf


def test_clip_stats_from_the_dapo_hand_example() -> None:
    # ratios/advantages of test_dapo_clip_higher_hand_values + a dual-clipped and a masked token:
    # 1 high, 1 low, 1 dual among 7 loss tokens (the 8th token would be clipped high but is masked).
    ratios = torch.tensor([1.5, 1.2, 0.5, 0.5, 1.5, 3.0, 4.0, 9.0], dtype=torch.float64)
    advantages = torch.tensor([1, 1, 1, -1, -1, 0, -1, 1], dtype=torch.float64)
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0])
    output = dapo_policy_loss(
        ratios.log(),
        torch.zeros(8, dtype=torch.float64),
        advantages,
        mask,
        torch.zeros(8, dtype=torch.int64),
        PolicyLossConfig(dual_clip_c=3.0),
    )
    stats = clip_stats(output.clipped_low, output.clipped_high, output.dual_clipped, mask)
    assert stats.low_fraction().item() == pytest.approx(1 / 7)
    assert stats.high_fraction().item() == pytest.approx(1 / 7)
    assert stats.dual_fraction().item() == pytest.approx(1 / 7)
    assert stats.total_fraction().item() == pytest.approx(3 / 7)
    doubled = stats.merge(stats)
    assert (doubled.clipped_high.item(), doubled.num_tokens.item()) == (2, 14)
    none = torch.zeros(2, dtype=torch.bool)
    assert clip_stats(none, none, none, torch.zeros(2)).total_fraction().item() == 0.0


def test_masked_sum_is_detached_and_ignores_masked_values() -> None:
    values = torch.tensor([1.0, math.nan, 2.0], requires_grad=True)
    result = masked_sum(values, torch.tensor([1, 0, 1]))
    assert (result.total.item(), result.count.item(), result.total.requires_grad) == (3.0, 2, False)


def test_eps_high_schedules_hand_values() -> None:
    constant = EpsHighSchedule(start=0.28)
    assert [constant.value_at(step) for step in (0, 10, 10_000)] == [0.28, 0.28, 0.28]
    # linear 0.4 -> 0.2 over 10 steps: step 5 -> 0.3, held at 0.2 after step 10
    linear = EpsHighSchedule(start=0.4, end=0.2, num_steps=10, kind="linear")
    assert [linear.value_at(step) for step in (0, 5, 10, 20)] == pytest.approx([0.4, 0.3, 0.2, 0.2])
    # cosine: 0.4 - 0.2 * (1 - cos(pi p)) / 2; p = 0.25 -> 0.4 - 0.2 * 0.1464466 = 0.3707107
    cosine = EpsHighSchedule(start=0.4, end=0.2, num_steps=8, kind="cosine")
    assert [cosine.value_at(step) for step in (0, 2, 4, 8, 9)] == pytest.approx(
        [0.4, 0.37071067811865477, 0.3, 0.2, 0.2]
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"start": 0.28, "kind": "exponential"},
            r"kind must be one of \['constant', 'cosine', 'linear'\]",
        ),
        ({"start": -0.1}, "start must be finite and >= 0, got -0.1"),
        (
            {"start": 0.3, "kind": "linear", "num_steps": 5},
            "end must be finite and >= 0 for kind='linear', got None",
        ),
        (
            {"start": 0.3, "end": 0.2, "kind": "cosine"},
            "num_steps must be >= 1 for kind='cosine', got 0",
        ),
        ({"start": 0.3, "num_steps": -2}, "num_steps must be an int >= 0, got -2"),
    ],
)
def test_eps_high_schedule_is_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"EpsHighSchedule.{message}"):
        EpsHighSchedule(**kwargs)


def test_eps_high_schedule_rejects_negative_steps() -> None:
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        EpsHighSchedule(start=0.28).value_at(-1)


def test_policy_loss_config_follows_the_run_config_schedule() -> None:
    from megatron_dapo.algo.policy_loss import policy_loss_config_at
    from megatron_dapo.config.schema import AlgorithmConfig

    algorithm = AlgorithmConfig(
        eps_high=0.4,
        eps_high_end=0.28,
        eps_high_schedule="linear",
        eps_high_schedule_steps=10,
        dual_clip_c=3.0,
    )
    assert policy_loss_config_at(algorithm, 0).eps_high == pytest.approx(0.4)
    assert policy_loss_config_at(algorithm, 5).eps_high == pytest.approx(0.34)
    assert policy_loss_config_at(algorithm, 50).eps_high == pytest.approx(0.28)
    assert policy_loss_config_at(algorithm, 5).dual_clip_c == 3.0
    assert policy_loss_config_at(AlgorithmConfig(), 99).eps_high == 0.28
