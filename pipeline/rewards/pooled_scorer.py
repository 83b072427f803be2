"""Scorer that runs a reward function (named by import path) in worker processes."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.rewards.base import RewardResult, RewardScorer
from pipeline.rewards.process_pool import CallOutcome, DeadlineProcessPool

DEFAULT_TIMEOUT_S = 10.0
"""Default hard per-call limit, seconds (``reward.timeout_s`` in the run config)."""


class ProcessPoolScorer(RewardScorer):
    """Runs a :data:`pipeline.rewards.base.RewardFn` in ``num_workers`` spawned processes.

    Each call runs in a worker's main thread (so ``signal.alarm``-based timeouts inside the
    function work). A call still running after ``timeout_s`` (e.g. stuck in C code) gets
    :meth:`RewardResult.timeout` (score -1, ``timed_out=True``): the workers are killed and
    reaped and a fresh pool serves the next calls. A call whose function raises (or returns
    something else than a ``RewardResult``) gets :meth:`RewardResult.failed` (score -1, with
    ``error``); a function path that does not import, or a worker that dies, raises. Call
    :meth:`close` or use the scorer as a context manager.
    """

    def __init__(
        self, fn_path: str, num_workers: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        """
        Args:
            fn_path: ``"package.module:function"`` of a module-level ``RewardFn``.
            num_workers: worker processes; a batch runs this many calls at a time.
            timeout_s: hard wall-clock limit per call, seconds.
        """
        self._pool = DeadlineProcessPool(fn_path, num_workers=num_workers, timeout_s=timeout_s)

    def score(self, response: str, ground_truth: str) -> RewardResult:
        return self.score_batch([(response, ground_truth)])[0]

    def score_batch(self, pairs: Sequence[tuple[str, str]]) -> list[RewardResult]:
        """Score (response, ground_truth) pairs in parallel; results in input order."""
        return [_as_result(outcome) for outcome in self._pool.map(pairs)]

    def close(self) -> None:
        """Stop and reap the worker processes; idempotent."""
        self._pool.close()


def _as_result(outcome: CallOutcome) -> RewardResult:
    if outcome.timed_out:
        return RewardResult.timeout()
    if outcome.error is not None:
        return RewardResult.failed(outcome.error)
    return RewardResult.checked(outcome.value)
