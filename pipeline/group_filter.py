"""Dynamic-sampling group filter (DAPO, arXiv 2503.14476, Eq. 11 constraint).

A group is the G responses sampled for one prompt. When every response is correct or every
response is wrong, all group-normalised advantages are zero and the group carries no gradient,
so DAPO keeps only groups with ``0 < num_correct < G``.

Correctness convention: an entry counts as correct iff ``value > 0``. This covers bools (True)
and the paper's correctness reward (+1 correct / -1 wrong). Pass the correctness reward or the
``acc`` flag, not the total reward after soft overlong shaping: a correct answer with a length
penalty of -1 has total reward 0 and would count as wrong.

With G = 1 no group can be kept (``0 < n < 1`` has no integer solution): every group is
all-correct or all-wrong, so the filter drops everything; dynamic sampling needs G >= 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Correctness = torch.Tensor | Sequence[Sequence[bool | float]]
"""A [num_groups, G] tensor, or a list of groups (each a sequence, sizes may differ)."""


@dataclass(frozen=True)
class GroupFilterResult:
    """Outcome of :func:`filter_groups`.

    Attributes:
        keep: bool tensor of shape [num_groups], True for groups with 0 < num_correct < size.
        num_kept: number of kept groups.
        num_all_correct: number of dropped groups whose responses are all correct.
        num_all_wrong: number of dropped groups whose responses are all wrong.
    """

    keep: torch.Tensor
    num_kept: int
    num_all_correct: int
    num_all_wrong: int


def _count_correct(correctness: Correctness) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (num_correct, group_size), both int64 tensors of shape [num_groups]."""
    if isinstance(correctness, torch.Tensor):
        if correctness.dim() != 2:
            raise ValueError(
                f"correctness must have shape [num_groups, G], got shape {tuple(correctness.shape)}"
            )
        num_groups, group_size = correctness.shape
        num_correct = (correctness > 0).sum(dim=-1, dtype=torch.int64)
        return num_correct, torch.full((num_groups,), group_size, dtype=torch.int64)
    num_correct = torch.tensor([sum(1 for x in group if x > 0) for group in correctness])
    sizes = torch.tensor([len(group) for group in correctness])
    return num_correct.to(torch.int64), sizes.to(torch.int64)


def filter_groups(correctness: Correctness) -> GroupFilterResult:
    """Keep the groups whose accuracy is strictly between 0 and 1.

    Args:
        correctness: per-response correctness, a [num_groups, G] tensor or a list of groups;
            an entry is correct iff it is > 0 (see the module docstring).

    Returns:
        The keep mask of shape [num_groups] and the kept / all-correct / all-wrong counts,
        which sum to num_groups.

    Raises:
        ValueError: if a tensor is not 2-D or a group is empty.
    """
    num_correct, sizes = _count_correct(correctness)
    if bool((sizes == 0).any()):
        raise ValueError("every group must hold at least one response, got an empty group")
    all_wrong = num_correct == 0
    all_correct = num_correct == sizes
    keep = ~(all_wrong | all_correct)
    return GroupFilterResult(
        keep=keep,
        num_kept=int(keep.sum()),
        num_all_correct=int(all_correct.sum()),
        num_all_wrong=int(all_wrong.sum()),
    )
