"""Shared reward types: the per-response result and the scorer interface."""

from __future__ import annotations

import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

CORRECT_SCORE = 1.0
"""Reward for an answer equivalent to the reference (DAPO paper)."""
INCORRECT_SCORE = -1.0
"""Reward for a wrong, missing or unverifiable answer (DAPO paper)."""


@dataclass(frozen=True)
class RewardResult:
    """Correctness reward of one response.

    Attributes:
        score: the reward, +1 (correct) or -1 (otherwise).
        acc: whether the answer was judged equivalent to the reference.
        extracted: the answer the scorer extracted from the response, None if none was found.
        timed_out: True if scoring was abandoned at its deadline (then score is -1).
        error: what the reward function raised (or wrongly returned), None if it succeeded
            (then score is -1).
    """

    score: float
    acc: bool
    extracted: str | None
    timed_out: bool = False
    error: str | None = None

    @classmethod
    def from_correctness(cls, acc: bool, extracted: str | None) -> RewardResult:
        """The +1 / -1 result for a judged answer."""
        return cls(score=CORRECT_SCORE if acc else INCORRECT_SCORE, acc=acc, extracted=extracted)

    @classmethod
    def timeout(cls) -> RewardResult:
        """The result of a call abandoned at its deadline: scored as wrong."""
        return cls(score=INCORRECT_SCORE, acc=False, extracted=None, timed_out=True)

    @classmethod
    def failed(cls, error: str) -> RewardResult:
        """The result of a call whose reward function failed: scored as wrong."""
        return cls(score=INCORRECT_SCORE, acc=False, extracted=None, error=error)

    @classmethod
    def checked(cls, value: object) -> RewardResult:
        """`value` if a reward function returned a `RewardResult`, else a failed result."""
        if isinstance(value, RewardResult):
            return value
        return cls.failed(f"the reward function returned {type(value).__name__}, not RewardResult")


def describe_exception(error: BaseException) -> str:
    """`"Type: message (at file:line)"`, the line being where `error` was raised."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


RewardFn = Callable[[str, str], RewardResult]
"""A pure reward function ``(response, ground_truth) -> RewardResult``."""


class RewardScorer(ABC):
    """Scores responses against reference answers; usable as a context manager.

    Scorers that own resources (worker processes) release them in :meth:`close`.
    """

    @abstractmethod
    def score(self, response: str, ground_truth: str) -> RewardResult:
        """Score one response (the generated text) against its reference answer."""

    def score_batch(self, pairs: Sequence[tuple[str, str]]) -> list[RewardResult]:
        """Score (response, ground_truth) pairs; results in input order."""
        return [self.score(response, ground_truth) for response, ground_truth in pairs]

    def close(self) -> None:  # noqa: B027 (optional hook, deliberately not abstract)
        """Release resources; the default scorer holds none."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class FunctionScorer(RewardScorer):
    """Adapts a pure, fast :data:`RewardFn` to the scorer interface (runs in-process, with no
    deadline). An exception raised by the function gives :meth:`RewardResult.failed`."""

    def __init__(self, fn: RewardFn) -> None:
        self._fn = fn

    def score(self, response: str, ground_truth: str) -> RewardResult:
        try:
            value = self._fn(response, ground_truth)
        except Exception as error:
            return RewardResult.failed(describe_exception(error))
        return RewardResult.checked(value)
