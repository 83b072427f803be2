"""The CPU demo's task trained with TRL's `GRPOTrainer` (`loss_type="dapo"`), for comparison.

Runs in TRL's own environment (`make trl-env`; needs only trl, torch, transformers, datasets),
not the project's: `benchmarks/trl_comparison.py` writes the inputs with the project's code and
then starts this script. Inputs:

* `--model`: the HF checkpoint megatron-dapo starts from (the demo's random-init Mixtral-layout
  MoE policy and its character tokenizer), so both trainers start from the same weights;
* `--prompts`: JSON lines `{"prompt": [chat messages], "answer": str}` in the order the demo's
  seeded prompt source yields them; read in that order (`shuffle_dataset=False`).

The run mirrors `configs/demo-cpu.yaml`: 16 prompts x 16 generations per RL step, one-token
completions at temperature 1.0 (full vocabulary), reward +1 / -1 by exact match of the stripped
completion (the project's `exact_match`), group-normalised advantages, clip 0.2 / 0.28, no KL
(beta 0), AdamW lr 1e-3 constant after 2 warm-up optimizer steps (transformers' warm-up
starts at lr 0 on the first optimizer step, Megatron's schedule as megatron-dapo steps it at
lr / 2, so TRL's warm-up lags by one of the run's 80 optimizer steps), no weight decay, gradient
clip 1.0, and two optimizer steps (mini-batches of 128 responses) per RL step, both with
ratios against the policy that generated (TRL recomputes its log-probs with the training model
before the first step; megatron-dapo takes SGLang's sampling log-probs). No dynamic sampling:
every group is trained on, including all-correct and all-wrong groups whose advantages are 0.

Writes `<out>/metrics.jsonl`, one line per RL step: `step`, `accuracy` (correct fraction of the
step's 256 responses), `entropy` (nats per completion token, mean of the step's optimizer
steps, as TRL logs it), `generated_samples`, `kept_groups` (all 16: TRL filters nothing),
`informative_groups` (groups with non-zero reward spread, the ones that DAPO's dynamic sampling
would keep), `trained_tokens` (prompt + completion tokens of the step, padding excluded),
`phase_seconds` (`generate`: TRL's `_generate_and_score_completions`, i.e. sampling, reward,
advantages and the old log-probs; `train`: the rest of the step), `generation_tokens_per_second`
(completion tokens over the time of the sampling call `_generate` alone) and
`training_tokens_per_second` (trained tokens over the `train` phase).

    $TRL_VENV/bin/python benchmarks/trl_grpo.py --model DIR --prompts FILE --steps 40 --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import load_dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

PROMPTS_PER_STEP = 16
GENERATIONS_PER_PROMPT = 16
OPTIMIZER_STEPS_PER_RL_STEP = 2


@dataclass
class StepLog:
    """What the trainer hooks saw, one entry per generation batch (RL step) or optimizer step."""

    correct: list[int] = field(default_factory=list)
    informative_groups: list[int] = field(default_factory=list)
    sample_seconds: list[float] = field(default_factory=list)
    generate_seconds: list[float] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    trained_tokens: list[int] = field(default_factory=list)
    optimizer_step_seconds: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        """One `metrics.jsonl` record per RL step (see the module docstring)."""
        k, samples = OPTIMIZER_STEPS_PER_RL_STEP, PROMPTS_PER_STEP * GENERATIONS_PER_PROMPT
        records = []
        for step in range(len(self.optimizer_step_seconds) // k):
            step_seconds = sum(self.optimizer_step_seconds[step * k : (step + 1) * k])
            generate, sampling = self.generate_seconds[step], self.sample_seconds[step]
            entropy = self.entropy[step * k : (step + 1) * k]
            records.append(
                {
                    "step": step,
                    "accuracy": self.correct[step] / samples,
                    "entropy": sum(entropy) / len(entropy),
                    "generated_samples": samples,
                    "kept_groups": PROMPTS_PER_STEP,
                    "informative_groups": self.informative_groups[step],
                    "trained_tokens": self.trained_tokens[step],
                    "phase_seconds": {"generate": generate, "train": step_seconds - generate},
                    "generation_tokens_per_second": self.completion_tokens[step] / sampling,
                    "training_tokens_per_second": self.trained_tokens[step]
                    / (step_seconds - generate),
                }
            )
        return records


class TimedGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` that times its generation phase and counts its tokens into `step_log`."""

    def __init__(self, *args: Any, step_log: StepLog, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_log = step_log

    def _generate(self, prompts: list) -> Any:
        started = time.perf_counter()
        output = super()._generate(prompts)
        self.step_log.sample_seconds.append(time.perf_counter() - started)
        return output

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        started = time.perf_counter()
        output = super()._generate_and_score_completions(inputs)
        self.step_log.generate_seconds.append(time.perf_counter() - started)
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


def exact_match_reward(step_log: StepLog):
    """TRL reward function: +1 if the stripped completion equals the answer, else -1.

    Also records the batch's correct count and its groups with mixed outcomes into `step_log`
    (TRL scores one generation batch, `PROMPTS_PER_STEP` groups in order, per call).
    """

    def exact_match(completions: Sequence[Any], answer: Sequence[str], **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        correct = [t.strip() == a.strip() for t, a in zip(texts, answer, strict=True)]
        groups = [
            correct[i : i + GENERATIONS_PER_PROMPT]
            for i in range(0, len(correct), GENERATIONS_PER_PROMPT)
        ]
        step_log.correct.append(sum(correct))
        step_log.informative_groups.append(sum(0 < sum(g) < len(g) for g in groups))
        return [1.0 if c else -1.0 for c in correct]

    return exact_match


def grpo_config(out: Path, steps: int, seed: int) -> GRPOConfig:
    """The demo's hyper-parameters as TRL arguments (see the module docstring)."""
    samples = PROMPTS_PER_STEP * GENERATIONS_PER_PROMPT
    return GRPOConfig(
        output_dir=str(out / "trainer"),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=seed,
        max_steps=steps * OPTIMIZER_STEPS_PER_RL_STEP,
        per_device_train_batch_size=samples // OPTIMIZER_STEPS_PER_RL_STEP,
        gradient_accumulation_steps=1,
        steps_per_generation=OPTIMIZER_STEPS_PER_RL_STEP,
        num_generations=GENERATIONS_PER_PROMPT,
        max_completion_length=1,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        shuffle_dataset=False,
        learning_rate=1e-3,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=2,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        epsilon=0.2,
        epsilon_high=0.28,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="initial HF checkpoint")
    parser.add_argument("--prompts", type=Path, required=True, help="JSON lines prompt, answer")
    parser.add_argument("--steps", type=int, required=True, help="RL steps")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    step_log = StepLog()
    dataset = load_dataset("json", data_files=str(args.prompts), split="train")
    trainer = TimedGRPOTrainer(
        model=str(args.model),
        reward_funcs=exact_match_reward(step_log),
        args=grpo_config(args.out, args.steps, args.seed),
        train_dataset=dataset,
        callbacks=[OptimizerStepTimer(step_log)],
        step_log=step_log,
    )
    trainer.train()
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "metrics.jsonl").open("w") as log:
        for record in step_log.records():
            log.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
