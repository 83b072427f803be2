"""megatron-dapo's DAPO demo versus TRL's `GRPOTrainer` (`loss_type="dapo"`) on this machine.

Same task, model, initial weights, prompt stream and hyper-parameters (see
`benchmarks/trl_grpo.py` for the TRL side's settings), run one after the other per seed so
that both see the same machine load:

1. `megatron-dapo train configs/demo-cpu.yaml` (the DAPO variant of `benchmarks/learning.py`):
   2 local ranks (EP2, gloo) plus one local SGLang server, dynamic sampling on;
2. this script writes the prompts that the demo's seeded prompt source yields (reasoning-gym
   through `pipeline.prompts.PromptSource`, `steps x 16` of them, as chat messages + answer)
   next to the run, and starts `benchmarks/trl_grpo.py` in TRL's own environment (`make
   trl-env`, built here if missing) on the demo run's `initial-model`: one process, generation
   with `transformers` `generate`, no dynamic sampling.

The table compares, per trainer (means over steps and seeds): step time, generation tokens/s
(response tokens over the sampling time), training tokens/s (prompt + response tokens of the
trained samples over the training time), accuracy of the first and last `--window` steps (of
all generated responses), steps to `--target` accuracy (trailing mean), generated samples, kept
groups per step (megatron-dapo: groups with mixed outcomes that dynamic sampling keeps, always
16; TRL: all 16 groups are trained on, "informative" counts those with mixed outcomes, the only
ones with non-zero advantages) and wall time (start-up included). A second table shows the
throughput per seed: each pair ran back to back, so its ratio is the one to trust when other
jobs load the machine (TRL's multi-threaded torch suffers far more from that than
megatron-dapo's single-threaded ranks).

    PYTHONPATH=. python benchmarks/trl_comparison.py                # 1 seed x 40 steps, ~8 min
    PYTHONPATH=. python benchmarks/trl_comparison.py --steps 10     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.learning import (
    DEMO_CONFIG,
    REPO,
    Run,
    add_common_arguments,
    fmt,
    load_run,
    markdown_table,
    mean,
    mean_curve,
    per_seed_steps,
    ratio,
    run_megatron_dapo,
    run_subprocess,
    step_seconds,
    target_rows,
    window_mean,
)


def trl_python() -> Path:
    """The TRL environment's interpreter (`make trl-env` builds it if needed and names it)."""
    output = subprocess.run(
        ["make", "-s", "-C", str(REPO), "trl-env"], check=True, capture_output=True, text=True
    ).stdout
    return Path(output.strip().splitlines()[-1].split(": ", 1)[1]) / "bin" / "python"


def write_prompts(model_dir: Path, seed: int, count: int, path: Path) -> None:
    """The first `count` prompts of the demo's prompt stream for `data.seed=seed`, as JSON
    lines `{"prompt": [messages], "answer": str}` (the chat template is applied by TRL)."""
    from transformers import AutoTokenizer

    from megatron_dapo.config.loading import load_config
    from pipeline.prompts import PromptSource

    config = load_config(DEMO_CONFIG, [f"data.seed={seed}"])
    source = PromptSource.from_config(config.data, AutoTokenizer.from_pretrained(model_dir))
    with path.open("w") as out:
        for prompt in source.next_prompts(count):
            messages = source.rows[prompt.row_index].messages
            out.write(json.dumps({"prompt": messages, "answer": prompt.ground_truth}) + "\n")


def run_trl(megatron_run: Path, seed: int, steps: int, out: Path, reuse: bool) -> Run:
    """TRL's GRPOTrainer from the initial weights of the megatron-dapo run in `megatron_run`."""
    from megatron_dapo.config.loading import load_config

    run_dir = out / f"trl-seed{seed}-steps{steps}"
    if not (reuse and (run_dir / "wall.json").is_file()):
        print(f"[trl] seed {seed}: {run_dir}", file=sys.stderr, flush=True)
        model = megatron_run / "initial-model"
        prompts = out / f"prompts-seed{seed}-steps{steps}.jsonl"
        per_step = load_config(DEMO_CONFIG).training.prompts_per_step
        write_prompts(model, seed, steps * per_step, prompts)
        command = [str(trl_python()), str(REPO / "benchmarks" / "trl_grpo.py")]
        command += ["--model", str(model), "--prompts", str(prompts), "--steps", str(steps)]
        command += ["--seed", str(seed), "--out", str(run_dir)]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        run_subprocess(command, run_dir, env)
    return load_run(run_dir, "TRL", seed, samples_per_group=0)


def throughput_row(runs: Sequence[Run], target: float, window: int) -> dict[str, float | None]:
    """One trainer's numbers (means over steps, then over `runs`, one run per seed)."""
    accuracy = mean_curve(runs, "accuracy")

    def step_mean(key: str) -> float:
        return mean([mean(r.series(key)) for r in runs])

    def phase_mean(phase: str) -> float:
        return mean([mean([float(s["phase_seconds"][phase]) for s in r.records]) for r in runs])

    kept = "informative_groups" if "informative_groups" in runs[0].records[0] else "kept_groups"
    return {
        "step time (s)": mean([mean([step_seconds(s) for s in r.records]) for r in runs]),
        "generate phase (s/step)": phase_mean("generate"),
        "train phase (s/step)": phase_mean("train"),
        "generation tok/s": step_mean("generation_tokens_per_second"),
        "training tok/s": step_mean("training_tokens_per_second"),
        "accuracy first": window_mean(accuracy, "start", window),
        "accuracy last": window_mean(accuracy, "end", window),
        **target_rows(runs, target, window),
        "generated samples": mean([sum(r.series("generated_samples")) for r in runs]),
        "mixed-outcome groups trained/step": step_mean(kept),
        "wall time (s)": mean([r.wall_seconds for r in runs]),
    }


PAIR_QUANTITIES = ("step time (s)", "generation tok/s", "training tok/s", "wall time (s)")
"""Throughput quantities also shown per seed (`pair_table`)."""


def pair_table(ours: Sequence[Run], trl: Sequence[Run], target: float, window: int) -> str:
    """Per seed (a megatron-dapo run and the TRL run right after it, so under similar machine
    load): each of `PAIR_QUANTITIES` as `megatron-dapo / TRL (ratio)`."""
    lines = [f"| seed | {' | '.join(PAIR_QUANTITIES)} |", "|---" * (len(PAIR_QUANTITIES) + 1) + "|"]
    for a, b in zip(ours, trl, strict=True):
        row_a, row_b = throughput_row([a], target, window), throughput_row([b], target, window)
        cells = [
            f"{fmt(row_a[q])} / {fmt(row_b[q])} ({ratio(row_a[q], row_b[q])})"
            for q in PAIR_QUANTITIES
        ]
        lines.append(f"| {a.seed} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "trl")
    parser.set_defaults(seeds=[1])
    args = parser.parse_args(argv)
    runs: dict[str, list[Run]] = {"megatron-dapo": [], "TRL": []}
    for seed in args.seeds:
        ours = run_megatron_dapo("DAPO", seed, args.steps, args.out, args.reuse)
        runs["megatron-dapo"].append(ours)
        runs["TRL"].append(run_trl(ours.run_dir, seed, args.steps, args.out, args.reuse))
    rows = {n: throughput_row(r, args.target, args.window) for n, r in runs.items()}
    per_seed = {n: per_seed_steps(r, args.target, args.window) for n, r in runs.items()}
    print(
        f"megatron-dapo (DAPO, EP2 + SGLang) vs TRL GRPOTrainer (loss_type=dapo), {args.steps} "
        f"steps, seeds {args.seeds}, target accuracy {args.target} ({args.window}-step "
        "trailing mean)\n"
    )
    print(markdown_table(rows, per_seed))
    print("\nPer seed, megatron-dapo / TRL (ratio), each pair run back to back:\n")
    print(pair_table(runs["megatron-dapo"], runs["TRL"], args.target, args.window))


if __name__ == "__main__":
    main()
