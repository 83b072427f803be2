"""A megatron-dapo run config's task trained with TRL's `GRPOTrainer`, for comparison.

Runs in TRL's own environment (`make trl-env`; trl, torch, transformers, datasets and
math-verify), not the project's: `benchmarks/trl_comparison.py` writes the inputs with the
project's code and then starts this script. Inputs:

* `--model`: the HF checkpoint megatron-dapo starts from (for a random-init config such as the
  demo, the one its run wrote), so both trainers start from the same weights;
* `--prompts`: JSON lines `{"prompt": [chat messages], "answer": str}` in the order the run
  config's seeded prompt source yields them; read in that order (`shuffle_dataset=False`);
* `--settings`: JSON of the run config's settings as TRL arguments (`trl_comparison.
  trl_settings` derives them and refuses what TRL cannot match): prompts per step, G, the
  optimizer-step and micro-batch sizes, the response length (and `ignore_eos`: every response
  that long), sampling, the stop tokens, AdamW and its schedule, clip eps_low / eps_high, the
  KL coefficient, the loss type, the reward function (the project's own, imported from
  `pipeline.rewards`), `score_truncated` and the overlong shaping.

As megatron-dapo: rewards +1 / -1 by the project's reward function, a response cut at the
length limit scored wrong when `score_truncated` is `wrong`, plus DAPO's soft overlong
punishment when configured; group-normalised advantages; optimizer steps of `mini_batch`
responses with ratios against the policy that generated (TRL recomputes its old log-probs).
Not matched: dynamic sampling (TRL trains every group, including all-correct and all-wrong
ones whose advantages are 0), generation overlapping training, the weight sync (one process).

Writes `<out>/metrics.jsonl`, one line per RL step: `step`, `accuracy` (correct fraction of the
step's responses), `entropy` (nats per completion token, mean of the step's optimizer steps, as
TRL logs it), `generated_samples`, `kept_groups` (all: TRL filters nothing),
`informative_groups` (groups with non-zero reward spread, the ones that DAPO's dynamic sampling
would keep), `trained_tokens` (prompt + completion tokens of the step, padding excluded),
`phase_seconds` (`generate`: TRL's `_generate_and_score_completions` without the old log-probs,
i.e. sampling, reward and advantages; `old_log_probs`: the forward passes it makes for them;
`train`: the rest of the step), `generation_tokens_per_second` (completion tokens over the
time of the sampling call `_generate` alone) and `training_tokens_per_second` (trained tokens
over the `train` phase).

    $TRL_VENV/bin/python benchmarks/trl_grpo.py --model DIR --prompts FILE --settings FILE \
        --steps 40 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import load_dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the project's reward functions (pipeline.rewards: stdlib only)

from pipeline.overlong import soft_overlong_punishment  # noqa: E402
from pipeline.rewards.dapo_math import dapo_math_reward  # noqa: E402
from pipeline.rewards.exact_match import exact_match_reward  # noqa: E402


def reward_function(name: str) -> Callable[[str, str], Any]:
    """The project's registered reward function `name` (`dapo_math`, `exact_match` or
    `math_verify`, whose math-verify times out with `signal.alarm`: TRL calls rewards in the main
    thread); it returns a `RewardResult`."""
    if name == "dapo_math":
        return dapo_math_reward
    if name == "exact_match":
        return exact_match_reward
    from pipeline.rewards.math_verify_fn import math_verify_reward

    return math_verify_reward


@dataclass
class StepLog:
    """What the trainer hooks saw, one entry per generation batch (RL step) or optimizer step."""

    samples_per_step: int
    groups_per_step: int
    optimizer_steps_per_rl_step: int
    correct: list[int] = field(default_factory=list)
    informative_groups: list[int] = field(default_factory=list)
    sample_seconds: list[float] = field(default_factory=list)
    generate_seconds: list[float] = field(default_factory=list)
    old_log_prob_seconds: list[float] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    trained_tokens: list[int] = field(default_factory=list)
    optimizer_step_seconds: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        """One `metrics.jsonl` record per RL step (see the module docstring)."""
        k = self.optimizer_steps_per_rl_step
        records = []
        for step in range(len(self.optimizer_step_seconds) // k):
            step_seconds = sum(self.optimizer_step_seconds[step * k : (step + 1) * k])
            generate, sampling = self.generate_seconds[step], self.sample_seconds[step]
            old = self.old_log_prob_seconds[step]
            train = step_seconds - generate
            entropy = self.entropy[step * k : (step + 1) * k]
            records.append(
                {
                    "step": step,
                    "accuracy": self.correct[step] / self.samples_per_step,
                    "entropy": sum(entropy) / max(len(entropy), 1),
                    "generated_samples": self.samples_per_step,
                    "kept_groups": self.groups_per_step,
                    "informative_groups": self.informative_groups[step],
                    "trained_tokens": self.trained_tokens[step],
                    "phase_seconds": {
                        "generate": generate - old,
                        "old_log_probs": old,
                        "train": train,
                    },
                    "generation_tokens_per_second": self.completion_tokens[step] / sampling,
                    "training_tokens_per_second": self.trained_tokens[step] / train,
                }
            )
        return records


class TimedGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` that times its generation phase (and the old log-probs within it), counts
    its tokens into `step_log`, and stops generation at `stop_token_ids` (megatron-dapo's)."""

    def __init__(
        self, *args: Any, step_log: StepLog, stop_token_ids: Sequence[int], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.step_log = step_log
        self.eos_token_ids = list(stop_token_ids)  # completion masks end at these
        self._old_log_prob_seconds: float | None = None

    def _generate(self, prompts: list) -> Any:
        started = time.perf_counter()
        output = super()._generate(prompts)
        self.step_log.sample_seconds.append(time.perf_counter() - started)
        return output

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        output = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._old_log_prob_seconds is not None:  # inside _generate_and_score_completions
            self._old_log_prob_seconds += time.perf_counter() - started
        return output

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        started, self._old_log_prob_seconds = time.perf_counter(), 0.0
        output = super()._generate_and_score_completions(inputs)
        self.step_log.generate_seconds.append(time.perf_counter() - started)
        self.step_log.old_log_prob_seconds.append(self._old_log_prob_seconds)
        self._old_log_prob_seconds = None
        completion = int(output["completion_mask"].sum())
        self.step_log.completion_tokens.append(completion)
        self.step_log.trained_tokens.append(int(output["prompt_mask"].sum()) + completion)
        return output


class OptimizerStepTimer(TrainerCallback):
    """Wall time and logged entropy of every optimizer step (`logging_steps=1`)."""

    def __init__(self, step_log: StepLog) -> None:
        self.step_log = step_log
        self._started = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_log.optimizer_step_seconds.append(time.perf_counter() - self._started)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "entropy" in logs:
            self.step_log.entropy.append(float(logs["entropy"]))


def project_reward(step_log: StepLog, settings: dict[str, Any]):
    """TRL reward function: the project's reward (+1 / -1) of each completion, a response cut
    at the length limit scored wrong with `score_truncated: wrong`, plus the soft overlong
    punishment when configured (`pipeline.overlong`), as megatron-dapo's queue scores.

    Also records the batch's correct count and its groups with mixed outcomes into `step_log`
    (TRL scores one generation batch, the step's groups in order, per call).
    """
    judge = reward_function(settings["reward"])
    limit, stops = settings["max_completion_length"], set(settings["stop_token_ids"])
    overlong, group = settings["overlong"], settings["generations"]

    def reward(
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]],
        answer: Sequence[str],
        **_: Any,
    ) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        truncated = [len(ids) >= limit and ids[-1] not in stops for ids in completion_ids]
        correct = [
            judge(t, a).acc and not (cut and settings["score_truncated"] == "wrong")
            for t, a, cut in zip(texts, answer, truncated, strict=True)
        ]
        groups = [correct[i : i + group] for i in range(0, len(correct), group)]
        step_log.correct.append(sum(correct))
        step_log.informative_groups.append(sum(0 < sum(g) < len(g) for g in groups))
        rewards = [1.0 if c else -1.0 for c in correct]
        if overlong["soft_punishment"]:
            lengths = [len(ids) for ids in completion_ids]
            shaping = soft_overlong_punishment(lengths, limit, overlong["cache_length"])
            rewards = [r + float(p) for r, p in zip(rewards, shaping, strict=True)]
        return rewards

    reward.__name__ = settings["reward"]
    return reward


def grpo_config(out: Path, steps: int, seed: int, s: dict[str, Any]) -> GRPOConfig:
    """The run config's settings (`s`, see the module docstring) as TRL arguments."""
    samples = s["prompts_per_step"] * s["generations"]
    generation_kwargs: dict[str, Any] = {"eos_token_id": list(s["stop_token_ids"])}
    if s["ignore_eos"]:
        generation_kwargs["min_new_tokens"] = s["max_completion_length"]
    return GRPOConfig(
        output_dir=str(out / "trainer"),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=seed,
        max_steps=steps * samples // s["mini_batch"],
        per_device_train_batch_size=s["micro_batch"],
        gradient_accumulation_steps=s["mini_batch"] // s["micro_batch"],
        steps_per_generation=samples // s["micro_batch"],
        num_generations=s["generations"],
        max_completion_length=s["max_completion_length"],
        generation_kwargs=generation_kwargs,
        mask_truncated_completions=s["overlong"]["filter_truncated"],
        temperature=s["temperature"],
        top_p=s["top_p"],
        top_k=s["top_k"],
        shuffle_dataset=False,
        learning_rate=s["lr"],
        lr_scheduler_type=s["lr_scheduler_type"],
        warmup_steps=s["warmup_steps"],
        weight_decay=s["weight_decay"],
        adam_beta1=s["adam_beta1"],
        adam_beta2=s["adam_beta2"],
        adam_epsilon=s["adam_epsilon"],
        max_grad_norm=s["max_grad_norm"],
        epsilon=s["eps_low"],
        epsilon_high=s["eps_high"],
        beta=s["beta"],
        loss_type=s["loss_type"],
        scale_rewards="group",
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="initial HF checkpoint")
    parser.add_argument("--prompts", type=Path, required=True, help="JSON lines prompt, answer")
    parser.add_argument("--settings", type=Path, required=True, help="JSON of the run's settings")
    parser.add_argument("--steps", type=int, required=True, help="RL steps")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    settings = json.loads(args.settings.read_text())
    samples = settings["prompts_per_step"] * settings["generations"]
    step_log = StepLog(samples, settings["prompts_per_step"], samples // settings["mini_batch"])
    dataset = load_dataset("json", data_files=str(args.prompts), split="train")
    trainer = TimedGRPOTrainer(
        model=str(args.model),
        reward_funcs=project_reward(step_log, settings),
        args=grpo_config(args.out, args.steps, args.seed, settings),
        train_dataset=dataset,
        callbacks=[OptimizerStepTimer(step_log)],
        step_log=step_log,
        stop_token_ids=settings["stop_token_ids"],
    )
    trainer.train()
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "metrics.jsonl").open("w") as log:
        for record in step_log.records():
            log.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
