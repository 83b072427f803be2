"""DAPO-Math rule reward: the final ``Answer: X`` line, normalised, compared as a string.

DAPO-Math-17k prompts end with 'Remember to put your answer on its own line after "Answer:"'.
The reward follows the DAPO reference scorer (verl ``utils/reward_score/math_dapo.py``,
``is_correct_minerva`` + ``normalize_final_answer``): take the text after the *last*
``Answer:`` (case-insensitive), normalise prediction and ground truth the same way, and
return +1 if they are equal, -1 otherwise (also when no answer is found).

Normalisation (:func:`normalize_answer`), in order:

1. ``\\$`` (escaped dollar) removed; the Unicode minus replaced by ``-``.
2. If the text holds a math segment (``$...$``, ``$$...$$``, ``\\(...\\)``, ``\\[...\\]``),
   only the first segment's content is kept (drops surrounding prose); stray ``$`` removed.
3. ``\\boxed``, ``\\fbox``, ``\\text``, ``\\textbf``, ``\\textit``, ``\\mathrm``, ``\\mathbf``,
   ``\\mbox`` are unwrapped to their (brace-balanced) argument.
4. Only the part after the last ``=`` is kept (``x = 5`` -> ``5``).
5. ``\\left``, ``\\right``, ``\\displaystyle``, spacing commands (``\\!``, ``\\,``, ``\\;``,
   ``\\:``, ``\\ ``), degree marks (``^\\circ``) and the LaTeX thousands separator ``{,}``
   are removed; ``\\dfrac`` and ``\\tfrac`` become ``\\frac``.
6. Unit and filler words of the reference list (dollars, cm, degrees, units, ...) are removed
   as whole lowercase words, singular or plural.
7. All whitespace is removed; a trailing period is removed.
8. Shorthand TeX gets braces (``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt2`` -> ``\\sqrt{2}``)
   and an integer ratio ``a/b`` becomes ``\\frac{a}{b}``.
9. Thousands separators are removed from numbers (``1,000`` -> ``1000``).

Two normalised answers that are both plain decimal numbers are compared by value
(``0.50`` == ``0.5``); any other pair must match exactly.

Deliberate differences from the reference: its substring replacements of ``"a "``, ``"an "``
and unit words inside other words are replaced by whole-word removal; commas are removed only
when they form thousands groups (the reference turns ``1,2`` into ``12``); the response is not
truncated to its last 300 characters.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from pipeline.rewards.base import RewardResult

_ANSWER_LINE = re.compile(r"Answer[\s*]*:\s*([^\n]+)", re.IGNORECASE)
_MATH_SEGMENT = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_WRAPPER_COMMAND = re.compile(r"\\(?:boxed|fbox|text|textbf|textit|mathrm|mathbf|mbox)\s*\{")
_REMOVED_LATEX = re.compile(
    r"\\(?:left|right|displaystyle)(?![A-Za-z])|\\[!,;: ]|\^\s*\{?\\circ\}?|\{,\}"
)
_FRAC_VARIANT = re.compile(r"\\[dt]frac(?![A-Za-z])")
_UNIT_WORDS = re.compile(
    r"\b(?:square|way|integer|dollar|mph|inch|hour|km|unit|point|foot|feet|minute|digit|cent"
    r"|degree|cm|gm|pound|meter|meal|edge|student|multiple)(?:es|s)?\b"
)
_WHITESPACE = re.compile(r"\s+")
_FRAC_FIRST_ARG = re.compile(r"\\frac([^{\\])")
_FRAC_SECOND_ARG = re.compile(r"(\\frac\{[^{}]*\})([^{\\])")
_SQRT_ARG = re.compile(r"\\sqrt([^{\\\[])")
_INT_RATIO = re.compile(r"(-?)(\d+)/(\d+)")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")


def extract_final_answer(response: str) -> str | None:
    """The raw text after the last ``Answer:`` in ``response``, or None.

    The match is case-insensitive, tolerates markdown bold (``**Answer:** 5``) and spans to
    the end of the line; surrounding whitespace and ``*`` are stripped. An empty last answer
    gives None.
    """
    matches = _ANSWER_LINE.findall(response)
    if not matches:
        return None
    answer = matches[-1].strip().strip("*").strip()
    return answer or None


def _unwrap_commands(text: str) -> str:
    """Replace each wrapper command (``\\boxed{x}``, ``\\text{x}``, ...) by `` x ``.

    Spaces keep unwrapped words separate (``5\\text{cm}`` -> ``5 cm``) and are removed later.
    An unbalanced command loses only its ``\\name{`` prefix.
    """
    while match := _WRAPPER_COMMAND.search(text):
        depth, end = 1, match.end()
        while end < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        if depth:
            text = text[: match.start()] + text[match.end() :]
        else:
            text = f"{text[: match.start()]} {text[match.end() : end - 1]} {text[end:]}"
    return text


def normalize_answer(text: str) -> str:
    """Canonical string form of an answer; the steps are listed in the module docstring."""
    text = text.replace("\\$", "").replace("\u2212", "-")
    segment = _MATH_SEGMENT.search(text)
    if segment:
        text = next(group for group in segment.groups() if group is not None)
    text = _unwrap_commands(text.replace("$", ""))
    text = text.rsplit("=", 1)[-1]
    text = _FRAC_VARIANT.sub(r"\\frac", _REMOVED_LATEX.sub(" ", text))
    text = _WHITESPACE.sub("", _UNIT_WORDS.sub(" ", text)).rstrip(".")
    text = _FRAC_FIRST_ARG.sub(r"\\frac{\1}", text)
    text = _FRAC_SECOND_ARG.sub(r"\1{\2}", text)
    text = _SQRT_ARG.sub(r"\\sqrt{\1}", text)
    if _INT_RATIO.fullmatch(text):
        text = _INT_RATIO.sub(r"\1\\frac{\2}{\3}", text)
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    return text


def _as_decimal(text: str) -> Decimal | None:
    """The value of a plain decimal number, None for anything else."""
    if not _DECIMAL.fullmatch(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def answers_match(prediction: str, ground_truth: str) -> bool:
    """Whether two *normalised* answers are equal (by value if both are decimal numbers)."""
    if not prediction:
        return False
    if prediction == ground_truth:
        return True
    pred_value, truth_value = _as_decimal(prediction), _as_decimal(ground_truth)
    return pred_value is not None and pred_value == truth_value


def dapo_math_reward(response: str, ground_truth: str) -> RewardResult:
    """DAPO-Math rule reward of one response.

    Args:
        response: the generated text.
        ground_truth: the reference answer (e.g. ``"34"``; normalised like the prediction).

    Returns:
        score +1 / -1, ``acc``, and ``extracted`` = the normalised prediction (None when the
        response has no ``Answer:`` line or the answer normalises to an empty string).
    """
    raw = extract_final_answer(response)
    prediction = normalize_answer(raw) if raw is not None else ""
    acc = answers_match(prediction, normalize_answer(ground_truth))
    return RewardResult.from_correctness(acc, prediction or None)
