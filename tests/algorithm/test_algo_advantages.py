"""Group advantages against hand-derived values and their edge cases."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_dapo.algo.aggregation import broadcast_to_tokens
from pipeline.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageConfig,
    compute_advantages,
    dr_grpo_advantages,
    get_advantage_estimator,
    grpo_advantages,
)

NO_EPS = AdvantageConfig(std_eps=0.0)

# Hand example, one group of G = 4: R = [1, -1, -1, -1]
#   mean = -0.5, R - mean = [1.5, -0.5, -0.5, -0.5], sum of squares = 2.25 + 3 * 0.25 = 3
#   unbiased   std = sqrt(3 / 3) = 1          -> A = [1.5, -0.5, -0.5, -0.5]
#   population std = sqrt(3 / 4) = sqrt(3)/2  -> A = [sqrt(3), -1/sqrt(3), -1/sqrt(3), -1/sqrt(3)]
HAND_REWARDS = torch.tensor([[1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)


def test_grpo_unbiased_std_hand_example() -> None:
    expected = torch.tensor([[1.5, -0.5, -0.5, -0.5]], dtype=torch.float64)
    torch.testing.assert_close(grpo_advantages(HAND_REWARDS, NO_EPS), expected)


def test_grpo_population_std_hand_example() -> None:
    third = 1 / math.sqrt(3)
    expected = torch.tensor([[math.sqrt(3), -third, -third, -third]], dtype=torch.float64)
    population = AdvantageConfig(std_eps=0.0, unbiased_std=False)
    torch.testing.assert_close(grpo_advantages(HAND_REWARDS, population), expected)


def test_grpo_std_eps_is_added_to_std() -> None:
    # unbiased std = 1, so A_0 = 1.5 / (1 + 1e-6)
    advantages = grpo_advantages(HAND_REWARDS, AdvantageConfig(std_eps=1e-6))
    assert advantages[0, 0].item() == pytest.approx(1.5 / (1 + 1e-6), rel=1e-12)


def test_dr_grpo_is_centered_reward_without_std() -> None:
    expected = torch.tensor([[1.5, -0.5, -0.5, -0.5]], dtype=torch.float64)
    torch.testing.assert_close(dr_grpo_advantages(HAND_REWARDS * 1, NO_EPS), expected)
    # Scaling the rewards scales Dr. GRPO's advantages but not GRPO's.
    torch.testing.assert_close(dr_grpo_advantages(HAND_REWARDS * 3, NO_EPS), 3 * expected)
    torch.testing.assert_close(
        grpo_advantages(HAND_REWARDS * 3, NO_EPS), grpo_advantages(HAND_REWARDS, NO_EPS)
    )


@pytest.mark.parametrize("name", ["grpo", "dr_grpo"])
@pytest.mark.parametrize("std_eps", [0.0, 1e-6])
def test_zero_std_groups_give_exact_zeros(name: str, std_eps: float) -> None:
    # mean(0.1, 0.1, 0.1) != 0.1 in floating point; the estimators must still return exact 0.
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 0.0, 0.0], [-1.0, -1.0, -1.0]])
    advantages = get_advantage_estimator(name)(rewards, AdvantageConfig(std_eps=std_eps))
    assert torch.equal(advantages[0], torch.zeros(3))
    assert torch.equal(advantages[2], torch.zeros(3))
    assert torch.all(advantages[1] != 0)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo"])
@pytest.mark.parametrize("unbiased_std", [True, False])
def test_group_size_one_gives_zeros(name: str, unbiased_std: bool) -> None:
    rewards = torch.tensor([[1.0], [-1.0], [0.3]])
    advantages = get_advantage_estimator(name)(
        rewards, AdvantageConfig(std_eps=0.0, unbiased_std=unbiased_std)
    )
    assert torch.equal(advantages, torch.zeros(3, 1))


def test_rejects_non_finite_rewards_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="rewards has 2 non-finite value"):
        grpo_advantages(torch.tensor([[1.0, math.nan], [math.inf, 0.0]]), NO_EPS)
    with pytest.raises(ValueError, match=r"\[num_groups, G\]"):
        grpo_advantages(torch.ones(4), NO_EPS)
    with pytest.raises(ValueError, match="floating"):
        grpo_advantages(torch.ones(2, 2, dtype=torch.int64), NO_EPS)
    with pytest.raises(ValueError, match="std_eps\n  Input should be greater than or equal to 0"):
        AdvantageConfig(std_eps=-1.0)
    with pytest.raises(ValueError, match="std_eps\n  Input should be a finite number"):
        AdvantageConfig(std_eps=math.inf)


def test_registry_lists_valid_names() -> None:
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "dr_grpo"}
    with pytest.raises(
        ValueError, match=r"unknown advantage estimator 'rloo'.*\['dr_grpo', 'grpo'\]"
    ):
        get_advantage_estimator("rloo")
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'rloo'"):
        AdvantageConfig(estimator="rloo")


def test_compute_advantages_runs_the_configured_estimator() -> None:
    # R = [1, -1, -1, -1]: grpo (unbiased std 1) -> [1.5, -0.5, ...]; dr_grpo -> R - mean
    rewards = torch.tensor([[1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    grpo = compute_advantages(rewards, AdvantageConfig(estimator="grpo", std_eps=0.0))
    dr_grpo = compute_advantages(rewards, AdvantageConfig(estimator="dr_grpo"))
    assert grpo.tolist() == [[1.5, -0.5, -0.5, -0.5]]
    # population std sqrt(3)/2 plus std_eps 0.5: 1.5 / (0.8660254 + 0.5) = 1.0980762
    eps = compute_advantages(rewards, AdvantageConfig(std_eps=0.5, unbiased_std=False))
    assert eps[0, 0].item() == pytest.approx(1.5 / (math.sqrt(3) / 2 + 0.5))
    assert dr_grpo.tolist() == [[1.5, -0.5, -0.5, -0.5]] and dr_grpo is not grpo


def test_broadcast_to_tokens_packed_and_padded() -> None:
    values = torch.tensor([10.0, 20.0, 30.0])
    # packed: the id 7 of a masked-out padding token is ignored
    ids = torch.tensor([0, 0, 1, 2, 2, 7])
    mask = torch.tensor([1, 1, 1, 1, 0, 0])
    assert broadcast_to_tokens(values, ids, mask).tolist() == [10.0, 10.0, 20.0, 30.0, 0.0, 0.0]
    # padded [B, S]: sequence id = row index
    rows = torch.arange(3).unsqueeze(1).expand(3, 2)
    padded_mask = torch.tensor([[True, True], [True, False], [False, False]])
    expected = [[10.0, 10.0], [20.0, 0.0], [0.0, 0.0]]
    assert broadcast_to_tokens(values, rows, padded_mask).tolist() == expected


@settings(deadline=None, max_examples=60)
@given(
    st.lists(
        st.lists(st.sampled_from([-1.0, 0.0, 0.5, 1.0]), min_size=2, max_size=8),
        min_size=1,
        max_size=4,
    ).filter(lambda groups: len({len(group) for group in groups}) == 1)
)
def test_grpo_groups_are_standardised(groups: list[list[float]]) -> None:
    rewards = torch.tensor(groups, dtype=torch.float64)
    advantages = grpo_advantages(rewards, NO_EPS)
    assert torch.isfinite(advantages).all()
    for row_rewards, row in zip(rewards, advantages, strict=True):
        if torch.all(row_rewards == row_rewards[0]):
            assert torch.equal(row, torch.zeros_like(row))
        else:
            assert row.mean().item() == pytest.approx(0.0, abs=1e-12)
            assert row.std().item() == pytest.approx(1.0, rel=1e-12)
