"""Final-number reward: the last number the response writes is its answer.

For arithmetic tasks with numeric answers whose responses show their working (GSM8K's
"flexible extract" of lm-evaluation-harness): the answer is the last number on the line of the
last ``Answer:`` (:func:`pipeline.rewards.dapo_math.extract_final_answer`), or, without such a
line, the last number of the whole response. Unlike math-verify's whole-response fallback it
never evaluates an expression, so restating the question (``"5 + 9 + 7 = N."`` with a wrong or
missing N) is not rewarded: only the number written last counts.

Numbers are optionally signed integers or decimals, with or without thousands separators
(``1,234.5``); they are compared like `dapo_math` compares answers (normalised, then by value:
``"21.0"`` equals ``"21"``).
"""

from __future__ import annotations

import re

from pipeline.rewards.base import RewardResult
from pipeline.rewards.dapo_math import answers_match, extract_final_answer, normalize_answer

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number written in `text` (as written), None if it has none."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def final_number_reward(response: str, ground_truth: str) -> RewardResult:
    """+1 if the response's final number equals the numeric ground truth, else -1.

    Args:
        response: the generated text.
        ground_truth: the reference answer, a number (``"21"``, ``"-3"``, ``"1,024"``, ``"2.5"``).

    Returns:
        the result; ``extracted`` is the final number as written, None if the response (or its
        ``Answer:`` line) holds no number.

    Raises:
        ValueError: if the ground truth is not a number (the reward cannot judge that task).
    """
    truth = ground_truth.strip()
    if not _NUMBER.fullmatch(truth):
        raise ValueError(f"final_number needs a numeric ground truth, got {ground_truth!r}")
    answer_line = extract_final_answer(response)
    prediction = last_number(response if answer_line is None else answer_line)
    acc = prediction is not None and answers_match(
        normalize_answer(prediction), normalize_answer(truth)
    )
    return RewardResult.from_correctness(acc, prediction)
