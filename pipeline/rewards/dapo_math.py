"""DAPO-Math rule reward: the final ``Answer: X`` line, normalised, compared as a string.

DAPO-Math-17k prompts end with 'Remember to put your answer on its own line after "Answer:"'.
The reward follows the DAPO reference scorer (verl ``utils/reward_score/math_dapo.py``,
``is_correct_minerva`` + ``normalize_final_answer``): take the text after the *last*
``Answer:`` (case-insensitive), normalise prediction and ground truth the same way, and
return +1 if they are equal, -1 otherwise (also when no answer is found).

The answer (:func:`extract_final_answer`) is the rest of the line of the last ``Answer:``
(``**Answer:** 5`` works); when that rest is blank, the next non-blank line is the answer
(``Answer:\\n5``). **Empty answers**: when nothing but whitespace and ``*`` follows the last
``Answer:`` (to the end of the response), the response has no answer and scores -1
(``acc`` False, ``extracted`` None) whatever the ground truth, even if an earlier
``Answer:`` line held the right value. An answer that normalises to the empty string
(``Answer: $ $``, ``Answer: \\text{ cm}``) is scored the same way, also against a ground truth
that itself normalises to the empty string: an empty prediction never matches.

Normalisation (:func:`normalize_answer`), in order:

1. ``\\$`` (escaped dollar) removed. If the text holds a math segment (``$...$``,
   ``$$...$$``, ``\\(...\\)``, ``\\[...\\]``), only the first segment's content is kept (drops
   surrounding prose); stray ``$`` removed.
2. The rewrite rules of ``_REWRITES``, in this order:

   a. the Unicode minus becomes ``-``;
   b. every double quote (``"``, ``“``, ``”``) is removed, and an answer wholly inside single
      quotes (``'42'``, ``‘42’``, LaTeX ````42''``; an optional period may follow) loses them;
      other single quotes stay (primes: ``f'(x)``);
   c. ``\\text{and}`` between list items (any spaces inside, a comma before it included)
      becomes the list separator ``,`` (``3\\text{ and }5``, ``3, \\text{and} 5`` -> ``3,5``);
   d. a unit alone inside ``\\text{}``, ``\\mathrm{}`` or ``\\mbox{}`` is removed with its
      command: a unit word of rule (h) or a unit symbol (``_UNIT_SYMBOLS``: ``m``, ``s``,
      ``kg``, ``h``, ...), optionally plural, optionally a ratio (``\\text{km/h}``), with a
      power ``^2`` / ``^3`` (also ``^{2}``, ``²``) inside or right after the braces
      (``12\\text{ m}`` -> ``12``, ``48\\text{ cm}^2`` -> ``48``);
   e. ``\\left``, ``\\right``, ``\\displaystyle``, spacing commands (``\\!``, ``\\,``, ``\\;``,
      ``\\:``, ``\\ ``), degree marks (``^\\circ``) and the LaTeX thousands separator ``{,}``
      are removed;
   f. ellipses are removed: ``\\ldots``, ``\\dots``, ``...`` and ``…``;
   g. ``\\dfrac`` and ``\\tfrac`` become ``\\frac``;
   h. unit and filler words of the reference list (``_UNIT_WORDS``: dollars, cm, degrees,
      units, ...) are removed as whole lowercase words, singular or plural, together with a
      power right after them (``48 cm^2`` -> ``48``).

3. ``\\boxed``, ``\\fbox``, ``\\text``, ``\\textbf``, ``\\textit``, ``\\mathrm``, ``\\mathbf``,
   ``\\mbox`` are unwrapped to their (brace-balanced) argument.
4. Only the part after the last ``=`` is kept (``x = 5`` -> ``5``).
5. All whitespace is removed; a trailing period is removed.
6. Shorthand TeX gets braces (``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt2`` -> ``\\sqrt{2}``)
   and an integer ratio ``a/b`` becomes ``\\frac{a}{b}``.
7. Thousands separators are removed from numbers (``1,000`` -> ``1000``).

Bare letters are never removed, as they may be variables: a unit symbol counts only inside
``\\text{}`` (the reference likewise removes only ``\\text{m}`` and ``\\text{s}``), so
``12 m`` stays ``12m`` and does not match ``12``, ``2m`` does not match ``2``, and ``m``
matches ``m``.

Two normalised answers that are both plain decimal numbers are compared by value
(``0.50`` == ``0.5``); any other pair must match exactly.

Deliberate differences from the reference: its substring replacements of ``"a "``, ``"an "``
and unit words inside other words are replaced by whole-word removal; commas are removed only
when they form thousands groups (the reference turns ``1,2`` into ``12``); the response is not
truncated to its last 300 characters. Rules the reference has in a narrower form: it removes
only ``\\text{m}`` and ``\\text{s}`` as unit symbols; it removes ``^2`` / ``^3`` only after an
emptied ``\\text{}`` (it turns ``48 cm^2`` into ``48^2``, which would then match the ground
truth ``48^2``); it removes ``\\ldots`` and ``\\dots`` but not ``...``; it strips no single
quotes. Its answer pattern skips an empty last ``Answer:`` and scores the previous one.
"""

from __future__ import annotations

import re
import string
from decimal import Decimal, InvalidOperation

from pipeline.rewards.base import RewardResult

_ANSWER_MARKER = re.compile(r"Answer[\s*]*:", re.IGNORECASE)
_BLANK_OR_STARS = string.whitespace + "*"
_MATH_SEGMENT = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_WRAPPER_COMMAND = re.compile(r"\\(?:boxed|fbox|text|textbf|textit|mathrm|mathbf|mbox)\s*\{")

_UNIT_WORDS = (
    "square", "way", "integer", "dollar", "mph", "inch", "hour", "km", "unit", "point", "foot",
    "feet", "minute", "digit", "cent", "degree", "cm", "gm", "pound", "meter", "meal", "edge",
    "student", "multiple",
)  # fmt: skip
"""Unit and filler words (the reference list, singular), removed anywhere as whole words."""
_UNIT_SYMBOLS = (
    "m", "mm", "s", "sec", "min", "h", "hr", "g", "kg", "mg", "L", "l", "mL", "ml", "ft", "yd",
    "lb", "oz",
)  # fmt: skip
"""Unit symbols, removed only inside ``\\text{}`` (a bare letter may be a variable)."""

_PLURAL = r"(?:es|s)?"
_POWER = r"(?:\s*(?:\^\s*(?:[23]|\{\s*[23]\s*\})|[\u00b2\u00b3]))?"
_SINGLE_QUOTED = r"\A\s*(?:'([^']*)'|\u2018([^\u2018\u2019]*)\u2019|``([^`']*)'')\s*\.?\s*\Z"
_TEXT_COMMAND = r"\\(?:text|mathrm|mbox)\s*"
_TEXT_UNIT_TERM = rf"(?:{'|'.join(_UNIT_WORDS + _UNIT_SYMBOLS)}){_PLURAL}{_POWER}"
_TEXT_UNIT = rf"{_TEXT_UNIT_TERM}(?:\s*/\s*{_TEXT_UNIT_TERM})?"

_REWRITES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        ("\u2212", "-"),  # a
        ('["\u201c\u201d]', ""),  # b
        (_SINGLE_QUOTED, r"\1\2\3"),  # b
        (rf"(?:,\s*)?{_TEXT_COMMAND}\{{\s*and\s*\}}", ","),  # c
        (rf"{_TEXT_COMMAND}\{{\s*{_TEXT_UNIT}\s*\}}{_POWER}", " "),  # d
        (r"\\(?:left|right|displaystyle)(?![A-Za-z])|\\[!,;: ]|\^\s*\{?\\circ\}?|\{,\}", " "),  # e
        (r"\\(?:ldots|dots)(?![A-Za-z])|\.{3,}|\u2026", " "),  # f
        (r"\\[dt]frac(?![A-Za-z])", r"\\frac"),  # g
        (rf"\b(?:{'|'.join(_UNIT_WORDS)}){_PLURAL}\b{_POWER}", " "),  # h
    )
)
"""Rule 2 of the module docstring: (pattern, replacement) pairs, applied in order."""

_WHITESPACE = re.compile(r"\s+")
_FRAC_FIRST_ARG = re.compile(r"\\frac([^{\\])")
_FRAC_SECOND_ARG = re.compile(r"(\\frac\{[^{}]*\})([^{\\])")
_SQRT_ARG = re.compile(r"\\sqrt([^{\\\[])")
_INT_RATIO = re.compile(r"(-?)(\d+)/(\d+)")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")


def extract_final_answer(response: str) -> str | None:
    """The raw text after the last ``Answer:`` in ``response``, or None.

    The match is case-insensitive and tolerates markdown bold (``**Answer:** 5``). The answer
    is the rest of that line, or the next non-blank line if the rest is blank; surrounding
    whitespace and ``*`` are stripped. None if there is no ``Answer:`` or nothing follows the
    last one (an earlier ``Answer:`` is not used then).
    """
    markers = list(_ANSWER_MARKER.finditer(response))
    if not markers:
        return None
    rest = response[markers[-1].end() :].lstrip(_BLANK_OR_STARS)
    answer = rest.split("\n", 1)[0].strip(_BLANK_OR_STARS)
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
    text = text.replace("\\$", "")
    segment = _MATH_SEGMENT.search(text)
    if segment:
        text = next(group for group in segment.groups() if group is not None)
    text = text.replace("$", "")
    for pattern, replacement in _REWRITES:
        text = pattern.sub(replacement, text)
    text = _unwrap_commands(text).rsplit("=", 1)[-1]
    text = _WHITESPACE.sub("", text).rstrip(".")
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
    """Whether two *normalised* answers are equal (by value if both are decimal numbers).

    An empty prediction never matches, not even an empty ground truth.
    """
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
