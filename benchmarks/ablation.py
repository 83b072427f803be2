"""DAPO's ablation (arXiv 2503.14476, Table 1) in small, on the SmolLM2 reasoning demo.

Every run is `megatron-dapo train configs/smollm2-reasoning-cpu.yaml key=value...` (as
`benchmarks/learning.py` runs it): SmolLM2-135M-Instruct on two-term one-digit sums with worked
answers, `final_number` reward, 128-token responses, held-out evaluation (32 prompts x 4
samples) every 5 steps and after the last. The rows are cumulative, as in the paper's Table 1;
each is a set of dotted overrides of the config (`ROWS`):

1. `grpo`: learning.py's GRPO variant, `algorithm.policy_loss=grpo` (its per-token loss clips
   the ratio to [1 - eps_low, 1 + eps_low], i.e. symmetric at 0.2, whatever eps_high says),
   `algorithm.advantage.estimator=grpo` (group-normalised, as DAPO's), `eps_low=eps_high=0.2`,
   sample-level loss (`loss_aggregation=seq-mean-token-mean`), no dynamic sampling
   (`dynamic_sampling.enabled=false`: every generated group is trained on), plus
   `reward.overlong.soft_punishment=false` and `reward.overlong.filter_truncated=false`. No KL
   term (the config has none, as DAPO). Truncated responses score -1 in every row
   (`reward.score_truncated: wrong`).
2. `overlong-filter`: + `reward.overlong.filter_truncated=true` (truncated responses get no loss).
3. `clip-higher`: + `algorithm.policy_loss=dapo algorithm.eps_high=0.28`. The clip-higher loss
   is `dapo`'s per-token loss (clip to [1 - eps_low, 1 + eps_high]), which at eps_high = eps_low
   is `grpo`'s; its paper recipe's token-level aggregation is not fixed, so rows 3-4 keep the
   sample-level loss (`PAPER_RECIPES`: "DAPO's Table 1 runs clip-higher with GRPO's
   sample-level loss").
4. `soft-punishment`: + `reward.overlong.soft_punishment=true` (the config's cache_length: the
   last 32 of the 128 tokens lose up to 1 reward).
5. `token-loss`: + `algorithm.loss_aggregation=token-mean`.
6. `dapo`: + `algorithm.dynamic_sampling.enabled=true` (only groups with 0 < accuracy < 1 are
   trained on): the config as is. `check_rows` refuses to run or tabulate if row 6's overrides
   change anything in the config, so the rows cannot drift from it.

The eps_high sweep runs row 6 with `algorithm.eps_high` 0.2 (`dapo-eps0.2`) and 0.4
(`dapo-eps0.4`); its 0.28 is row 6's runs (not run again).

Each seed sets `training.seed` and `data.seed` (as learning.py), so every row of one seed starts
from the same weights and prompt order. Runs are interleaved (seed 1: every selected row, then
seed 2: ...). Each run takes ~20 minutes on 2 cores, the whole ablation (6 rows + 2 sweep
values, 2 seeds: 16 runs) 5-6 hours, so it runs in chunks, in as many sessions as it takes: a
run whose directory already holds a finished run (`wall.json`, written last) is never run again,
only tabulated; an unfinished directory (an interrupted run) is cleared and run from scratch.
Every invocation prints the tables from all finished runs in `--out` (of the `--steps` given),
whatever `--rows` and `--seeds` say; a row with missing runs says which seeds it has, and which
of `--seeds` or of the other rows' seeds it lacks ("missing" if it has none).

    PYTHONPATH=. python benchmarks/ablation.py                        # all 16 runs (or the rest)
    PYTHONPATH=. python benchmarks/ablation.py --rows grpo overlong-filter --seeds 1  # a chunk
    PYTHONPATH=. python benchmarks/ablation.py --no-sweep             # the 6 rows only
    PYTHONPATH=. python benchmarks/ablation.py --reuse                # tables only, no training
    PYTHONPATH=. python benchmarks/ablation.py --steps 2 --seeds 1 --rows grpo --out /tmp/a  # try

Reported per row (means over the finished seeds; per seed where marked):

* held-out (the config's first eval dataset, at the training temperature): mean@k and pass@k
  (k > 1) of the last evaluation, mean@1 of the last evaluation per seed, mean@1 after each
  evaluated step, response length and truncated share of the last evaluation;
* steps to `--target` held-out mean@1: the first evaluated step whose seed-mean mean@1 reaches
  it (also per seed), and the summed step seconds (`step_seconds`) and generated samples up to
  that step;
* training accuracy (correct share of all generated responses, before any filtering) of the
  first and last `--window` steps; policy entropy (nats per response token) and mean response
  length (tokens, of the trained batch) over the first, middle and last `--window` steps;
* generated samples (all rounds of dynamic sampling), trained samples (prompts_per_step x G
  per step; overlong-filtered responses count, their loss is masked), trained tokens, the
  truncated share of the trained batch (mean over steps), wall time of the run (start-up
  included).

The last column is the ratio full DAPO / GRPO (eps_high 0.28 / 0.2 in the sweep table).
Writes `ablation.png` and `eps-sweep.png` (held-out mean@1, training accuracy, entropy and mean
response length over steps, one seed-averaged line per row) to `--out` (default
`runs/benchmarks/ablation`, git-ignored).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.learning import (
    REPO,
    VARIANTS,
    Cell,
    Run,
    add_common_arguments,
    fmt,
    is_finished,
    load_run,
    markdown_table,
    mean,
    mean_curve,
    rows_up_to,
    run_directory,
    run_megatron_dapo,
    window_mean,
)

CONFIG = REPO / "configs" / "smollm2-reasoning-cpu.yaml"
DEFAULT_TARGET = 0.6
"""`--target` held-out mean@1: above the 0.22 the initial model scores (`megatron-dapo eval`);
full DAPO passed it after step 10 of 15 in its first measured run (0.69)."""
DEFAULT_WINDOW = 3
"""`--window`: steps averaged at the start / middle / end of a run (of the config's 15)."""


@dataclass(frozen=True)
class Row:
    """One row of the ablation: its name (run directories, `--rows`), its table label and the
    dotted overrides it adds to the previous row's."""

    name: str
    label: str
    changes: Mapping[str, str]


ABLATION = (
    Row(
        "grpo",
        "GRPO",
        {
            **dict(override.split("=", 1) for override in VARIANTS["GRPO"]),
            "reward.overlong.filter_truncated": "false",
            "reward.overlong.soft_punishment": "false",
        },
    ),
    Row("overlong-filter", "+ overlong filtering", {"reward.overlong.filter_truncated": "true"}),
    Row(
        "clip-higher",
        "+ clip-higher",
        {"algorithm.policy_loss": "dapo", "algorithm.eps_high": "0.28"},
    ),
    Row(
        "soft-punishment", "+ soft overlong punishment", {"reward.overlong.soft_punishment": "true"}
    ),
    Row("token-loss", "+ token-level loss", {"algorithm.loss_aggregation": "token-mean"}),
    Row("dapo", "+ dynamic sampling (DAPO)", {"algorithm.dynamic_sampling.enabled": "true"}),
)
FULL = ABLATION[-1].name
EPS_SWEEP = {"0.2": "dapo-eps0.2", "0.28": FULL, "0.4": "dapo-eps0.4"}
"""eps_high of the full DAPO row -> run name; 0.28 is row 6 itself."""


def row_overrides() -> dict[str, tuple[str, ...]]:
    """Every run name's dotted overrides: the ablation's rows (each on top of the previous
    one), then the eps_high sweep's other values on top of the full DAPO row."""
    rows: dict[str, dict[str, str]] = {}
    merged: dict[str, str] = {}
    for row in ABLATION:
        merged = rows[row.name] = {**merged, **row.changes}
    for eps, name in EPS_SWEEP.items():
        rows.setdefault(name, {**merged, "algorithm.eps_high": eps})
    return {name: tuple(f"{k}={v}" for k, v in changes.items()) for name, changes in rows.items()}


ROWS = row_overrides()
"""Run name -> dotted overrides of `CONFIG` (the `variants` of `run_megatron_dapo`)."""
SWEEP_ONLY = tuple(name for name in EPS_SWEEP.values() if name != FULL)
LABELS = {row.name: row.label for row in ABLATION}
SWEEP_LABELS = {name: f"eps_high {eps}" for eps, name in EPS_SWEEP.items()}


def dotted(config: Any, key: str) -> Any:
    """The value at dotted `key` of a run config, e.g. `algorithm.dynamic_sampling.enabled`."""
    return functools.reduce(getattr, key.split("."), config)


def check_rows(config: Path = CONFIG) -> None:
    """Raise ValueError unless the full DAPO row's overrides leave `config` as it is."""
    from megatron_dapo.config.loading import load_config

    full, own = load_config(config, list(ROWS[FULL])), load_config(config, [])
    if full != own:
        keys = [o.split("=", 1)[0] for o in ROWS[FULL]]
        changed = [
            f"{k}: {dotted(own, k)!r} -> {dotted(full, k)!r}"
            for k in keys
            if dotted(own, k) != dotted(full, k)
        ]
        raise ValueError(
            f"row {FULL!r} must be {config.name} as is, but its overrides change it: "
            + "; ".join(changed)
        )


def held_out(run: Run, dataset: str) -> dict[int, Mapping[str, float]]:
    """`run`'s evaluations of `dataset` by step (1-based: the policy after that many steps)."""
    return {
        int(r["step"]) + 1: r["eval"]["datasets"][dataset]  # type: ignore[index]
        for r in run.records
        if "eval" in r
    }


def common_evals(
    runs: Sequence[Run], dataset: str
) -> tuple[list[dict[int, Mapping[str, float]]], list[int]]:
    """Each run's evaluations of `dataset` (`held_out`) and the steps all of them evaluated."""
    evals = [held_out(r, dataset) for r in runs]
    return evals, sorted(set.intersection(*(set(e) for e in evals)))


def per_seed(runs: Sequence[Run], values: Sequence[Cell]) -> str:
    """One value per run, e.g. `s1: 0.625, s2: n.r.` (n.r. = target not reached)."""
    pairs = zip(runs, values, strict=True)
    return ", ".join(f"s{r.seed}: {'n.r.' if v is None else fmt(v)}" for r, v in pairs)


def first_reaching(curve: Mapping[int, float], target: float) -> int | None:
    """The first step (in step order) whose value is >= `target`; None if none is."""
    return next((step for step in sorted(curve) if curve[step] >= target), None)


def held_out_rows(runs: Sequence[Run], dataset: str, target: float) -> dict[str, Cell]:
    """The held-out quantities of one row (see the module docstring); none without evaluations."""
    evals, steps = common_evals(runs, dataset)
    if not steps:
        return {}
    last = steps[-1]

    def at(step: int, metric: str) -> float:
        return mean([e[step][metric] for e in evals])

    scores = [m for m in evals[0][last] if "@" in m and m != "pass@1"]  # pass@1 is mean@1
    curve = {step: at(step, "mean@1") for step in steps}
    reached = first_reaching(curve, target)
    own = [first_reaching({s: e[s]["mean@1"] for s in steps}, target) for e in evals]
    return {
        **{f"held-out {m} (end)": at(last, m) for m in scores},
        "held-out mean@1 (end, per seed)": per_seed(runs, [e[last]["mean@1"] for e in evals]),
        **{f"held-out mean@1 after step {step}": curve[step] for step in steps},
        "held-out response length (end)": at(last, "response_length_mean"),
        "held-out truncated share (end)": at(last, "truncated_ratio"),
        **rows_up_to(runs, reached),
        "steps to target (per seed)": per_seed(runs, own),
    }


def ablation_row(
    runs: Sequence[Run], dataset: str, target: float, window: int, samples_per_step: int
) -> dict[str, Cell]:
    """One row's numbers (means over `runs`, one finished run per seed)."""
    accuracy, entropy, length = (
        mean_curve(runs, key) for key in ("accuracy", "entropy", "response_length_mean")
    )
    where = {"first": "start", "middle": "middle", "last": "end"}
    return {
        **held_out_rows(runs, dataset, target),
        "training accuracy first": window_mean(accuracy, "start", window),
        "training accuracy last": window_mean(accuracy, "end", window),
        **{f"entropy {w}": window_mean(entropy, at, window) for w, at in where.items()},
        **{f"response length {w}": window_mean(length, at, window) for w, at in where.items()},
        "generated samples": mean([sum(r.series("generated_samples")) for r in runs]),
        "trained samples": mean([len(r.records) * samples_per_step for r in runs]),
        "trained tokens": mean([sum(r.series("trained_tokens")) for r in runs]),
        "truncated share (trained batch)": mean([mean(r.series("truncated_ratio")) for r in runs]),
        "wall time (s)": mean([r.wall_seconds for r in runs]),
    }


def seeds_cell(runs: Sequence[Run], seeds: Sequence[int]) -> str:
    """The seeds a row has, e.g. `s1, s2`, `s1 (s2 missing)` or `missing`."""
    have = [r.seed for r in runs]
    missing = [s for s in seeds if s not in have]
    found = ", ".join(f"s{s}" for s in have)
    if not have:
        return "missing"
    return f"{found} ({', '.join(f's{s}' for s in missing)} missing)" if missing else found


def table(
    groups: Mapping[str, Sequence[Run]],
    labels: Mapping[str, str],
    seeds: Sequence[int],
    row: Callable[[Sequence[Run]], Mapping[str, Cell]],
    ratio_of: tuple[str, str],
) -> str:
    """The markdown table of `groups` (run name -> finished runs), columns labelled by `labels`,
    numbers by `row(runs)`; a row without finished runs shows only its missing seeds."""
    rows = {
        labels[name]: {"seeds": seeds_cell(runs, seeds), **(row(runs) if runs else {})}
        for name, runs in groups.items()
    }
    return markdown_table(rows, ratio_of=(labels[ratio_of[0]], labels[ratio_of[1]]))


def plot(groups: Mapping[str, Sequence[Run]], dataset: str, path: Path) -> None:
    """Held-out mean@1, training accuracy, entropy and response length over steps: one
    seed-averaged line per row (label -> finished runs; rows without runs are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        "accuracy": "training accuracy (all generated)",
        "entropy": "entropy (nats / response token)",
        "response_length_mean": "mean response length (tokens)",
    }
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(18, 4))
    for index, (label, runs) in enumerate(groups.items()):  # a row keeps its colour
        if not runs:
            continue
        evals, steps = common_evals(runs, dataset)
        held = [mean([e[s]["mean@1"] for e in evals]) for s in steps]
        axes[0].plot(steps, held, color=f"C{index}", marker="o", label=label)
        for ax, key in zip(axes[1:], panels, strict=True):
            curve = mean_curve(runs, key)
            ax.plot(range(1, len(curve) + 1), curve, color=f"C{index}", label=label)
    axes[0].set(xlabel="step", ylabel="held-out mean@1", title="Held-out mean@1")
    for ax, title in zip(axes[1:], panels.values(), strict=True):
        ax.set(xlabel="step", ylabel=title, title=title.split(" (")[0].capitalize())
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(names: Sequence[str], seeds: Sequence[int], steps: int, out: Path) -> list[str]:
    """Run every unfinished run of `names` x `seeds`, seed by seed; the failed runs' messages
    (a failed run does not stop the others)."""
    failures = []
    for seed in seeds:
        for name in names:
            if is_finished(run_directory(out, name, seed, steps)):
                continue
            try:
                run_megatron_dapo(name, seed, steps, out, True, CONFIG, variants=ROWS)
            except RuntimeError as error:
                print(f"[ablation] {error}", file=sys.stderr, flush=True)
                failures.append(str(error))
    return failures


def finished(
    names: Sequence[str], seeds: Sequence[int], steps: int, out: Path, group_size: int
) -> dict[str, list[Run]]:
    """The finished runs in `out` of every name, in seed order."""
    dirs = {name: [(s, run_directory(out, name, s, steps)) for s in seeds] for name in names}
    return {
        name: [load_run(d, name, s, group_size) for s, d in found if is_finished(d)]
        for name, found in dirs.items()
    }


def finished_seeds(steps: int, out: Path) -> set[int]:
    """The seeds of every finished run of `steps` steps in `out` (any row)."""
    seeds = set()
    for run_dir in out.glob(f"*-seed*-steps{steps}"):
        name, _, rest = run_dir.name.rpartition("-seed")
        seed = rest.removesuffix(f"-steps{steps}")
        if name in ROWS and seed.isdigit() and is_finished(run_dir):
            seeds.add(int(seed))
    return seeds


def main(argv: Sequence[str] | None = None) -> None:
    from megatron_dapo.config.loading import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "ablation", reuse_help="train nothing: tabulate finished runs")
    parser.set_defaults(steps=None, target=DEFAULT_TARGET, window=DEFAULT_WINDOW)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="runs to train (default all)")
    parser.add_argument("--no-sweep", action="store_true", help="leave out the eps_high sweep")
    args = parser.parse_args(argv)
    check_rows()
    config = load_config(CONFIG, [])
    steps = args.steps or config.training.steps
    names = [n for n in args.rows or ROWS if not (args.no_sweep and n in SWEEP_ONLY)]
    failures = [] if args.reuse else train(names, args.seeds, steps, args.out)

    group_size = config.rollout.n_samples_per_prompt
    seeds = sorted({*args.seeds, *finished_seeds(steps, args.out)})
    runs = finished(list(ROWS), seeds, steps, args.out, group_size)
    dataset = config.eval.datasets[0].name

    def row(group: Sequence[Run]) -> dict[str, Cell]:
        samples_per_step = config.training.prompts_per_step * group_size
        return ablation_row(group, dataset, args.target, args.window, samples_per_step)

    print(
        f"DAPO ablation on {CONFIG.name}, {steps} steps, seeds {seeds}, target held-out "
        f"mean@1 {args.target:g} on {dataset}, {args.window}-step windows\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    ablation = {name: runs[name] for name in LABELS}
    print(table(ablation, LABELS, seeds, row, (FULL, ABLATION[0].name)))
    plot({LABELS[n]: r for n, r in ablation.items()}, dataset, args.out / "ablation.png")
    if not args.no_sweep:
        sweep = {name: runs[name] for name in EPS_SWEEP.values()}
        print(f"\neps_high sweep on the full DAPO row ({SWEEP_LABELS[FULL]}: its runs)\n")
        print(table(sweep, SWEEP_LABELS, seeds, row, (FULL, EPS_SWEEP["0.2"])))
        plot({SWEEP_LABELS[n]: r for n, r in sweep.items()}, dataset, args.out / "eps-sweep.png")
    print(f"\nplots in {args.out}")
    if failures:
        raise SystemExit(f"{len(failures)} run(s) failed:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
