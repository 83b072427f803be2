"""pass@k and mean@k against hand-computed values, and their invariants."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.eval_metrics import averaged_over_prompts, mean_at_k, pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (4, 1, 1, 0.25),
        (4, 0, 4, 0.0),
        (4, 1, 4, 1.0),
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 5, 1 - 21 / 252),  # C(7,5)=21, C(10,5)=252
        (3, 3, 1, 1.0),
    ],
)
def test_pass_at_k_hand_computed(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample() -> None:
    samples = [True, False, False, True, False]
    for k in range(1, 6):
        subsets = list(itertools.combinations(samples, k))
        assert pass_at_k(5, 2, k) == pytest.approx(sum(map(any, subsets)) / len(subsets))


def test_mean_at_k_is_c_over_n_and_the_k_subset_mean() -> None:
    assert mean_at_k(4, 1, 2) == 0.25
    samples = [True, False, False, True, False]
    subsets = list(itertools.combinations(samples, 3))
    expected = sum(sum(s) / 3 for s in subsets) / len(subsets)
    assert mean_at_k(5, 2, 3) == pytest.approx(expected)


def test_averaged_over_prompts() -> None:
    correct = [[True, False, False, False], [True, True, False, False]]
    metrics = averaged_over_prompts(correct, [1, 2])
    # prompt 1: pass@2 = 0.5; prompt 2: 1 - C(2,2)/C(4,2) = 5/6
    assert metrics == pytest.approx(
        {"mean@1": 0.375, "pass@1": 0.375, "mean@2": 0.375, "pass@2": (0.5 + 5 / 6) / 2}
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: pass_at_k(4, 1, 5), r"k=5 must be in \[1, n=4\]"),
        (lambda: pass_at_k(4, 5, 1), "0 <= c <= n"),
        (lambda: mean_at_k(0, 0, 1), "n >= 1"),
        (lambda: averaged_over_prompts([], [1]), "no prompts"),
        (lambda: averaged_over_prompts([[True], [True, False]], [1]), "same number of samples"),
    ],
)
def test_bad_input_is_refused(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@given(st.lists(st.lists(st.booleans(), min_size=6, max_size=6), min_size=1, max_size=5))
def test_invariants(correct: list[list[bool]]) -> None:
    metrics = averaged_over_prompts(correct, range(1, 7))
    assert metrics["pass@1"] == pytest.approx(metrics["mean@1"])
    for k in range(1, 7):
        assert 0.0 <= metrics[f"mean@{k}"] <= metrics[f"pass@{k}"] + 1e-12 <= 1.0 + 1e-12
        if k > 1:
            assert metrics[f"pass@{k}"] >= metrics[f"pass@{k - 1}"] - 1e-12
