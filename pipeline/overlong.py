"""Overlong handling from DAPO (arXiv 2503.14476, Sec. 3.4): soft punishment and filter mask.

Two independent mechanisms (switched by ``pipeline.config.OverlongConfig``):

* soft overlong punishment (paper Eq. 13), a length-dependent reward added to the correctness
  reward, with ``L_max = max_response_length`` and ``L_cache = cache_length`` (both in tokens)::

      R_length(|y|) = 0                             if |y| <= L_max - L_cache
                    = ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
                    = -1                            if |y| > L_max

  The function is continuous (0 at the first knot, -1 at the second) and non-increasing, so it
  equals ``clamp(((L_max - L_cache) - |y|) / L_cache, -1, 0)``, which is how it is computed.
* overlong filtering: a response truncated at the length limit (finish reason ``"length"``)
  contributes no loss, expressed as a per-response boolean keep mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TRUNCATED_FINISH_REASON = "length"
"""Finish reason reported by the inference server when generation hit the token limit."""

Lengths = torch.Tensor | Sequence[int] | Sequence[float] | int | float
"""Response lengths in tokens: a tensor of any shape, a sequence, or a single number."""


def _validate(max_response_length: int, cache_length: int) -> None:
    """Raise ``ValueError`` naming the field unless ``0 < cache_length <= max_response_length``."""
    if cache_length <= 0:
        raise ValueError(f"cache_length must be > 0, got cache_length={cache_length}")
    if cache_length > max_response_length:
        raise ValueError(
            f"cache_length must be <= max_response_length={max_response_length}, "
            f"got cache_length={cache_length}"
        )


def soft_overlong_punishment(
    lengths: Lengths, max_response_length: int, cache_length: int
) -> torch.Tensor:
    """Paper Eq. 13: the length reward of each response.

    Args:
        lengths: response lengths |y| in tokens, any shape (integers, or reals for analysis).
        max_response_length: L_max in tokens.
        cache_length: L_cache in tokens, the width of the punishment interval; 0 < L_cache <= L_max.

    Returns:
        Tensor of the same shape as ``lengths`` with values in [-1, 0]; the dtype of ``lengths``
        if it is floating point, else float32. Computed in float64.

    Raises:
        ValueError: if the configuration is invalid.
    """
    _validate(max_response_length, cache_length)
    lengths_t = torch.as_tensor(lengths)
    out_dtype = lengths_t.dtype if lengths_t.is_floating_point() else torch.float32
    expected_max = max_response_length - cache_length
    penalty = (expected_max - lengths_t.to(torch.float64)) / cache_length
    return penalty.clamp(min=-1.0, max=0.0).to(out_dtype)


def overlong_keep_mask(finish_reasons: Sequence[str]) -> torch.Tensor:
    """Overlong filter: which responses contribute to the loss.

    Args:
        finish_reasons: one finish reason per response (e.g. ``"stop"``, ``"length"``).

    Returns:
        Bool tensor of shape [num_responses]: False where the response was truncated
        (finish reason ``"length"``), True otherwise.
    """
    return torch.tensor(
        [reason != TRUNCATED_FINISH_REASON for reason in finish_reasons], dtype=torch.bool
    )
