"""Policy losses against hand-derived per-token values, gradients and clip indicators."""

import math

import pytest
import torch

from megatron_dapo.algo.aggregation import LOSS_AGGREGATIONS
from megatron_dapo.algo.policy_loss import (
    PAPER_RECIPES,
    POLICY_LOSSES,
    PolicyLossConfig,
    PolicyLossOutput,
    dapo_policy_loss,
    get_policy_loss,
    grpo_policy_loss,
    gspo_policy_loss,
    sapo_policy_loss,
)
from pipeline.advantages import ADVANTAGE_ESTIMATORS

DAPO = PolicyLossConfig(eps_low=0.2, eps_high=0.28)


def run_loss(
    name: str,
    ratios: list[float],
    advantages: list[float],
    config: PolicyLossConfig = DAPO,
    sequence_ids: list[int] | None = None,
    mask: list[int] | None = None,
) -> tuple[PolicyLossOutput, torch.Tensor]:
    """Per-token output and d(sum of token losses)/d(log_probs), with old_log_probs = 0."""
    log_probs = torch.tensor(ratios, dtype=torch.float64).log().requires_grad_()
    n = len(ratios)
    output = get_policy_loss(name)(
        log_probs,
        torch.zeros(n, dtype=torch.float64),
        torch.tensor(advantages, dtype=torch.float64),
        torch.tensor(mask if mask is not None else [1] * n),
        torch.tensor(sequence_ids if sequence_ids is not None else list(range(n))),
        config,
    )
    output.token_loss.sum().backward()
    assert log_probs.grad is not None
    return output, log_probs.grad


def test_dapo_clip_higher_hand_values() -> None:
    # eps_low = 0.2, eps_high = 0.28, loss = -min(rA, clip(r, 0.8, 1.28) A); d loss/d logp = -A r
    # if not clipped, else 0.
    #   r=1.5, A=+1: -min(1.5, 1.28)        = -1.28, clipped high, grad 0
    #   r=1.2, A=+1: -min(1.2, 1.2)         = -1.2,  grad -1.2
    #   r=0.5, A=+1: -min(0.5, 0.8)         = -0.5,  lower bound ignored for A > 0, grad -0.5
    #   r=0.5, A=-1: -min(-0.5, -0.8)       =  0.8,  clipped low, grad 0
    #   r=1.5, A=-1: -min(-1.5, -1.28)      =  1.5,  upper bound ignored for A < 0, grad 1.5
    #   r=3.0, A= 0: 0, nothing clipped,   grad 0
    output, grad = run_loss("dapo", [1.5, 1.2, 0.5, 0.5, 1.5, 3.0], [1, 1, 1, -1, -1, 0])
    torch.testing.assert_close(
        output.token_loss, torch.tensor([-1.28, -1.2, -0.5, 0.8, 1.5, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(grad, torch.tensor([0, -1.2, -0.5, 0, 1.5, 0], dtype=torch.float64))
    assert output.clipped_high.tolist() == [True, False, False, False, False, False]
    assert output.clipped_low.tolist() == [False, False, False, True, False, False]
    assert not output.dual_clipped.any()
    torch.testing.assert_close(output.log_ratio[0].item(), math.log(1.5))


def test_dapo_on_the_bound_is_not_clipped() -> None:
    # r = 1 + eps_high exactly with eps_high = 0: the unclipped branch, gradient -A r = -1.
    output, grad = run_loss("dapo", [1.0], [1.0], PolicyLossConfig(eps_low=0.0, eps_high=0.0))
    assert output.token_loss.item() == -1.0
    assert grad.item() == -1.0
    assert not output.clipped_high.any()


def test_dual_clip_hand_values() -> None:
    # c = 3 caps the loss of A < 0 tokens at -cA:
    #   r=4, A=-1: max(-rA, -clip(r)A) = max(4, 1.28) = 4 -> min(4, 3) = 3, dual clipped, grad 0
    #   r=2, A=-2: max(4, 2.56) = 4 < -cA = 6 -> 4, grad -A r = 4
    #   r=4, A=+1: -1.28 (upper clip), the dual clip never applies to A > 0
    #   r=0.5, A=-1: 0.8 (lower clip), not dual clipped
    config = PolicyLossConfig(eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)
    output, grad = run_loss("dapo", [4.0, 2.0, 4.0, 0.5], [-1, -2, 1, -1], config)
    torch.testing.assert_close(
        output.token_loss, torch.tensor([3.0, 4.0, -1.28, 0.8], dtype=torch.float64)
    )
    torch.testing.assert_close(grad, torch.tensor([0.0, 4.0, 0.0, 0.0], dtype=torch.float64))
    assert output.dual_clipped.tolist() == [True, False, False, False]
    assert output.clipped_high.tolist() == [False, False, True, False]
    assert output.clipped_low.tolist() == [False, False, False, True]


def test_grpo_and_dr_grpo_clip_symmetrically_with_eps_low() -> None:
    # eps_low = 0.2 on both sides: r=1.25, A=+1 -> -min(1.25, 1.2) = -1.2, clipped high
    # (DAPO's eps_high = 0.28 would leave it unclipped at -1.25).
    for name in ("grpo", "dr_grpo"):
        output, grad = run_loss(name, [1.25, 0.7], [1, -1])
        torch.testing.assert_close(
            output.token_loss, torch.tensor([-1.2, 0.8], dtype=torch.float64)
        )
        assert grad.tolist() == [0.0, 0.0]
        assert output.clipped_high.tolist() == [True, False]
        assert output.clipped_low.tolist() == [False, True]
    assert POLICY_LOSSES["dr_grpo"] is grpo_policy_loss
    dapo_output, _ = run_loss("dapo", [1.25], [1])
    assert dapo_output.token_loss.item() == pytest.approx(-1.25)


def test_gspo_sequence_ratio_hand_values() -> None:
    # Sequence 0: log r = [0.3, -0.1] (+ one masked token with log r = 5, ignored), A = +1
    #   s_0 = exp((0.3 - 0.1) / 2) = exp(0.1) = 1.1051709; with gspo_eps_high = 0.2 it is not
    #   clipped: every token's loss is -s_0 and its gradient -A s_0 = -1.1051709.
    # Sequence 1: log r = [-0.2], A = -1: s_1 = exp(-0.2) = 0.8187308 < 1 - 0.1 -> clipped low,
    #   loss = -min(-0.8187, -0.9) = 0.9, gradient 0.
    config = PolicyLossConfig(gspo_eps_low=0.1, gspo_eps_high=0.2)
    log_probs = torch.tensor([0.3, -0.1, 5.0, -0.2], dtype=torch.float64, requires_grad=True)
    output = gspo_policy_loss(
        log_probs,
        torch.zeros(4, dtype=torch.float64),
        torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=torch.float64),
        torch.tensor([1, 1, 0, 1]),
        torch.tensor([0, 0, 0, 1]),
        config,
    )
    output.token_loss.sum().backward()
    s0 = 1.1051709180756477
    torch.testing.assert_close(
        output.token_loss, torch.tensor([-s0, -s0, 0.0, 0.9], dtype=torch.float64)
    )
    torch.testing.assert_close(
        log_probs.grad, torch.tensor([-s0, -s0, 0.0, 0.0], dtype=torch.float64)
    )
    assert output.clipped_low.tolist() == [False, False, False, True]
    assert not output.clipped_high.any()
    # the paper's tiny default range clips sequence 0 at 1 + 4e-4
    default_output = gspo_policy_loss(
        log_probs.detach(),
        torch.zeros(4, dtype=torch.float64),
        torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=torch.float64),
        torch.tensor([1, 1, 0, 1]),
        torch.tensor([0, 0, 0, 1]),
        PolicyLossConfig(),
    )
    torch.testing.assert_close(
        default_output.token_loss[:2], torch.full((2,), -1.0004, dtype=torch.float64)
    )
    assert default_output.clipped_high.tolist() == [True, True, False, False]


def test_sapo_gate_hand_values() -> None:
    # f(r) = sigmoid(tau (r - 1)) * 4 / tau, loss = -f(r) A, d loss/d logp = -A 4 s (1 - s) r with
    # s = sigmoid(tau (r - 1)); tau_pos = 1 (A > 0), tau_neg = 1.05 (A <= 0).
    #   r=1,   A=+1: s = 0.5,                      loss = -2,                   grad -1
    #   r=1.5, A=+1: s = sigmoid(0.5)  = 0.6224593, loss = -2.4898373,           grad -1.4100223
    #   r=1,   A=-1: s = 0.5,                      loss = 2 / 1.05 = 1.9047619, grad +1
    #   r=0.5, A=-1: s = sigmoid(-0.525) = 0.3716838, loss = 1.4159383,          grad +0.4670699
    output, grad = run_loss("sapo", [1.0, 1.5, 1.0, 0.5], [1, 1, -1, -1])
    torch.testing.assert_close(
        output.token_loss,
        torch.tensor([-2.0, -2.4898373, 1.9047619, 1.4159383], dtype=torch.float64),
        atol=1e-7,
        rtol=0,
    )
    torch.testing.assert_close(
        grad,
        torch.tensor([-1.0, -1.4100223, 1.0, 0.4670699], dtype=torch.float64),
        atol=1e-7,
        rtol=0,
    )
    assert not (output.clipped_low | output.clipped_high | output.dual_clipped).any()


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_masked_positions_may_hold_non_finite_values(name: str) -> None:
    log_probs = torch.tensor([-1.0, -math.inf, math.nan], dtype=torch.float64, requires_grad=True)
    output = get_policy_loss(name)(
        log_probs,
        torch.tensor([-1.1, math.nan, -math.inf], dtype=torch.float64),
        torch.tensor([1.0, math.inf, math.nan], dtype=torch.float64),
        torch.tensor([1.0, 0.0, 0.0]),
        torch.tensor([0, 0, 1]),
        PolicyLossConfig(),
    )
    output.token_loss.sum().backward()
    assert torch.isfinite(output.token_loss).all()
    assert output.token_loss[1:].tolist() == [0.0, 0.0]
    assert torch.isfinite(log_probs.grad).all()
    assert log_probs.grad[1:].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_non_finite_advantages_at_loss_tokens_are_rejected(name: str) -> None:
    mask = torch.tensor([True, True, False])  # the third non-finite value is masked out
    with pytest.raises(ValueError, match=r"\badvantages has 2 non-finite value"):
        get_policy_loss(name)(
            torch.tensor([-1.0, -2.0, -3.0]),
            torch.tensor([-1.0, -2.0, -3.0]),
            torch.tensor([math.nan, -math.inf, math.inf]),
            mask,
            torch.zeros(3, dtype=torch.int64),
            PolicyLossConfig(),
        )


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("model", ["log_probs", "old_log_probs"])
def test_non_finite_model_log_probs_reach_the_loss(name: str, model: str) -> None:
    """An overflow in a model (pi_theta, or pi_old recomputed by the trainer) is not a data
    error: the loss turns non-finite (and the trainer skips or stops on it), it does not raise."""
    tensors = {
        "log_probs": torch.tensor([-1.0, -2.0, -3.0]),
        "old_log_probs": torch.tensor([-1.0, -2.0, -3.0]),
    }
    tensors[model] = torch.tensor([-1.0, math.nan, -3.0])
    output = get_policy_loss(name)(
        tensors["log_probs"],
        tensors["old_log_probs"],
        torch.tensor([1.0, 1.0, 1.0]),
        torch.tensor([True, True, True]),
        torch.zeros(3, dtype=torch.int64),
        PolicyLossConfig(),
    )
    assert not torch.isfinite(output.token_loss.sum())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("eps_low", 1.0, r"eps_low must be in \[0, 1\), got 1.0"),
        ("eps_low", -0.1, r"eps_low must be in \[0, 1\), got -0.1"),
        ("eps_high", -0.01, "eps_high must be finite and >= 0, got -0.01"),
        ("eps_high", math.nan, "eps_high must be finite and >= 0, got nan"),
        ("gspo_eps_low", 1.5, r"gspo_eps_low must be in \[0, 1\), got 1.5"),
        ("gspo_eps_high", math.inf, "gspo_eps_high must be finite and >= 0, got inf"),
        ("dual_clip_c", 1.0, "dual_clip_c must be finite and > 1, got 1.0"),
        ("dual_clip_c", 0.5, "dual_clip_c must be finite and > 1, got 0.5"),
        ("sapo_tau_pos", 0.0, "sapo_tau_pos must be finite and > 0, got 0.0"),
        ("sapo_tau_neg", -1.0, "sapo_tau_neg must be finite and > 0, got -1.0"),
    ],
)
def test_config_bounds_are_validated(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=f"PolicyLossConfig.{message}"):
        PolicyLossConfig(**{field: value})


def test_input_layout_is_validated() -> None:
    ones = torch.ones(3)
    with pytest.raises(ValueError, match=r"advantages has shape \(2,\), log_probs has \(3,\)"):
        dapo_policy_loss(ones, ones, torch.ones(2), ones, torch.zeros(3, dtype=torch.int64), DAPO)
    with pytest.raises(ValueError, match=r"sequence_ids must be int64, got torch\.int32"):
        dapo_policy_loss(ones, ones, ones, ones, torch.zeros(3, dtype=torch.int32), DAPO)


def test_padded_layout_matches_packed() -> None:
    # [B=2, S=3] padded with per-row sequence ids vs the same 4 loss tokens packed.
    log_probs = torch.tensor([[-0.5, -1.0, 0.0], [-2.0, 0.0, 0.0]], dtype=torch.float64)
    old = torch.tensor([[-0.7, -0.9, 0.0], [-1.5, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    rows = torch.arange(2).unsqueeze(1).expand(2, 3)
    for name in POLICY_LOSSES:
        loss = get_policy_loss(name)
        padded = loss(log_probs, old, advantages, mask, rows, DAPO)
        keep = mask.bool()
        packed = loss(log_probs[keep], old[keep], advantages[keep], mask[keep], rows[keep], DAPO)
        torch.testing.assert_close(padded.token_loss[keep], packed.token_loss)


def test_registry_and_paper_recipes() -> None:
    assert set(POLICY_LOSSES) == {"dapo", "grpo", "gspo", "dr_grpo", "sapo"}
    assert set(PAPER_RECIPES) == set(POLICY_LOSSES)
    for recipe in PAPER_RECIPES.values():
        assert recipe.advantage_estimator in ADVANTAGE_ESTIMATORS
        assert recipe.loss_aggregation in LOSS_AGGREGATIONS
    assert PAPER_RECIPES["dapo"].loss_aggregation == "token-mean"
    assert PAPER_RECIPES["dr_grpo"].loss_aggregation == "seq-mean-token-sum-norm"
    assert PAPER_RECIPES["dr_grpo"].advantage_estimator == "dr_grpo"
    assert PAPER_RECIPES["dr_grpo"].conflicts("grpo", "token-mean") == [
        "advantage_estimator 'grpo' (the recipe has 'dr_grpo')",
        "loss_aggregation 'token-mean' (the recipe has 'seq-mean-token-sum-norm')",
    ]
    assert PAPER_RECIPES["dapo"].conflicts("dr_grpo", "seq-mean-token-mean") == []  # ablations
    assert POLICY_LOSSES["dapo"] is dapo_policy_loss and POLICY_LOSSES["sapo"] is sapo_policy_loss
    with pytest.raises(
        ValueError, match=r"unknown policy loss 'ppo'; valid names: \['dapo', 'dr_grpo'"
    ):
        get_policy_loss("ppo")
