"""math-verify reward scorer: each call runs in a worker process under a hard deadline."""

from __future__ import annotations

from pipeline.rewards.pooled_scorer import DEFAULT_TIMEOUT_S, ProcessPoolScorer

MATH_VERIFY_FN_PATH = "pipeline.rewards.math_verify_fn:math_verify_reward"
"""Import path of the function the workers run."""


class MathVerifyScorer(ProcessPoolScorer):
    """Scores responses with :func:`pipeline.rewards.math_verify_fn.math_verify_reward`.

    math-verify's own timeouts use ``signal.alarm`` and so only work in a process's main thread;
    the workers provide one, and ``timeout_s`` bounds each call from outside (math-verify's
    worst case is 2 parses + 4 comparisons of 3 s each; a call killed at ``timeout_s`` scores
    -1 just as a call math-verify gives up on).
    """

    def __init__(
        self,
        num_workers: int = 1,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        fn_path: str = MATH_VERIFY_FN_PATH,
    ) -> None:
        """
        Args:
            num_workers: worker processes; a batch runs this many calls at a time.
            timeout_s: hard wall-clock limit per call, seconds.
            fn_path: the worker function; injectable for tests (same signature).
        """
        super().__init__(fn_path, num_workers=num_workers, timeout_s=timeout_s)
