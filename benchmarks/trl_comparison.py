"""megatron-dapo versus TRL's `GRPOTrainer` on one run config, on this machine.

Any run config (default the CPU demo, `configs/demo-cpu.yaml`) with optional dotted overrides;
`trl_settings` derives the TRL side's settings from it in one place and refuses, with every
reason at once, what TRL cannot match. Per seed, back to back so that both see the same machine
load:

1. `megatron-dapo train CONFIG [overrides]` (as `benchmarks/learning.py` runs it: seed in
   `training.seed` and `data.seed`, held-out evaluation off, no Prometheus endpoint);
2. this script writes the prompts that the config's seeded prompt source yields (`steps x
   prompts_per_step` of them, as chat messages + answer) and the settings next to the run, and
   starts `benchmarks/trl_grpo.py` in TRL's own environment (`make trl-env`, built here if
   missing) on the same initial checkpoint (a random-init config's: the one the megatron-dapo
   run wrote): one process, generation with `transformers` `generate`.

What TRL matches: the initial weights, the prompt stream, G (`rollout.n_samples_per_prompt`),
prompts per step, the optimizer-step size (`training.mini_batch_size`), the response length
(`rollout.ignore_eos`: every response that long), temperature / top-p / top-k, the stop tokens,
AdamW and its schedule, clip eps_low / eps_high, the loss aggregation (`token-mean` = TRL's
`dapo`, `seq-mean-token-mean` = `grpo`), GRPO advantages, the project's reward function,
`reward.score_truncated` and the overlong shaping. Not matched (reported, not refused): dynamic
sampling (TRL trains every group), overlapping generation with training
(`rollout.max_staleness`), the fleet's weight sync, and megatron-dapo's parallel layout. TRL's
micro-batch (`--trl-micro-batch`; default the largest divisor of the mini-batch whose padded
rows fit `TRL_MICRO_BATCH_TOKENS`) is memory only.

The table compares, per trainer (means over steps and seeds): step time and its split into
generate / old log-probs / train / weight sync / prefetch wait + eval, the trainer's idle share
(megatron-dapo: the phases in which it waits for the fleet, `TRAINER_IDLE_PHASES`; TRL: its
generate phase, in which its one process samples instead of training) and the fleet's
(megatron-dapo only), generation tokens/s (response tokens over the sampling time), training
tokens/s (prompt + response tokens of the trained samples over the `train` phase) and end to
end (over the whole step); where a `--target` accuracy is given (default: 0.06 for the demo,
none otherwise), accuracy of the first and last `--window` steps and steps, samples and
summed step time to the target; generated samples, mixed-outcome groups trained per step and
wall time (start-up included). A second table repeats the throughput per seed pair: its ratio
is the one to trust when other jobs load the machine.

    PYTHONPATH=. python benchmarks/trl_comparison.py                       # demo, 1 seed x 40 steps
    PYTHONPATH=. python benchmarks/trl_comparison.py configs/bench-dense-25m.yaml --seeds 1 2
    PYTHONPATH=. python benchmarks/trl_comparison.py configs/smollm2-135m-cpu.yaml --target 0.75
    PYTHONPATH=. python benchmarks/trl_comparison.py CONFIG key=value ... --steps 2  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.learning import (
    DEMO_CONFIG,
    REPO,
    Cell,
    Run,
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

BENCHMARK_OVERRIDES = ("eval.interval=0",)
"""Applied to every megatron-dapo run: TRL has no held-out evaluation to match."""
DEMO_TARGET = 0.06
"""`--target` of the demo (accuracy, trailing mean); other configs have none unless given."""
TRL_MICRO_BATCH_TOKENS = 8192
"""Padded tokens (longest prompt + response length, times the rows) of TRL's default
micro-batch: memory only, the optimizer step is `training.mini_batch_size` either way."""
TRL_REWARDS = ("dapo_math", "exact_match", "math_verify")
"""Reward functions `trl_grpo.py` imports from the project (`pipeline.rewards`)."""
TRL_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
"""`optimizer.lr_decay_style` as transformers' `lr_scheduler_type` (warm-up included)."""
TRL_LOSS_TYPES = {"token-mean": "dapo", "seq-mean-token-mean": "grpo"}
"""`algorithm.loss_aggregation` as TRL's `loss_type` (both with clip eps_low / eps_high)."""
NOT_AVAILABLE = "n/a"


def trl_python() -> Path:
    """The TRL environment's interpreter (`make trl-env` builds it if needed and names it)."""
    output = subprocess.run(
        ["make", "-s", "-C", str(REPO), "trl-env"], check=True, capture_output=True, text=True
    ).stdout
    return Path(output.strip().splitlines()[-1].split(": ", 1)[1]) / "bin" / "python"


def trl_mismatches(config: Any) -> list[str]:
    """What of run config `config` TRL's `GRPOTrainer` (as `trl_grpo.py` drives it) cannot
    match; empty if it matches everything but the documented differences."""
    algorithm, rollout, optimizer = config.algorithm, config.rollout, config.optimizer
    problems = []
    if algorithm.policy_loss not in ("dapo", "grpo"):
        problems.append(f"algorithm.policy_loss={algorithm.policy_loss} (TRL: dapo or grpo)")
    if algorithm.loss_aggregation not in TRL_LOSS_TYPES:
        problems.append(
            f"algorithm.loss_aggregation={algorithm.loss_aggregation} (TRL: {list(TRL_LOSS_TYPES)})"
        )
    if algorithm.advantage.estimator != "grpo":
        problems.append(f"algorithm.advantage.estimator={algorithm.advantage.estimator} (grpo)")
    if algorithm.eps_high_end is not None:
        problems.append("algorithm.eps_high_end (TRL's eps_high is constant)")
    if algorithm.dual_clip_c is not None:
        problems.append("algorithm.dual_clip_c (no dual clip in TRL's dapo/grpo loss)")
    if algorithm.kl_coef > 0:
        problems.append("algorithm.kl_coef > 0 (the reference KL is not matched here)")
    if algorithm.entropy_coef > 0:
        problems.append("algorithm.entropy_coef > 0 (no entropy bonus in TRL)")
    if algorithm.rollout_correction.mode != "none":
        problems.append("algorithm.rollout_correction (TRL corrects only vLLM rollouts)")
    if config.reward.function not in TRL_REWARDS:
        problems.append(f"reward.function={config.reward.function} (TRL side: {TRL_REWARDS})")
    if rollout.stop:
        problems.append("rollout.stop (stop strings are not passed to TRL's generate)")
    if not config.data.apply_chat_template:
        problems.append("data.apply_chat_template=false (TRL templates chat prompts)")
    if optimizer.min_lr > 0 and optimizer.lr_decay_style != "constant":
        problems.append("optimizer.min_lr > 0 (transformers' schedules decay to 0)")
    samples = config.training.prompts_per_step * rollout.n_samples_per_prompt
    if samples % config.training.mini_batch_size:
        problems.append(
            f"training.mini_batch_size={config.training.mini_batch_size} does not divide the "
            f"{samples} responses of a step"
        )
    return problems


def trl_settings(config: Any, model: Path, longest_prompt: int, micro_batch: int | None) -> dict:
    """Run config `config`'s settings as `trl_grpo.py --settings` (see its docstring), for the
    initial checkpoint `model` and prompts of at most `longest_prompt` tokens.

    Raises:
        ValueError: naming every setting TRL cannot match (`trl_mismatches`).
    """
    from pipeline.stop_tokens import default_stop_token_ids, resolve_stop_token_ids

    problems = trl_mismatches(config)
    if problems:
        raise ValueError("TRL cannot match this run config: " + "; ".join(problems))
    rollout, optimizer, algorithm = config.rollout, config.optimizer, config.algorithm
    mini_batch = config.training.mini_batch_size
    if micro_batch is None:
        rows = TRL_MICRO_BATCH_TOKENS // (longest_prompt + rollout.max_response_length)
        micro_batch = max(
            d for d in range(1, mini_batch + 1) if mini_batch % d == 0 and d <= max(rows, 1)
        )
    elif mini_batch % micro_batch:
        raise ValueError(f"--trl-micro-batch {micro_batch} does not divide {mini_batch}")
    # ignore_eos: TRL suppresses the end-of-sequence ids until the limit (min_new_tokens)
    stops = (
        default_stop_token_ids(model)
        if rollout.ignore_eos
        else resolve_stop_token_ids(rollout.stop_token_ids, model)
    )
    overlong = config.reward.overlong
    return {
        "prompts_per_step": config.training.prompts_per_step,
        "generations": rollout.n_samples_per_prompt,
        "mini_batch": mini_batch,
        "micro_batch": micro_batch,
        "max_completion_length": rollout.max_response_length,
        "ignore_eos": rollout.ignore_eos,
        "stop_token_ids": list(stops),
        "temperature": rollout.temperature,
        "top_p": rollout.top_p,
        "top_k": max(rollout.top_k, 0),
        "lr": optimizer.lr,
        "lr_scheduler_type": TRL_SCHEDULES[optimizer.lr_decay_style],
        "warmup_steps": optimizer.lr_warmup_steps,
        "weight_decay": optimizer.weight_decay,
        "adam_beta1": optimizer.adam_beta1,
        "adam_beta2": optimizer.adam_beta2,
        "adam_epsilon": optimizer.adam_eps,
        "max_grad_norm": optimizer.clip_grad,
        "eps_low": algorithm.eps_low,
        "eps_high": algorithm.eps_high,
        "beta": 0.0,
        "loss_type": TRL_LOSS_TYPES[algorithm.loss_aggregation],
        "reward": config.reward.function,
        "score_truncated": config.reward.score_truncated,
        "overlong": {
            "soft_punishment": overlong.soft_punishment,
            "cache_length": overlong.cache_length,
            "filter_truncated": overlong.filter_truncated,
        },
    }


def write_prompts(config: Any, model_dir: Path, count: int, path: Path) -> int:
    """The first `count` prompts of `config`'s prompt stream (its `data.seed`), as JSON lines
    `{"prompt": [messages], "answer": str}` (the chat template is applied by TRL); returns the
    longest prompt's token count (chat template included)."""
    from transformers import AutoTokenizer

    from pipeline.prompts import PromptSource

    source = PromptSource.from_config(config.data, AutoTokenizer.from_pretrained(model_dir))
    longest = 0
    with path.open("w") as out:
        for prompt in source.next_prompts(count):
            messages = source.rows[prompt.row_index].messages
            out.write(json.dumps({"prompt": messages, "answer": prompt.ground_truth}) + "\n")
            longest = max(longest, len(prompt.input_ids))
    return longest


def initial_model(config: Any, megatron_run: Path) -> Path:
    """The checkpoint both trainers start from: the megatron-dapo run's random-init policy, or
    the config's `model.hf_checkpoint`."""
    if config.model.random_init is not None:
        return megatron_run / "initial-model"
    return Path(config.model.hf_checkpoint)


def run_trl(
    config_path: Path,
    overrides: Sequence[str],
    megatron_run: Path,
    seed: int,
    steps: int,
    out: Path,
    reuse: bool,
    micro_batch: int | None,
) -> Run:
    """TRL's GRPOTrainer on the run config, from the initial weights of `megatron_run`."""
    from megatron_dapo.config.loading import load_config

    run_dir = out / f"trl-seed{seed}-steps{steps}"
    if not (reuse and (run_dir / "wall.json").is_file()):
        print(f"[trl] seed {seed}: {run_dir}", file=sys.stderr, flush=True)
        config = load_config(config_path, [*overrides, f"data.seed={seed}"])
        model = initial_model(config, megatron_run)
        prompts = out / f"prompts-seed{seed}-steps{steps}.jsonl"
        longest = write_prompts(config, model, steps * config.training.prompts_per_step, prompts)
        settings = out / f"trl-settings-seed{seed}.json"
        settings.write_text(json.dumps(trl_settings(config, model, longest, micro_batch), indent=1))
        command = [str(trl_python()), str(REPO / "benchmarks" / "trl_grpo.py")]
        command += ["--model", str(model), "--prompts", str(prompts), "--steps", str(steps)]
        command += ["--settings", str(settings), "--seed", str(seed), "--out", str(run_dir)]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        run_subprocess(command, run_dir, env)
    return load_run(run_dir, "TRL", seed, samples_per_group=0)


def _phase(record: Mapping[str, Any], *phases: str) -> float:
    return sum(float(record["phase_seconds"].get(p, 0.0)) for p in phases)


def trainer_idle(record: Mapping[str, Any]) -> float:
    """Seconds of the step in which the trainer did not train: megatron-dapo's
    `trainer_idle_seconds`; TRL's generate phase (its one process samples meanwhile)."""
    if "trainer_idle_seconds" in record:
        return float(record["trainer_idle_seconds"])
    return _phase(record, "generate")


def throughput_row(
    runs: Sequence[Run], target: float | None, window: int, filtered: bool = True
) -> dict[str, Cell]:
    """One trainer's numbers (means over steps, then over `runs`, one run per seed);
    `filtered`: megatron-dapo's dynamic sampling is on (its kept groups are the mixed-outcome
    ones; off, it does not count them)."""
    ours = "trainer_idle_seconds" in runs[0].records[0]

    def step_mean(value: Any) -> float:
        return mean([mean([value(s) for s in r.records]) for r in runs])

    def phase(*phases: str) -> float:
        return step_mean(lambda s: _phase(s, *phases))

    kept = "informative_groups" if "informative_groups" in runs[0].records[0] else "kept_groups"
    row: dict[str, Cell] = {
        "step time (s)": step_mean(step_seconds),
        "generate (s/step)": phase("generate"),
        "old log-probs (s/step)": phase("old_log_probs"),
        "train (s/step)": phase("train"),
        "weight sync (s/step)": phase("weight_sync") if ours else NOT_AVAILABLE,
        "prefetch wait + eval (s/step)": phase("prefetch_wait", "eval") if ours else NOT_AVAILABLE,
        "trainer idle (% of step)": 100 * step_mean(lambda s: trainer_idle(s) / step_seconds(s)),
        "fleet idle (% of step)": (
            100 * step_mean(lambda s: float(s["fleet_idle_ratio"])) if ours else NOT_AVAILABLE
        ),
        "generation tok/s": step_mean(lambda s: float(s["generation_tokens_per_second"])),
        "training tok/s": step_mean(lambda s: float(s["training_tokens_per_second"])),
        "end-to-end training tok/s": step_mean(
            lambda s: float(s["trained_tokens"]) / step_seconds(s)
        ),
    }
    if target is not None:
        accuracy = mean_curve(runs, "accuracy")
        row["accuracy first"] = window_mean(accuracy, "start", window)
        row["accuracy last"] = window_mean(accuracy, "end", window)
        row.update(target_rows(runs, target, window))
    row["generated samples"] = mean([sum(r.series("generated_samples")) for r in runs])
    row["mixed-outcome groups trained/step"] = (
        step_mean(lambda s: float(s[kept])) if filtered or not ours else NOT_AVAILABLE
    )
    row["wall time (s)"] = mean([r.wall_seconds for r in runs])
    return row


PAIR_QUANTITIES = (
    "step time (s)",
    "generate (s/step)",
    "train (s/step)",
    "trainer idle (% of step)",
    "generation tok/s",
    "training tok/s",
    "end-to-end training tok/s",
    "wall time (s)",
)
"""Throughput quantities also shown per seed (`pair_table`)."""


def pair_table(
    ours: Sequence[Run], trl: Sequence[Run], target: float | None, window: int, filtered: bool
) -> str:
    """Per seed (a megatron-dapo run and the TRL run right after it, so under similar machine
    load): each of `PAIR_QUANTITIES` (and the step time to target) as `megatron-dapo / TRL
    (ratio)`."""
    quantities = PAIR_QUANTITIES + (("step time to target (s)",) if target is not None else ())
    lines = [f"| seed | {' | '.join(quantities)} |", "|---" * (len(quantities) + 1) + "|"]
    for a, b in zip(ours, trl, strict=True):
        row_a = throughput_row([a], target, window, filtered)
        row_b = throughput_row([b], target, window, filtered)
        cells = [
            f"{fmt(row_a[q])} / {fmt(row_b[q])} ({ratio(row_a[q], row_b[q])})" for q in quantities
        ]
        lines.append(f"| {a.seed} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from megatron_dapo.config.loading import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", type=Path, default=DEMO_CONFIG, help="run config")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. rollout.temperature=0.7"
    )
    parser.add_argument("--steps", type=int, help="RL steps per run (default: the config's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--target", type=float, help="target accuracy (demo default 0.06)")
    parser.add_argument("--window", type=int, default=5, help="steps of the trailing mean")
    parser.add_argument("--out", type=Path, help="default runs/benchmarks/trl-<config name>")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --out")
    parser.add_argument("--trl-micro-batch", type=int, help="TRL's rows per forward/backward")
    args = parser.parse_args(argv)
    config_path = args.config.resolve()
    overrides = [*BENCHMARK_OVERRIDES, *args.overrides]
    config = load_config(config_path, overrides)
    problems = trl_mismatches(config)  # before any training
    if problems:
        parser.error("TRL cannot match this run config: " + "; ".join(problems))
    steps = args.steps or config.training.steps
    target = args.target
    if target is None and config_path == DEMO_CONFIG.resolve():
        target = DEMO_TARGET
    window = min(args.window, steps)
    out = args.out or REPO / "runs" / "benchmarks" / f"trl-{config_path.stem}"
    runs: dict[str, list[Run]] = {"megatron-dapo": [], "TRL": []}
    for seed in args.seeds:
        ours = run_megatron_dapo("DAPO", seed, steps, out, args.reuse, config_path, overrides)
        runs["megatron-dapo"].append(ours)
        runs["TRL"].append(
            run_trl(
                config_path,
                overrides,
                ours.run_dir,
                seed,
                steps,
                out,
                args.reuse,
                args.trl_micro_batch,
            )
        )
    filtered = config.algorithm.dynamic_sampling.enabled
    rows = {n: throughput_row(r, target, window, filtered) for n, r in runs.items()}
    per_seed = (
        {n: per_seed_steps(r, target, window) for n, r in runs.items()}
        if target is not None
        else None
    )
    schedule = (
        f"max_staleness {config.rollout.max_staleness}"
        if config.rollout.overlaps_generation
        else "generation, then training"
    )
    name = " ".join([config_path.name, *args.overrides])
    loss_type = TRL_LOSS_TYPES[config.algorithm.loss_aggregation]
    goal = f"target accuracy {target} ({window}-step trailing mean)" if target else "no target"
    print(
        f"megatron-dapo ({name}; {config.launch.world_size} ranks + "
        f"{config.rollout.num_servers} SGLang server(s), {schedule}) vs TRL GRPOTrainer "
        f"(loss_type={loss_type}), {steps} steps, seeds {args.seeds}, {goal}\n"
    )
    print(markdown_table(rows, per_seed))
    print("\nPer seed, megatron-dapo / TRL (ratio), each pair run back to back:\n")
    print(pair_table(runs["megatron-dapo"], runs["TRL"], target, window, filtered))


if __name__ == "__main__":
    main()
