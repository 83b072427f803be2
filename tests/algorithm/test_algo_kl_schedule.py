"""The KL estimators and the eps_high schedule against hand-derived values."""

import math

import pytest
import torch

from megatron_dapo.algo.eps_schedule import EpsHighSchedule
from megatron_dapo.algo.kl import KL_ESTIMATORS, get_kl_estimator, k3_estimator

LN2 = math.log(2.0)


def test_k3_hand_values_and_overflow_clamp() -> None:
    # x = log r = ln 2: k3 = 2 - 1 - ln 2 = 0.3068528; x = 0: 0; never negative, never inf
    log_ratio = torch.tensor([LN2, 0.0], dtype=torch.float64)
    assert k3_estimator(log_ratio).tolist() == pytest.approx([0.3068528194400547, 0.0])
    extreme = k3_estimator(torch.tensor([-50.0, 1e-9, 1e4]))
    assert extreme.min().item() >= 0.0 and torch.isfinite(extreme).all()


# log pi_theta, log pi_ref per token: ratios pi_theta / pi_ref of 2, 1/2, 1, and a policy
# e^-30 times less likely than the reference (beyond the exp clamp of 20 and the bound of 10)
LOG_PROBS = torch.tensor([math.log(0.5), math.log(0.25), -1.0, -30.0], dtype=torch.float64)
REF_LOG_PROBS = torch.tensor([math.log(0.25), math.log(0.5), -1.0, 0.0], dtype=torch.float64)
E20 = math.exp(20.0)


@pytest.mark.parametrize(
    ("name", "values", "gradient"),
    [
        # k1 = logp - ref: ln 2, -ln 2, 0, -30; gradient 1
        ("k1", [LN2, -LN2, 0.0, -30.0], [1.0, 1.0, 1.0, 1.0]),
        # k3 = e^x - x - 1, x = ref - logp = -ln 2, ln 2, 0, 30 (clamped to 20):
        #   1/2 + ln 2 - 1 = 0.1931472, 2 - ln 2 - 1 = 0.3068528, 0, e^20 - 21;
        #   gradient 1 - e^x: 1/2, -1, 0, 0 (beyond the clamp)
        ("k3", [0.5 + LN2 - 1, 1 - LN2, 0.0, E20 - 21], [0.5, -1.0, 0.0, 0.0]),
        # low_var_kl: k3 clamped to [-10, 10]: the last token's is 10, without gradient
        ("low_var_kl", [0.5 + LN2 - 1, 1 - LN2, 0.0, 10.0], [0.5, -1.0, 0.0, 0.0]),
    ],
)
def test_reference_kl_estimators_hand_values_and_gradients(
    name: str, values: list[float], gradient: list[float]
) -> None:
    log_probs = LOG_PROBS.clone().requires_grad_()
    kl = get_kl_estimator(name)(log_probs, REF_LOG_PROBS)
    assert kl.tolist() == pytest.approx(values, rel=1e-12, abs=1e-15)
    kl.sum().backward()
    assert log_probs.grad.tolist() == pytest.approx(gradient, rel=1e-12, abs=1e-15)


def test_reference_kl_estimators_are_registered_by_name() -> None:
    assert sorted(KL_ESTIMATORS) == ["k1", "k3", "low_var_kl"]
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k2'; valid names"):
        get_kl_estimator("k2")


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
            {"start": 0.3, "end": -0.2, "kind": "linear", "num_steps": 5},
            "end must be finite and >= 0, got -0.2",
        ),
        (
            {"start": 0.3, "kind": "linear", "num_steps": 5},
            "end is required for kind='linear'",
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


def test_objective_follows_the_run_config_schedule() -> None:
    from megatron_dapo.config.schema import AlgorithmConfig

    algorithm = AlgorithmConfig(
        eps_high=0.4,
        eps_high_end=0.28,
        eps_high_schedule="linear",
        eps_high_schedule_steps=10,
        dual_clip_c=3.0,
        entropy_coef=0.01,
    )
    assert algorithm.objective_at(0).loss.eps_high == pytest.approx(0.4)
    assert algorithm.objective_at(5).loss.eps_high == pytest.approx(0.34)
    assert algorithm.objective_at(50).loss.eps_high == pytest.approx(0.28)
    objective = algorithm.objective_at(5)
    assert (objective.loss.dual_clip_c, objective.entropy_coef) == (3.0, 0.01)
    assert (objective.policy_loss, objective.loss_aggregation) == ("dapo", "token-mean")
    assert AlgorithmConfig().objective_at(99).loss.eps_high == 0.28
