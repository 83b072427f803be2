"""Soft overlong punishment (DAPO Eq. 13) and the overlong filter mask."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.overlong import overlong_keep_mask, soft_overlong_punishment

L_MAX, L_CACHE = 20, 4


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (0, 0.0),
        (15, 0.0),
        (16, 0.0),
        (17, -0.25),
        (18, -0.5),
        (19, -0.75),
        (20, -1.0),
        (21, -1.0),
        (1000, -1.0),
    ],
)
def test_hand_computed_values(length: int, expected: float) -> None:
    assert soft_overlong_punishment(length, L_MAX, L_CACHE).item() == pytest.approx(expected)


def test_vectorised_keeps_shape_and_dtype() -> None:
    lengths = torch.tensor([[16, 17], [20, 21]])
    reward = soft_overlong_punishment(lengths, L_MAX, L_CACHE)
    assert reward.shape == (2, 2)
    assert reward.dtype == torch.float32
    torch.testing.assert_close(reward, torch.tensor([[0.0, -0.25], [-1.0, -1.0]]))
    assert soft_overlong_punishment([16, 18], L_MAX, L_CACHE).tolist() == [0.0, -0.5]
    real_lengths = torch.tensor([17.5], dtype=torch.float64)
    assert soft_overlong_punishment(real_lengths, L_MAX, L_CACHE).dtype == torch.float64


def test_paper_values() -> None:
    reward = soft_overlong_punishment([16384, 18432, 20480, 20481], 20480, 4096)
    torch.testing.assert_close(reward, torch.tensor([0.0, -0.5, -1.0, -1.0]))


def _piecewise(length: float, l_max: int, l_cache: int) -> float:
    """Eq. 13 transcribed branch by branch, on real numbers."""
    if length <= l_max - l_cache:
        return 0.0
    if length <= l_max:
        return ((l_max - l_cache) - length) / l_cache
    return -1.0


configs = st.integers(min_value=1, max_value=50_000).flatmap(
    lambda l_max: st.tuples(st.just(l_max), st.integers(min_value=1, max_value=l_max))
)
offsets = st.floats(min_value=1e-9, max_value=1e-3)


@settings(deadline=None)
@given(config=configs, offset=offsets)
def test_continuous_at_both_knots(config: tuple[int, int], offset: float) -> None:
    l_max, l_cache = config
    for knot, knot_value in ((l_max - l_cache, 0.0), (l_max, -1.0)):
        assert _piecewise(knot, l_max, l_cache) == knot_value
        points = torch.tensor([knot - offset, knot, knot + offset], dtype=torch.float64)
        below, at, above = soft_overlong_punishment(points, l_max, l_cache).tolist()
        assert at == knot_value
        # Lipschitz with constant 1 / L_cache: both one-sided limits equal the knot value.
        assert abs(below - knot_value) <= offset / l_cache + 1e-12
        assert abs(above - knot_value) <= offset / l_cache + 1e-12


@settings(deadline=None)
@given(
    config=configs,
    lengths=st.lists(st.floats(min_value=0, max_value=60_000), min_size=1, max_size=50),
)
def test_matches_piecewise_and_non_increasing(
    config: tuple[int, int], lengths: list[float]
) -> None:
    l_max, l_cache = config
    ordered = sorted(lengths)
    reward = soft_overlong_punishment(torch.tensor(ordered, dtype=torch.float64), l_max, l_cache)
    expected = torch.tensor([_piecewise(x, l_max, l_cache) for x in ordered], dtype=torch.float64)
    torch.testing.assert_close(reward, expected, rtol=0, atol=1e-12)
    assert bool((reward[1:] <= reward[:-1]).all())


@pytest.mark.parametrize(
    ("max_len", "cache", "field"),
    [(20, 0, "cache_length"), (20, -4, "cache_length"), (20, 21, "cache_length")],
)
def test_invalid_config_raises(max_len: int, cache: int, field: str) -> None:
    with pytest.raises(ValueError, match=rf"{field}.*{cache}"):
        soft_overlong_punishment(10, max_len, cache)


def test_cache_equal_to_max_is_valid() -> None:
    assert soft_overlong_punishment([0, 10, 20], 20, 20).tolist() == [0.0, -0.5, -1.0]


def test_keep_mask_drops_truncated() -> None:
    mask = overlong_keep_mask(["stop", "length", "abort", "length"])
    assert mask.dtype == torch.bool
    assert mask.tolist() == [True, False, True, False]
    assert overlong_keep_mask([]).shape == (0,)
