"""Dynamic-sampling group filter: keep groups with 0 < num_correct < G."""

import pytest
import torch

from pipeline.group_filter import filter_groups


def test_hand_cases_bool_tensor() -> None:
    correctness = torch.tensor(
        [[True, False, True], [True, True, True], [False, False, False], [False, False, True]]
    )
    result = filter_groups(correctness)
    assert result.keep.tolist() == [True, False, False, True]
    assert (result.num_kept, result.num_all_correct, result.num_all_wrong) == (2, 1, 1)


def test_reward_convention_positive_is_correct() -> None:
    rewards = torch.tensor([[1.0, -1.0], [-1.0, -1.0], [1.0, 1.0], [0.0, 0.5]])
    result = filter_groups(rewards)
    assert result.keep.tolist() == [True, False, False, True]
    assert (result.num_kept, result.num_all_correct, result.num_all_wrong) == (2, 1, 1)


def test_list_of_groups_may_be_ragged() -> None:
    result = filter_groups([[True, False], [1.0, 1.0, 1.0], [-1.0], [False, True, True, True]])
    assert result.keep.tolist() == [True, False, False, True]
    assert (result.num_kept, result.num_all_correct, result.num_all_wrong) == (2, 1, 1)


def test_group_size_one_keeps_nothing() -> None:
    result = filter_groups(torch.tensor([[True], [False], [True]]))
    assert result.keep.tolist() == [False, False, False]
    assert (result.num_kept, result.num_all_correct, result.num_all_wrong) == (0, 2, 1)


def test_all_groups_masked() -> None:
    result = filter_groups(torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]]))
    assert not bool(result.keep.any())
    assert (result.num_kept, result.num_all_correct, result.num_all_wrong) == (0, 1, 1)


def test_no_groups() -> None:
    for empty in (torch.zeros((0, 4), dtype=torch.bool), []):
        result = filter_groups(empty)
        assert result.keep.shape == (0,)
        assert (result.num_kept, result.num_all_correct, result.num_all_wrong) == (0, 0, 0)


@pytest.mark.parametrize(
    "bad", [torch.tensor([True, False]), torch.zeros((2, 0), dtype=torch.bool), [[True], []]]
)
def test_invalid_shapes_raise(bad: torch.Tensor | list[list[bool]]) -> None:
    with pytest.raises(ValueError):
        filter_groups(bad)
