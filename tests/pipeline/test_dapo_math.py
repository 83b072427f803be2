"""DAPO-Math rule reward: final ``Answer:`` line, normalisation, +1 / -1."""

import pytest

from pipeline.rewards.dapo_math import dapo_math_reward, extract_final_answer, normalize_answer

CASES = [
    # (response, ground truth, expected acc, expected extracted)
    ("Let me compute.\nAnswer: 42", "42", True, "42"),
    ("Answer: 41", "42", False, "41"),
    ("First try.\nAnswer: 3\nWait, that is wrong.\nAnswer: 5", "5", True, "5"),
    ("First try.\nAnswer: 5\nWait, that is wrong.\nAnswer: 3", "5", False, "3"),
    ("The answer is 42.", "42", False, None),
    ("Answer:", "42", False, None),
    ("Answer: \\boxed{42}", "42", True, "42"),
    ("Answer: $42$", "42", True, "42"),
    ("Answer: $\\boxed{\\dfrac{1}{2}}$.", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("Answer: 42.", "42", True, "42"),
    ("answer:   42  ", "42", True, "42"),
    ("**Answer:** 42", "42", True, "42"),
    ("Answer: 1,000", "1000", True, "1000"),
    ("Answer: 1000", "1,000", True, "1000"),
    ("Answer: 1{,}000", "1000", True, "1000"),
    ("Answer: 1,2", "12", False, "1,2"),
    ("Answer: \\frac{1}{2}", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("Answer: \\frac12", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("Answer: 1/2", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("Answer: \\frac{1}{3}", "\\frac{1}{2}", False, "\\frac{1}{3}"),
    ("Answer: \\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", True, "\\frac{\\sqrt{3}}{2}"),
    ("Answer: x = 5", "5", True, "5"),
    ("Answer: 5 \\text{ cm}", "5", True, "5"),
    ("Answer: 16 square units", "16", True, "16"),
    ("Answer: The total is $7$ dollars.", "7", True, "7"),
    ("Answer: 90^\\circ", "90", True, "90"),
    ("Answer: \\$5", "5", True, "5"),
    ("Answer: 0.50", "0.5", True, "0.50"),
    ("Answer: \u22123", "-3", True, "-3"),
    ("Answer: \\left(1,2\\right)", "(1,2)", True, "(1,2)"),
    ("Answer: 34", "\\boxed{34}", True, "34"),
    # A unit alone in \text{} / \mathrm{} goes, single-letter symbols included.
    ("Answer: 12\\text{ m}", "12", True, "12"),
    ("Answer: 13\\text{ m}", "12", False, "13"),
    ("Answer: 5\\text{s}", "5", True, "5"),
    ("Answer: 6\\text{s}", "5", False, "6"),
    ("Answer: 3\\,\\mathrm{m/s}", "3", True, "3"),
    ("Answer: 4\\,\\mathrm{m/s}", "3", False, "4"),
    # ... with the ^2 / ^3 of the unit; a bare unit word also takes its power along.
    ("Answer: $48\\text{ cm}^2$", "48", True, "48"),
    ("Answer: $47\\text{ cm}^2$", "48", False, "47"),
    ("Answer: 48\\text{ m}^{3}", "48", True, "48"),
    ("Answer: 48 cm^2", "48", True, "48"),
    ("Answer: 48 cm^2", "48^2", False, "48"),
    ("Answer: 48^2", "48", False, "48^2"),
    # \text{ and } between list items is the list comma.
    ("Answer: 3\\text{ and }5", "3, 5", True, "3,5"),
    ("Answer: 3\\text{ and }6", "3, 5", False, "3,6"),
    ("Answer: 1, 2, \\text{ and } 3", "1, 2, 3", True, "1,2,3"),
    # Quoted answers; primes stay.
    ('Answer: "42"', "42", True, "42"),
    ('Answer: "41"', "42", False, "41"),
    ("Answer: '42'.", "42", True, "42"),
    ("Answer: '41'.", "42", False, "41"),
    ("Answer: \u201c42\u201d", "42", True, "42"),
    ("Answer: ``42''", "42", True, "42"),
    ("Answer: f'(2)", "f'(2)", True, "f'(2)"),
    # Ellipses.
    ("Answer: 0.333\\ldots", "0.333", True, "0.333"),
    ("Answer: 0.334\\ldots", "0.333", False, "0.334"),
    ("Answer: 1, 2, 3, \\dots", "1, 2, 3, ...", True, "1,2,3,"),
    ("Answer: 1, 2, 4, \\dots", "1, 2, 3, ...", False, "1,2,4,"),
    # Bare letters may be variables: never removed as units.
    ("Answer: 2m", "2", False, "2m"),
    ("Answer: 12 m", "12", False, "12m"),
    ("Answer: 5 s", "5", False, "5s"),
    ("Answer: m", "m", True, "m"),
    ("Answer: 2x", "2x", True, "2x"),
    ("Answer: a+b", "a+b", True, "a+b"),
    ("Answer: \\text{A}", "A", True, "A"),
    # An empty last answer never matches, even an empty-ish ground truth or an earlier answer.
    ("Answer: 5\nAnswer:", "5", False, None),
    ("Answer: 5\nAnswer: **\n\n", "5", False, None),
    ("Answer:", "", False, None),
    ("Answer: $ $", "", False, None),
    ("Answer: \\text{ cm}", "\\text{ m}", False, None),
    ("**Answer:**\n42", "42", True, "42"),
]


@pytest.mark.parametrize(("response", "truth", "acc", "extracted"), CASES)
def test_reward_table(response: str, truth: str, acc: bool, extracted: str | None) -> None:
    result = dapo_math_reward(response, truth)
    assert (result.acc, result.extracted) == (acc, extracted)
    assert result.score == (1.0 if acc else -1.0)
    assert not result.timed_out


def test_extract_final_answer() -> None:
    assert extract_final_answer("no answer here") is None
    assert extract_final_answer("Answer: a\nAnswer: b\n") == "b"
    assert extract_final_answer("Answer:\n7") == "7"
    assert extract_final_answer("Answer: 7\nAnswer:  \n") is None
    assert extract_final_answer("**Answer:**\n\n**7**") == "7"


def test_normalize_is_idempotent_on_table() -> None:
    for response, truth, _, _ in CASES:
        for text in (extract_final_answer(response) or "", truth):
            once = normalize_answer(text)
            assert normalize_answer(once) == once


@pytest.mark.parametrize(
    ("response", "truth", "acc"),
    [
        ("7", "7", True),
        ("  7\n", "7", True),
        ("7.", "7", False),
        ("17", "7", False),
        ("", "7", False),
    ],
)
def test_exact_match_reward(response: str, truth: str, acc: bool) -> None:
    from pipeline.rewards.exact_match import exact_match_reward

    result = exact_match_reward(response, truth)
    assert result.acc is acc and result.score == (1.0 if acc else -1.0)
