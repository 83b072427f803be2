"""Evaluation of the policy the fleet serves on held-out prompt sets (`eval:`).

    evaluator = Evaluator.create(config.eval, config.rollout, config.reward.score_truncated,
                                 tokenizer, scorer, stop_token_ids, metrics)
    report = await evaluator.evaluate(engine, policy_version)     # -> EvalReport

Each dataset of `eval.datasets` is a fixed prompt set, loaded once (`held_out_prompts`: the
first `max_prompts` prompts of its own seeded order; the training prompt stream is never
touched). An evaluation sends every prompt of every dataset as one request of `n_samples`
responses through the engine, as the dynamic-sampling queue sends its groups (the fleet's
`RolloutClient` bounds what is in flight), with `eval.temperature` / `top_p` and
`max_response_length`. Response i of the prompt at position p of a dataset is seeded by
`response_seed(eval.sampling_seed, dataset.seed, p, i)`, so an evaluation is reproducible on
deterministic servers and draws nothing from the queue's seeds or counters. Responses are
judged by the run's reward scorer (`pipeline.scoring.judge`: correctness only, no overlong shaping;
`reward.score_truncated` for cut-off ones) and summarised per dataset: mean@k and pass@k
(`pipeline.eval_metrics`), the mean response length (tokens) and the share truncated.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pipeline.config import EvalConfig, EvalDatasetConfig, RolloutConfig
from pipeline.eval_metrics import averaged_over_prompts
from pipeline.metrics import EvalMetrics
from pipeline.overlong import TRUNCATED_FINISH_REASON
from pipeline.prompts import ChatTokenizer, Prompt, held_out_prompts
from pipeline.rewards.base import RewardScorer
from pipeline.rollout_client import RolloutEngine
from pipeline.sampling_seeds import response_seed
from pipeline.scoring import judge
from pipeline.sglang_client import Generation, SamplingParams


@dataclass(frozen=True)
class PromptSet:
    """One held-out dataset, tokenized.

    Attributes:
        config: the dataset's section.
        prompts: its prompts, in evaluation order.
        skipped: rows skipped as longer than its `max_prompt_length`.
    """

    config: EvalDatasetConfig
    prompts: tuple[Prompt, ...]
    skipped: int

    @classmethod
    def load(cls, config: EvalDatasetConfig, tokenizer: ChatTokenizer) -> PromptSet:
        prompts, skipped = held_out_prompts(config, tokenizer, config.max_prompts)
        return cls(config, tuple(prompts), skipped)


@dataclass(frozen=True)
class EvalSample:
    """One judged response (kept for `megatron-dapo eval`'s JSON)."""

    row_index: int
    """The prompt's row in its dataset."""
    response: str
    ground_truth: str
    correct: bool
    finish_reason: str
    response_length: int
    """Tokens."""


@dataclass(frozen=True)
class DatasetEval:
    """The evaluation of one dataset.

    Attributes:
        name: the dataset's name.
        num_prompts: prompts evaluated.
        n_samples: responses per prompt.
        scores: `mean@k` and `pass@k` for each configured k, in [0, 1].
        response_length_mean: mean response length, tokens.
        truncated_ratio: share of responses cut at the length limit.
        skipped_prompts: rows skipped as longer than the dataset's `max_prompt_length`.
        reward_failures: responses whose reward call timed out or failed (judged wrong).
        samples: [num_prompts][n_samples] the judged responses.
    """

    name: str
    num_prompts: int
    n_samples: int
    scores: dict[str, float]
    response_length_mean: float
    truncated_ratio: float
    skipped_prompts: int
    reward_failures: int
    samples: tuple[tuple[EvalSample, ...], ...]

    def record(self) -> dict[str, Any]:
        """The dataset's numbers as JSON (without the samples)."""
        return {
            **self.scores,
            "response_length_mean": self.response_length_mean,
            "truncated_ratio": self.truncated_ratio,
            "num_prompts": self.num_prompts,
            "n_samples": self.n_samples,
            "skipped_prompts": self.skipped_prompts,
            "reward_failures": self.reward_failures,
        }

    def line(self) -> str:
        """One printed line: `name: mean@1 0.250 pass@1 0.250 | len 12.0 trunc 0.00 | 16 x 4`."""
        scores = " ".join(f"{metric} {value:.3f}" for metric, value in self.scores.items())
        failures = f" | {self.reward_failures} reward failure(s)" if self.reward_failures else ""
        return (
            f"{self.name}: {scores} | len {self.response_length_mean:.1f} trunc "
            f"{self.truncated_ratio:.2f} | {self.num_prompts} prompts x {self.n_samples}{failures}"
        )


@dataclass(frozen=True)
class EvalReport:
    """One evaluation of every dataset.

    Attributes:
        policy_version: the weight version the fleet served (steps trained).
        seconds: wall time of the evaluation.
        datasets: one result per dataset, in config order.
    """

    policy_version: int
    seconds: float
    datasets: tuple[DatasetEval, ...]

    def record(self, samples: bool = False) -> dict[str, Any]:
        """The `eval` field of `metrics.jsonl` (JSON); `samples` adds every judged response."""
        record: dict[str, Any] = {
            "policy_version": self.policy_version,
            "seconds": self.seconds,
            "datasets": {d.name: d.record() for d in self.datasets},
        }
        if samples:
            record["samples"] = {
                d.name: [[vars(s) for s in prompt] for prompt in d.samples] for d in self.datasets
            }
        return record

    def lines(self) -> list[str]:
        """One printed line per dataset."""
        return [f"eval v{self.policy_version} | {d.line()}" for d in self.datasets]

    def table(self) -> str:
        """The datasets as a text table: prompts, samples, each score, length, truncation."""
        metrics = list(self.datasets[0].scores) if self.datasets else []
        header = ["dataset", "prompts", "n", *metrics, "len", "trunc"]
        rows = [
            [
                d.name,
                str(d.num_prompts),
                str(d.n_samples),
                *(f"{d.scores[metric]:.3f}" for metric in metrics),
                f"{d.response_length_mean:.1f}",
                f"{d.truncated_ratio:.2f}",
            ]
            for d in self.datasets
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        return "\n".join(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in [header, *rows]
        )


class Evaluator:
    """Evaluates the policy an engine serves on fixed prompt sets; see the module docstring.

    Args:
        config: the `eval` section.
        prompt_sets: the datasets, loaded (`PromptSet.load`).
        params: sampling parameters of every request (the seed is set per response).
        scorer: judges responses (called in a worker thread).
        decode: response token ids -> text for the scorer.
        score_truncated: `reward.score_truncated`.
        metrics: where each evaluation is exported (a private registry when None).
    """

    def __init__(
        self,
        config: EvalConfig,
        prompt_sets: Sequence[PromptSet],
        params: SamplingParams,
        scorer: RewardScorer,
        decode: Callable[[Sequence[int]], str],
        score_truncated: Literal["as_is", "wrong"],
        metrics: EvalMetrics | None = None,
    ) -> None:
        self.config = config
        self.prompt_sets = tuple(prompt_sets)
        self.params = params
        self.scorer = scorer
        self.decode = decode
        self.score_truncated = score_truncated
        self.metrics = metrics if metrics is not None else EvalMetrics()
        self.busy_seconds = 0.0
        """Wall time spent evaluating so far (the fleet generates meanwhile), seconds."""

    @classmethod
    def create(
        cls,
        config: EvalConfig,
        rollout: RolloutConfig,
        score_truncated: Literal["as_is", "wrong"],
        tokenizer: Any,
        scorer: RewardScorer,
        stop_token_ids: tuple[int, ...],
        metrics: EvalMetrics | None = None,
    ) -> Evaluator:
        """An evaluator of `config.datasets` (loaded and tokenized now) with the rollout's
        stop strings and the given stop tokens; `tokenizer` is a `transformers` tokenizer."""
        params = SamplingParams(
            max_new_tokens=config.response_length(rollout),
            temperature=config.temperature,
            top_p=config.top_p,
            stop_token_ids=stop_token_ids,
            stop=rollout.stop,
        )
        return cls(
            config,
            [PromptSet.load(dataset, tokenizer) for dataset in config.datasets],
            params,
            scorer,
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            score_truncated,
            metrics,
        )

    async def evaluate(self, engine: RolloutEngine, policy_version: int) -> EvalReport:
        """Generate, judge and summarise every dataset on `engine` (all prompts in flight at
        once), export the result and return it; `policy_version` is what the engine serves."""
        begin = time.monotonic()
        try:
            per_dataset = await asyncio.gather(
                *(
                    asyncio.gather(
                        *(
                            self._prompt(engine, prompt_set, p)
                            for p in range(len(prompt_set.prompts))
                        )
                    )
                    for prompt_set in self.prompt_sets
                )
            )
        finally:
            seconds = time.monotonic() - begin
            self.busy_seconds += seconds
        report = EvalReport(
            policy_version,
            seconds,
            tuple(
                self._summary(prompt_set, samples)
                for prompt_set, samples in zip(self.prompt_sets, per_dataset, strict=True)
            ),
        )
        self._export(report)
        return report

    def _sample_params(self, dataset: EvalDatasetConfig, position: int) -> list[SamplingParams]:
        seed = self.config.sampling_seed
        return [
            replace(self.params, sampling_seed=response_seed(seed, dataset.seed, position, sample))
            for sample in range(self.config.n_samples)
        ]

    async def _prompt(
        self, engine: RolloutEngine, prompt_set: PromptSet, position: int
    ) -> tuple[tuple[EvalSample, ...], int]:
        """The judged samples of the prompt at `position`, and its reward failures."""
        prompt = prompt_set.prompts[position]
        generations: list[Generation] = await engine.generate_group(
            prompt.input_ids, self._sample_params(prompt_set.config, position)
        )
        judgement = await judge(prompt, generations, self.scorer, self.decode, self.score_truncated)
        samples = tuple(
            EvalSample(
                row_index=prompt.row_index,
                response=self.decode(g.output_ids),
                ground_truth=prompt.ground_truth,
                correct=r.acc,
                finish_reason=g.finish_reason,
                response_length=len(g.output_ids),
            )
            for g, r in zip(generations, judgement.results, strict=True)
        )
        return samples, judgement.timeouts + judgement.errors

    def _summary(
        self, prompt_set: PromptSet, judged: Sequence[tuple[tuple[EvalSample, ...], int]]
    ) -> DatasetEval:
        samples = tuple(s for s, _ in judged)
        flat = [s for prompt in samples for s in prompt]
        return DatasetEval(
            name=prompt_set.config.name,
            num_prompts=len(samples),
            n_samples=self.config.n_samples,
            scores=averaged_over_prompts(
                [[s.correct for s in prompt] for prompt in samples], self.config.ks
            ),
            response_length_mean=math.fsum(s.response_length for s in flat) / len(flat),
            truncated_ratio=sum(s.finish_reason == TRUNCATED_FINISH_REASON for s in flat)
            / len(flat),
            skipped_prompts=prompt_set.skipped,
            reward_failures=sum(failures for _, failures in judged),
            samples=samples,
        )

    def _export(self, report: EvalReport) -> None:
        m = self.metrics
        m.policy_version.set(report.policy_version)
        m.seconds.set(report.seconds)
        for dataset in report.datasets:
            for metric, value in dataset.scores.items():
                m.score.labels(dataset.name, metric).set(value)
            m.response_length.labels(dataset.name).set(dataset.response_length_mean)
            m.truncated_ratio.labels(dataset.name).set(dataset.truncated_ratio)
