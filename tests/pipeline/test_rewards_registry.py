"""Reward registry: lookup by name, clear error for unknown names."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.rewards import REWARD_SCORERS, get_reward_scorer

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_registered_names() -> None:
    assert set(REWARD_SCORERS) == {"dapo_math", "exact_match", "final_number", "math_verify"}


def test_unknown_name_lists_registered() -> None:
    registered = "dapo_math, exact_match, final_number, math_verify"
    with pytest.raises(ValueError, match=f"'nope'.*{registered}"):
        get_reward_scorer("nope")


def test_dapo_math_scorer() -> None:
    with get_reward_scorer("dapo_math") as scorer:
        assert scorer.score("Answer: 7", "7").acc
        results = scorer.score_batch([("Answer: 7", "7"), ("Answer: 8", "7")])
        assert [r.score for r in results] == [1.0, -1.0]


@pytest.mark.slow
def test_registry_import_does_not_load_math_verify() -> None:
    """Only the workers import math-verify (and sympy); the pipeline process stays light."""
    code = "import sys, pipeline.rewards; assert 'math_verify' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
