"""Final-number reward: the last number written is the answer, compared by value."""

import pytest

from pipeline.rewards import get_reward_scorer
from pipeline.rewards.final_number import final_number_reward, last_number


@pytest.mark.parametrize(
    ("response", "ground_truth", "extracted", "acc"),
    [
        ("5 + 9 = 14, then 14 + 7 = 21.\nAnswer: 21", "21", "21", True),
        ("5 + 9 = 14, 14 + 7 = 21.\nAnswer: 20 or so", "21", "20", False),  # the line decides
        ("First 5 + 9 = 14. Then 14 + 7 = 21.", "21", "21", True),  # no Answer: line
        ("**Answer:** The total is 21.", "21", "21", True),
        ("Answer: 21.0", "21", "21.0", True),  # by value
        ("Answer: 1,024", "1024", "1,024", True),
        ("Answer: -3", "-3", "-3", True),
        ("Answer: 3", "-3", "3", False),
        ("Answer: 2.5", "2.5", "2.5", True),
        ("Answer: twenty-one", "21", None, False),  # no number on the line
        ("I do not know.", "21", None, False),
        # math-verify's whole-response fallback scored such restated sums as correct (it
        # evaluates the expression); here the last number written is the last term
        ("The sum is 5 + 9 + 7.", "21", "7", False),
        ("5 + 9 + 7 = ", "21", "7", False),
    ],
)
def test_final_number(response: str, ground_truth: str, extracted: str | None, acc: bool) -> None:
    result = final_number_reward(response, ground_truth)
    assert (result.extracted, result.acc, result.score) == (extracted, acc, 1.0 if acc else -1.0)


def test_last_number_keeps_thousands_and_decimals() -> None:
    assert last_number("from 1,234.5 to 7") == "7"
    assert last_number("from 7 to 1,234.5") == "1,234.5"
    assert last_number("none") is None


def test_non_numeric_ground_truth_fails_with_the_value() -> None:
    with get_reward_scorer("final_number") as scorer:
        result = scorer.score("Answer: 7", "seven")
    assert result.score == -1.0 and not result.acc
    assert result.error is not None
    assert "numeric ground truth" in result.error and "'seven'" in result.error
