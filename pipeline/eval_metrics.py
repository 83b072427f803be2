"""Sample-based evaluation metrics of a policy on held-out prompts (pure functions).

For one prompt with `n` sampled responses of which `c` are correct:

    pass@k = 1 - C(n - c, k) / C(n, k)      the unbiased estimator of the probability that at
                                            least one of k samples is correct (Chen et al.
                                            2021, "Evaluating Large Language Models Trained on
                                            Code", Eq. 1), for k <= n
    mean@k = c / n                          the unbiased estimator of the mean correctness of
                                            k samples (the DAPO paper's avg@k, e.g. avg@32 on
                                            AIME): the expected share of correct responses
                                            among k of the n drawn without replacement is c/n
                                            for every k, so mean@k does not depend on k

Both are averaged over prompts. Hence pass@1 == mean@k, pass@k >= mean@k, and pass@k is
nondecreasing in k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _check(n: int, c: int, k: int) -> None:
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 samples and 0 <= c <= n correct, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, n={n}]: pass@k needs at least k samples")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt from `n` samples of which `c` are correct (k <= n)."""
    _check(n, c, k)
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_at_k(n: int, c: int, k: int) -> float:
    """Unbiased mean@k (avg@k) of one prompt from `n` samples of which `c` are correct: c / n
    (the same for every k <= n)."""
    _check(n, c, k)
    return c / n


def averaged_over_prompts(correct: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[str, float]:
    """`{"mean@k": ..., "pass@k": ...}` for each k of `ks`, averaged over prompts.

    Args:
        correct: [prompts][n] correctness of each prompt's n samples (the same n for all).
        ks: the k values, each in [1, n].

    Raises:
        ValueError: no prompts, prompts with different sample counts, or a k out of range.
    """
    if not correct:
        raise ValueError("no prompts to average over")
    counts = {len(samples) for samples in correct}
    if len(counts) != 1:
        raise ValueError(f"every prompt needs the same number of samples, got {sorted(counts)}")
    (n,) = counts
    metrics: dict[str, float] = {}
    for k in ks:
        for name, metric in (("mean", mean_at_k), ("pass", pass_at_k)):
            values = [metric(n, sum(samples), k) for samples in correct]
            metrics[f"{name}@{k}"] = math.fsum(values) / len(values)
    return metrics
