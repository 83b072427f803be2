"""Learning benchmark: DAPO versus GRPO on the CPU demo's task, model and seeds.

Both variants run `megatron-dapo train configs/demo-cpu.yaml` (the tiny random-init Mixtral-layout
MoE policy over 2 local ranks with a real local SGLang server, reasoning-gym single-digit
`basic_arithmetic` prompts, one-character responses scored by exact match) and differ only in
the algorithm section:

* DAPO: the demo config as is: token-level loss (`token-mean`), clip-higher (eps_low 0.2,
  eps_high 0.28), dynamic sampling (only groups with 0 < accuracy < 1 are trained on).
* GRPO: `policy_loss=grpo` (symmetric clip at eps_low = eps_high = 0.2), sample-level loss
  (`seq-mean-token-mean`), no dynamic sampling (every generated group is trained on, including
  all-correct and all-wrong groups whose advantages are 0), GRPO advantages, no KL (as DAPO).

The demo's responses are one token long, so token-level and sample-level aggregation coincide
there: what this benchmark measures is clip-higher plus dynamic sampling.

Each seed sets both `training.seed` (initial weights, sampling) and `data.seed` (prompt order),
so the two variants of one seed start from the same policy and see prompts in the same order.
Runs are interleaved (seed 1 DAPO, seed 1 GRPO, seed 2 DAPO, ...) so that both variants share
the machine's load conditions; every run's directory keeps its `metrics.jsonl` (one line per
step, see `megatron_dapo.report.step_report.step_record`), its log and `wall.json`.

Reported per variant (values averaged over seeds; steps to target also per seed):

* steps to target: the first step at which the trailing `--window`-step mean accuracy reaches
  `--target` ("not reached" otherwise); accuracy is the correct fraction of all responses
  generated in a step, before any filtering;
* accuracy of the first and last `--window` steps; policy entropy (nats per response token)
  averaged over the first, middle and last `--window` steps;
* generated samples (responses, all rounds of dynamic sampling included), trained tokens
  (prompt + response tokens through the policy in training), wall time of the whole run
  (start-up included).

    PYTHONPATH=. python benchmarks/learning.py                     # 2 seeds x 40 steps, 25-40 min
    PYTHONPATH=. python benchmarks/learning.py --steps 10 --seeds 1  # a quick look
    PYTHONPATH=. python benchmarks/learning.py --reuse               # re-tabulate finished runs

Writes `learning.png` (accuracy and entropy over steps) to `--out` (default
`runs/benchmarks/learning`, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo-cpu.yaml"

VARIANTS: dict[str, tuple[str, ...]] = {
    "DAPO": (),
    "GRPO": (
        "algorithm.policy_loss=grpo",
        "algorithm.advantage.estimator=grpo",
        "algorithm.loss_aggregation=seq-mean-token-mean",
        "algorithm.eps_low=0.2",
        "algorithm.eps_high=0.2",
        "algorithm.dynamic_sampling.enabled=false",
    ),
}
"""Dotted overrides of `configs/demo-cpu.yaml` per variant."""


@dataclass(frozen=True)
class Run:
    """One finished training run: its per-step records and its wall time in seconds.

    Every record has at least `accuracy`, `entropy`, `generated_samples`, `trained_tokens`,
    `phase_seconds` (seconds per phase, `generate` among them) and
    `generation_tokens_per_second`, `training_tokens_per_second`.
    """

    variant: str
    seed: int
    run_dir: Path
    records: tuple[Mapping[str, object], ...]
    wall_seconds: float

    def series(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.records]  # type: ignore[arg-type]


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last `window` values up to each position (fewer at the start)."""
    return [
        math.fsum(values[max(0, i + 1 - window) : i + 1]) / min(i + 1, window)
        for i in range(len(values))
    ]


def steps_to_target(accuracy: Sequence[float], target: float, window: int) -> int | None:
    """The first step (1-based) whose trailing `window`-step mean accuracy is >= `target`.

    Only full windows count (the first candidate is step `window`); None if never reached.
    """
    means = trailing_mean(accuracy, window)
    return next((i + 1 for i in range(window - 1, len(means)) if means[i] >= target), None)


def window_mean(values: Sequence[float], where: str, window: int) -> float:
    """Mean of `window` values at the `start`, `middle` or `end` of `values`."""
    begin = {"start": 0, "middle": (len(values) - window) // 2, "end": len(values) - window}[where]
    chunk = values[max(0, begin) : max(0, begin) + window]
    return math.fsum(chunk) / len(chunk)


Cell = float | str | None
"""A table value: a number, None (a target not reached) or a text (e.g. "n/a")."""


def ratio(a: Cell, b: Cell) -> str:
    numbers = isinstance(a, int | float) and isinstance(b, int | float)
    return f"{a / b:.2f}" if numbers and b else "-"  # type: ignore[operator]


def fmt(value: Cell) -> str:
    """Whole numbers and values >= 100 without decimals, 1 decimal below 100, 3 below 10;
    "not reached" for None; texts as they are."""
    if value is None:
        return "not reached"
    if isinstance(value, str):
        return value
    if value == int(value) or abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def mean_curve(runs: Sequence[Run], key: str) -> list[float]:
    """Per-step mean of `key` over `runs` (truncated to the shortest run)."""
    length = min(len(r.records) for r in runs)
    return [mean([r.series(key)[i] for r in runs]) for i in range(length)]


def step_seconds(record: Mapping[str, object]) -> float:
    """Wall time of one `metrics.jsonl` record (as `StepMetrics.step_seconds`)."""
    from megatron_dapo.report.prometheus import step_wall_seconds

    return step_wall_seconds(record["phase_seconds"])  # type: ignore[arg-type]


def target_rows(runs: Sequence[Run], target: float, window: int) -> dict[str, float | None]:
    """Steps to `target` of the seed-mean accuracy, and the generated samples and summed step
    times up to that step (means over `runs`); None where the target is not reached."""
    return rows_up_to(runs, steps_to_target(mean_curve(runs, "accuracy"), target, window))


def rows_up_to(runs: Sequence[Run], reached: int | None) -> dict[str, float | None]:
    """Step `reached` (1-based) as steps to target, and the generated samples and summed step
    times of `runs` up to it (means over `runs`); all None if `reached` is None."""
    if reached is None:
        return dict.fromkeys(("steps to target", "samples to target", "step time to target (s)"))
    return {
        "steps to target": float(reached),
        "samples to target": mean([sum(r.series("generated_samples")[:reached]) for r in runs]),
        "step time to target (s)": mean(
            [math.fsum(step_seconds(s) for s in r.records[:reached]) for r in runs]
        ),
    }


def learning_row(runs: Sequence[Run], target: float, window: int) -> dict[str, float | None]:
    """One variant's numbers (averaged over `runs`, one run per seed)."""
    accuracy, entropy = mean_curve(runs, "accuracy"), mean_curve(runs, "entropy")
    return {
        **target_rows(runs, target, window),
        "accuracy first": window_mean(accuracy, "start", window),
        "accuracy last": window_mean(accuracy, "end", window),
        "entropy start": window_mean(entropy, "start", window),
        "entropy middle": window_mean(entropy, "middle", window),
        "entropy end": window_mean(entropy, "end", window),
        "generated samples": mean([sum(r.series("generated_samples")) for r in runs]),
        "trained tokens": mean([sum(r.series("trained_tokens")) for r in runs]),
        "wall time (s)": mean([r.wall_seconds for r in runs]),
    }


def markdown_table(
    rows: Mapping[str, Mapping[str, Cell]],
    per_seed: Mapping[str, str] | None = None,
    ratio_of: tuple[str, str] | None = None,
) -> str:
    """Quantities as rows, variants as columns plus the `first/second` ratio of the variants
    `ratio_of` (default the first two). The quantities are those of all variants in order of
    appearance; a variant without one shows "-"."""
    names = list(rows)
    first, second = ratio_of or (names[0], names[1])
    keys = dict.fromkeys(key for n in names for key in rows[n])
    lines = [
        f"| quantity | {' | '.join(names)} | {first}/{second} |",
        "|---" * (len(names) + 2) + "|",
    ]
    if per_seed:
        lines.append(f"| steps to target (per seed) | {' | '.join(per_seed[n] for n in names)} | |")
    for key in keys:
        values = " | ".join(fmt(rows[n].get(key, "-")) for n in names)
        cells = (rows[first].get(key), rows[second].get(key))
        lines.append(f"| {key} | {values} | {ratio(*cells)} |")
    return "\n".join(lines)


def per_seed_steps(runs: Sequence[Run], target: float, window: int) -> str:
    """Steps to target of each run, e.g. `s1: 12, s2: n.r.` (not reached)."""
    found = {r.seed: steps_to_target(r.series("accuracy"), target, window) for r in runs}
    return ", ".join(f"s{seed}: {'n.r.' if s is None else s}" for seed, s in found.items())


def plot(groups: Mapping[str, Sequence[Run]], window: int, path: Path) -> None:
    """Accuracy (trailing mean, thin lines per seed) and entropy over steps, one colour each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, ent_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for index, (name, runs) in enumerate(groups.items()):
        colour = f"C{index}"
        for run in runs:
            steps = range(1, len(run.records) + 1)
            acc_ax.plot(steps, run.series("accuracy"), color=colour, alpha=0.25, lw=0.8)
            ent_ax.plot(steps, run.series("entropy"), color=colour, alpha=0.25, lw=0.8)
        accuracy = trailing_mean(mean_curve(runs, "accuracy"), window)
        steps = range(1, len(accuracy) + 1)
        acc_ax.plot(steps, accuracy, color=colour, lw=2, label=f"{name} ({window}-step mean)")
        ent_ax.plot(steps, mean_curve(runs, "entropy"), color=colour, lw=2, label=name)
    acc_ax.set(xlabel="step", ylabel="accuracy (all generated responses)", title="Accuracy")
    ent_ax.set(xlabel="step", ylabel="entropy (nats / response token)", title="Policy entropy")
    acc_ax.legend()
    ent_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_run(run_dir: Path, variant: str, seed: int, samples_per_group: int) -> Run:
    """A finished run from its `metrics.jsonl` and `wall.json`; records without
    `generated_samples` get it from `generated_groups` (megatron-dapo's)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for r in records:
        if "generated_samples" not in r:
            r["generated_samples"] = r["generated_groups"] * samples_per_group
    wall = json.loads((run_dir / "wall.json").read_text())["wall_seconds"]
    return Run(variant, seed, run_dir, tuple(records), wall)


def run_subprocess(command: Sequence[str], run_dir: Path, env: Mapping[str, str]) -> None:
    """Run `command` with its output in `run_dir/run.log`; record its wall time in wall.json."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    with (run_dir / "run.log").open("w") as log:
        code = subprocess.call(
            command, stdout=log, stderr=subprocess.STDOUT, env=dict(env), cwd=REPO
        )
    if code:
        raise RuntimeError(f"{' '.join(command)} exited with {code}; see {run_dir / 'run.log'}")
    wall = time.perf_counter() - started
    (run_dir / "wall.json").write_text(json.dumps({"wall_seconds": wall}))


def megatron_dapo_command(
    run_dir: Path,
    name: str,
    seed: int,
    steps: int,
    config: Path = DEMO_CONFIG,
    overrides: Sequence[str] = (),
    variants: Mapping[str, Sequence[str]] = VARIANTS,
) -> list[str]:
    """The training command of run config `config` (with `overrides`, then variant `name`'s
    from `variants`) for one run in `run_dir` (no Prometheus endpoint); a random-init policy is
    written to `run_dir/initial-model`."""
    from megatron_dapo.config.loading import load_config

    random_init = load_config(config, list(overrides)).model.random_init is not None
    return [
        str(Path(sys.executable).with_name("megatron-dapo")),
        "train",
        str(config),
        *overrides,
        *variants[name],
        f"training.steps={steps}",
        f"training.seed={seed}",
        f"data.seed={seed}",
        f"checkpoint.dir={run_dir / 'checkpoints'}",
        *([f"model.hf_checkpoint={run_dir / 'initial-model'}"] if random_init else []),
        f"metrics.run_name={run_dir.name}",
        "metrics.prometheus=false",
    ]


def samples_per_group(config: Path = DEMO_CONFIG, overrides: Sequence[str] = ()) -> int:
    from megatron_dapo.config.loading import load_config

    return load_config(config, list(overrides)).rollout.n_samples_per_prompt


def run_directory(out: Path, name: str, seed: int, steps: int) -> Path:
    """Where `run_megatron_dapo` runs variant `name` with `seed` for `steps` steps."""
    return out / f"{name.lower()}-seed{seed}-steps{steps}"


def is_finished(run_dir: Path) -> bool:
    """Whether `run_dir` holds a finished run (`wall.json` is written last)."""
    return (run_dir / "wall.json").is_file()


def run_megatron_dapo(
    name: str,
    seed: int,
    steps: int,
    out: Path,
    reuse: bool,
    config: Path = DEMO_CONFIG,
    overrides: Sequence[str] = (),
    variants: Mapping[str, Sequence[str]] = VARIANTS,
) -> Run:
    """One megatron-dapo run of variant `name` (from `variants`) of `config`, or with `reuse`
    the finished one in its directory; an unfinished directory is cleared and run again. The
    run's checkpoints are deleted once it has finished (the benchmarks read its metrics; the
    final weights stay in `weights/`): ~2 GB per SmolLM2 run."""
    run_dir = run_directory(out, name, seed, steps)
    if not (reuse and is_finished(run_dir)):
        print(f"[learning] {name} seed {seed}: {run_dir}", file=sys.stderr, flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        command = megatron_dapo_command(run_dir, name, seed, steps, config, overrides, variants)
        run_subprocess(command, run_dir, env)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return load_run(run_dir, name, seed, samples_per_group(config, overrides))


def interleaved(
    names: Sequence[str], seeds: Sequence[int], start: Callable[[str, int], Run]
) -> dict[str, list[Run]]:
    """Run `start(name, seed)` seed by seed, alternating the variants within each seed."""
    runs: dict[str, list[Run]] = {n: [] for n in names}
    for seed in seeds:
        for name in names:
            runs[name].append(start(name, seed))
    return runs


def add_common_arguments(
    parser: argparse.ArgumentParser, out: str, reuse_help: str = "keep finished runs in --out"
) -> None:
    parser.add_argument("--steps", type=int, default=40, help="RL steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--target", type=float, default=0.06, help="target accuracy")
    parser.add_argument("--window", type=int, default=5, help="steps of the trailing mean")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / out)
    parser.add_argument("--reuse", action="store_true", help=reuse_help)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "learning")
    args = parser.parse_args(argv)
    runs = interleaved(
        list(VARIANTS),
        args.seeds,
        lambda name, seed: run_megatron_dapo(name, seed, args.steps, args.out, args.reuse),
    )
    rows = {n: learning_row(r, args.target, args.window) for n, r in runs.items()}
    per_seed = {n: per_seed_steps(r, args.target, args.window) for n, r in runs.items()}
    print(
        f"DAPO vs GRPO, {args.steps} steps, seeds {args.seeds}, target accuracy {args.target} "
        f"({args.window}-step trailing mean)\n"
    )
    print(markdown_table(rows, per_seed))
    plot(runs, args.window, args.out / "learning.png")
    print(f"\nplot: {args.out / 'learning.png'}")


if __name__ == "__main__":
    main()
