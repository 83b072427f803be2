"""The DAPO ablation benchmark (benchmarks/ablation.py): its rows as run configs, and its tables
from run directories (synthetic `metrics.jsonl`, nothing trains)."""

import json
from pathlib import Path

import pytest

from benchmarks import ablation
from benchmarks.ablation import (
    ABLATION,
    CONFIG,
    ROWS,
    check_rows,
    held_out_rows,
    main,
    train,
)
from benchmarks.learning import Run, run_directory
from megatron_dapo.config.loading import load_config

DATASET = load_config(CONFIG, []).eval.datasets[0].name


def leaves(value, prefix=""):
    """A config's values by dotted key."""
    if isinstance(value, dict):
        return {
            k: v for key, sub in value.items() for k, v in leaves(sub, f"{prefix}{key}.").items()
        }
    return {prefix.rstrip("."): value}


def changed(before, after):
    old, new = leaves(before.model_dump()), leaves(after.model_dump())
    return {key for key in old if old[key] != new[key]}


@pytest.fixture(scope="module")
def configs():
    return {name: load_config(CONFIG, list(overrides)) for name, overrides in ROWS.items()}


def test_each_row_adds_exactly_its_own_change(configs):
    grpo = configs["grpo"]
    assert (grpo.algorithm.policy_loss, grpo.algorithm.advantage.estimator) == ("grpo", "grpo")
    assert (grpo.algorithm.eps_low, grpo.algorithm.eps_high) == (0.2, 0.2)
    assert grpo.algorithm.loss_aggregation == "seq-mean-token-mean"
    assert not grpo.algorithm.dynamic_sampling.enabled
    assert not grpo.reward.overlong.filter_truncated and not grpo.reward.overlong.soft_punishment
    expected = {
        "overlong-filter": {"reward.overlong.filter_truncated"},
        "clip-higher": {"algorithm.policy_loss", "algorithm.eps_high"},
        "soft-punishment": {"reward.overlong.soft_punishment"},
        "token-loss": {"algorithm.loss_aggregation"},
        "dapo": {"algorithm.dynamic_sampling.enabled"},
    }
    for previous, row in zip(ABLATION, ABLATION[1:], strict=False):
        assert changed(configs[previous.name], configs[row.name]) == expected[row.name], row.name
    assert configs["clip-higher"].algorithm.eps_high == 0.28


def test_full_row_is_the_config_and_the_sweep_changes_only_eps_high(configs):
    assert not changed(load_config(CONFIG, []), configs["dapo"])
    check_rows()
    for name, eps in (("dapo-eps0.2", 0.2), ("dapo-eps0.4", 0.4)):
        assert changed(configs["dapo"], configs[name]) == {"algorithm.eps_high"}
        assert configs[name].algorithm.eps_high == eps


def test_check_rows_names_what_drifted(tmp_path):
    drifted = tmp_path / "drifted.yaml"
    drifted.write_text(CONFIG.read_text().replace("eps_high: 0.28", "eps_high: 0.3"))
    with pytest.raises(ValueError, match=r"algorithm\.eps_high: 0\.3 -> 0\.28"):
        check_rows(drifted)


def record(step, accuracy, mean_at_1=None):
    r = {
        "step": step,
        "accuracy": accuracy,
        "entropy": 1.0 - step / 10,
        "response_length_mean": 100.0 - step,
        "truncated_ratio": 0.25,
        "generated_groups": 4,
        "trained_tokens": 1000,
        "phase_seconds": {"generate": 10.0, "reward": 5.0, "train": 2.0},
    }
    if mean_at_1 is not None:
        scores = {"mean@1": mean_at_1, "pass@1": mean_at_1, "mean@4": mean_at_1, "pass@4": 1.0}
        held = {**scores, "response_length_mean": 50.0, "truncated_ratio": 0.0}
        r["eval"] = {"policy_version": step + 1, "seconds": 1.0, "datasets": {DATASET: held}}
    return r


def write_run(run_dir: Path, held: dict[int, float], steps: int = 4, finished: bool = True):
    """A run directory: eval after the 1-based steps in `held` (their mean@1)."""
    run_dir.mkdir(parents=True)
    records = [record(i, i / 10, held.get(i + 1)) for i in range(steps)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        (run_dir / "wall.json").write_text(json.dumps({"wall_seconds": 100.0}))


def test_held_out_rows_reach_the_target_on_the_seed_mean(tmp_path):
    from benchmarks.learning import load_run

    write_run(tmp_path / "a", {2: 0.4, 4: 0.8})
    write_run(tmp_path / "b", {2: 0.7, 4: 0.6})
    runs = [load_run(tmp_path / d, "x", seed, 8) for d, seed in (("a", 1), ("b", 2))]
    rows = held_out_rows(runs, DATASET, target=0.6)
    assert rows["held-out mean@1 after step 2"] == pytest.approx(0.55)
    assert rows["held-out mean@1 (end)"] == pytest.approx(0.7)
    assert "held-out pass@1 (end)" not in rows and rows["held-out pass@4 (end)"] == 1.0
    assert rows["held-out mean@1 (end, per seed)"] == "s1: 0.800, s2: 0.600"
    assert rows["steps to target"] == 4  # the seed mean reaches 0.6 after step 4 (0.7)
    assert rows["steps to target (per seed)"] == "s1: 4, s2: 2"
    assert rows["step time to target (s)"] == 4 * 12.0  # the reward phase overlaps
    assert rows["samples to target"] == 4 * 4 * 8
    assert held_out_rows(runs, DATASET, target=0.9)["steps to target"] is None
    assert held_out_rows([Run("x", 1, tmp_path, ({"step": 0},), 1.0)], DATASET, 0.5) == {}


def test_train_skips_finished_runs_and_reruns_unfinished_ones(tmp_path, monkeypatch):
    write_run(run_directory(tmp_path, "grpo", 1, 4), {4: 0.5})
    write_run(run_directory(tmp_path, "dapo", 1, 4), {4: 0.5}, finished=False)
    started = []

    def fake(name, seed, steps, out, reuse, config, variants):
        assert reuse and variants is ROWS
        started.append((name, seed))
        if name == "dapo":
            raise RuntimeError("dapo failed")

    monkeypatch.setattr(ablation, "run_megatron_dapo", fake)
    assert train(["grpo", "dapo"], [1, 2], 4, tmp_path) == ["dapo failed", "dapo failed"]
    assert started == [("dapo", 1), ("grpo", 2), ("dapo", 2)]


def test_reuse_tabulates_finished_runs_and_marks_missing_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ablation, "train", lambda *args: pytest.fail("--reuse trains nothing"))
    for name, seed in (("grpo", 1), ("grpo", 2), ("dapo", 1), ("dapo-eps0.4", 3)):
        write_run(run_directory(tmp_path, name, seed, 4), {2: 0.25, 4: 0.75})
    write_run(run_directory(tmp_path, "clip-higher", 1, 4), {4: 0.75}, finished=False)
    main(["--reuse", "--steps", "4", "--seeds", "1", "--out", str(tmp_path), "--target", "0.5"])
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| quantity | GRPO"))
    assert header.endswith("| + dynamic sampling (DAPO)/GRPO |")
    seeds = [line for line in lines if line.startswith("| seeds |")]
    assert seeds[0] == (
        "| seeds | s1, s2 (s3 missing) | missing | missing | missing | missing "
        "| s1 (s2, s3 missing) | - |"
    )
    assert seeds[1].startswith("| seeds | missing | s1 (s2, s3 missing) | s3 (s1, s2 missing) |")
    assert "| steps to target | 4 | - | - | - | - | 4 | 1.00 |" in lines
    assert (tmp_path / "ablation.png").is_file() and (tmp_path / "eps-sweep.png").is_file()
