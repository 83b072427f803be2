"""The `eval:` section: defaults that keep existing configs unchanged, the lengths it inherits
from the run, its schedule, and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_dapo.config.loading import ConfigError, load_config
from pipeline.config import EvalConfig, RolloutConfig

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo-cpu.yaml"
HELD_OUT = {"name": "held-out", "source": "reasoning_gym", "task": "basic_arithmetic", "seed": 2}


def test_eval_is_off_by_default() -> None:
    config = load_config(DEMO, ["eval.interval=0"])
    assert not config.eval.due(10, 40)
    assert EvalConfig().interval == 0 and EvalConfig().datasets == ()


def test_the_demo_evaluates_a_held_out_set_with_the_runs_lengths() -> None:
    config = load_config(DEMO)
    (dataset,) = config.eval.datasets
    assert dataset.seed != config.data.seed and dataset.task == config.data.task
    assert dataset.max_prompt_length == config.data.max_prompt_length  # inherited
    assert config.eval.max_response_length == config.rollout.max_response_length
    assert config.data_plane_config().eval == config.eval


def test_lengths_given_are_kept() -> None:
    config = load_config(DEMO, ["eval.max_response_length=1", "rollout.max_response_length=4"])
    assert config.eval.max_response_length == 1


def test_schedule_every_interval_and_the_last_step() -> None:
    config = EvalConfig(interval=3, datasets=[HELD_OUT])
    assert [s for s in range(1, 11) if config.due(s, 10)] == [3, 6, 9, 10]


def test_response_length_defaults_to_the_rollouts() -> None:
    rollout = RolloutConfig(max_response_length=7)
    assert EvalConfig().response_length(rollout) == 7
    assert EvalConfig(max_response_length=3).response_length(rollout) == 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"interval": 5}, "eval.interval=5 needs at least one eval.datasets entry"),
        ({"n_samples": 4, "temperature": 1.0, "ks": [1, 8]}, r"every k must be in \[1, eval.n"),
        ({"ks": [0]}, r"every k must be in \[1"),
        ({"ks": []}, "one at least"),
        ({"n_samples": 2, "temperature": 1.0, "ks": [1, 1]}, "repeats a k"),
        ({"n_samples": 4}, "eval.temperature=0 is greedy decoding"),
        ({"datasets": [HELD_OUT, HELD_OUT]}, r"names must be unique, repeated: \['held-out'\]"),
        ({"datasets": [{**HELD_OUT, "name": "a b"}]}, "should match pattern"),
        ({"datasets": [{**HELD_OUT, "task": None}]}, "eval.datasets.source='reasoning_gym' needs"),
        ({"datasets": [{**HELD_OUT, "max_prompts": 0}]}, "greater than or equal to 1"),
        ({"temperature": -1.0}, "greater than or equal to 0"),
        ({"top_p": 0.0}, "greater than 0"),
    ],
)
def test_bad_values_are_refused_with_the_reason(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EvalConfig(**changes)


def test_a_held_out_sample_must_fit_the_context() -> None:
    with pytest.raises(ConfigError, match="eval dataset 'arithmetic-seed2'.* more than model"):
        load_config(DEMO, ["eval.max_response_length=500"])


def test_a_bad_eval_value_in_a_config_names_the_key() -> None:
    with pytest.raises(ConfigError, match="eval.n_samples"):
        load_config(DEMO, ["eval.n_samples=0"])
