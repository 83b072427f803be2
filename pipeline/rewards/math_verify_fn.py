"""In-process math-verify reward; meant to run in a worker's main thread (see math_verify_reward).

math-verify bounds its own parsing and comparison with ``signal.alarm``, which raises in any
thread but the main one; :class:`pipeline.rewards.math_verify_reward.MathVerifyScorer` runs this
function in worker processes and adds a hard outer deadline.
"""

from __future__ import annotations

from math_verify import parse, verify

from pipeline.rewards.base import RewardResult
from pipeline.rewards.dapo_math import extract_final_answer

PARSE_TIMEOUT_S = 3
"""math-verify's alarm-based limit per parse call, whole seconds."""
VERIFY_TIMEOUT_S = 3
"""math-verify's alarm-based limit per (gold, prediction) comparison, whole seconds."""


def math_verify_reward(response: str, ground_truth: str) -> RewardResult:
    """Reward one response by mathematical equivalence (math-verify).

    The prediction is the text after the last ``Answer:`` (DAPO-Math format), parsed as LaTeX
    math (wrapped in ``$...$``); without an ``Answer:`` line, or when nothing follows the last
    one (``extract_final_answer`` gives None), the whole response is parsed
    (``\\boxed{}``, ``$...$`` and plain expressions, math-verify's defaults). The ground truth
    is parsed as ``\\boxed{ground_truth}``.

    Returns:
        +1 / -1 with ``acc``; ``extracted`` is the prediction's matched text as math-verify
        read it, None if nothing parsed.
    """
    answer = extract_final_answer(response)
    prediction_text = response if answer is None else f"${answer}$"
    prediction = parse(prediction_text, parsing_timeout=PARSE_TIMEOUT_S)
    gold = parse(f"\\boxed{{{ground_truth}}}", parsing_timeout=PARSE_TIMEOUT_S)
    acc = bool(prediction and gold) and verify(gold, prediction, timeout_seconds=VERIFY_TIMEOUT_S)
    return RewardResult.from_correctness(acc, str(prediction[-1]) if prediction else None)
