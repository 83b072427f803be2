"""The learning benchmark's summary helpers (benchmarks/learning.py): smoothing, steps to a
target accuracy, window means, the comparison table and reading a run directory."""

import json
import random
from pathlib import Path

import pytest

from benchmarks.learning import (
    Run,
    load_run,
    markdown_table,
    step_seconds,
    steps_to_target,
    target_rows,
    trailing_mean,
    window_mean,
)


def test_trailing_mean_uses_the_available_values_at_the_start():
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert trailing_mean([2.0, 4.0], window=5) == [2.0, 3.0]


def test_steps_to_target_counts_full_windows_only():
    # Step 1 alone is above the target, but a 3-step mean first reaches 0.5 at step 5
    # ((0.5 + 0.5 + 0.5) / 3), not at step 1 or 3 ((0.9 + 0 + 0) / 3 = 0.3).
    accuracy = [0.9, 0.0, 0.0, 0.5, 1.0, 0.0]
    assert steps_to_target(accuracy, target=0.5, window=3) == 5
    assert steps_to_target(accuracy, target=0.6, window=3) is None
    assert steps_to_target([0.2] * 4, target=0.2, window=4) == 4  # reaching = equal counts
    assert steps_to_target([1.0] * 3, target=0.1, window=5) is None  # never a full window


@pytest.mark.parametrize("seed", range(20))
def test_steps_to_target_is_the_first_qualifying_window(seed):
    rng = random.Random(seed)
    accuracy = [rng.random() * 0.2 for _ in range(30)]
    window, target = rng.randint(1, 6), 0.1
    found = steps_to_target(accuracy, target, window)
    ends = range(window, len(accuracy) + 1)  # 1-based last step of each full window
    qualifying = [e for e in ends if sum(accuracy[e - window : e]) >= target * window - 1e-12]
    assert found == (qualifying[0] if qualifying else None)


def test_window_mean_at_start_middle_and_end():
    values = [float(v) for v in range(10)]  # 0 .. 9
    assert window_mean(values, "start", 3) == 1.0  # 0, 1, 2
    assert window_mean(values, "middle", 3) == 4.0  # 3, 4, 5
    assert window_mean(values, "end", 3) == 8.0  # 7, 8, 9
    assert window_mean([1.0, 3.0], "end", 5) == 2.0  # shorter than the window: all of it


def test_table_has_ratio_column_and_marks_unreached_targets():
    rows = {
        "A": {"steps to target": 10.0, "wall time (s)": 300.0, "accuracy": 0.0625},
        "B": {"steps to target": None, "wall time (s)": 200.0, "accuracy": 12.25},
    }
    lines = markdown_table(rows, {"A": "s1: 10", "B": "s1: n.r."}).splitlines()
    assert lines[0] == "| quantity | A | B | A/B |"
    assert lines[2] == "| steps to target (per seed) | s1: 10 | s1: n.r. | |"
    assert lines[3] == "| steps to target | 10 | not reached | - |"
    assert lines[4] == "| wall time (s) | 300 | 200 | 1.50 |"
    assert lines[5] == "| accuracy | 0.062 | 12.2 | 0.01 |"


def test_load_run_derives_generated_samples_from_groups(tmp_path):
    records = [
        {"step": 0, "accuracy": 0.1, "generated_groups": 9},
        {"step": 1, "accuracy": 0.2, "generated_groups": 4, "generated_samples": 7},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "wall.json").write_text(json.dumps({"wall_seconds": 12.5}))
    run = load_run(tmp_path, "DAPO", seed=3, samples_per_group=16)
    assert run.series("generated_samples") == [144.0, 7.0]
    assert run.series("accuracy") == [0.1, 0.2]
    assert (run.seed, run.wall_seconds, run.run_dir) == (3, 12.5, tmp_path)


def _run(seed, accuracy, samples, seconds):
    records = tuple(
        {"accuracy": a, "generated_samples": n, "phase_seconds": {"generate": s, "train": 1.0}}
        for a, n, s in zip(accuracy, samples, seconds, strict=True)
    )
    return Run("X", seed, Path("."), records, wall_seconds=0.0)


def test_target_rows_average_the_seeds_up_to_the_step_of_the_mean_curve():
    # Seed-mean accuracy: 0.05, 0.1, 0.15 -> a 2-step mean reaches 0.1 at step 3 (0.125), not
    # at step 2 (0.075), although seed 2 alone would reach it at step 2.
    runs = [
        _run(1, [0.0, 0.0, 0.1], samples=[10, 20, 30], seconds=[1.0, 2.0, 3.0]),
        _run(2, [0.1, 0.2, 0.2], samples=[40, 40, 40], seconds=[0.0, 0.0, 9.0]),
    ]
    rows = target_rows(runs, target=0.1, window=2)
    assert rows["steps to target"] == 3
    assert rows["samples to target"] == (60 + 120) / 2
    assert rows["step time to target (s)"] == ((6.0 + 3.0) + (9.0 + 3.0)) / 2
    unreached = target_rows(runs, target=0.5, window=2)
    assert set(unreached.values()) == {None} and set(unreached) == set(rows)


def test_step_seconds_leaves_out_the_overlapping_reward_phase():
    record = {"phase_seconds": {"generate": 2.0, "reward": 1.5, "train": 3.0, "weight_sync": 0.5}}
    assert step_seconds(record) == 5.5
