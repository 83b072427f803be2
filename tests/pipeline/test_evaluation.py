"""The evaluator on a scripted engine: its numbers, its prompt set, its seeds and its series."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from pipeline.config import EvalConfig
from pipeline.eval_metrics import pass_at_k
from pipeline.evaluation import Evaluator, PromptSet
from pipeline.metrics import EvalMetrics
from pipeline.rewards.base import FunctionScorer
from pipeline.rewards.exact_match import exact_match_reward
from pipeline.sglang_client import Generation, SamplingParams

N = 4
ROWS = 8
"""Row r: prompt `r` (one token; row 7's prompt is 3 tokens, longer than the limit), answer
`100 + r`."""


class RowTokenizer:
    def apply_chat_template(self, conversation, **kwargs) -> list[int]:
        return self.encode(conversation[0]["content"])

    def encode(self, text: str, **kwargs) -> list[int]:
        return [int(token) for token in text.split()]


class ScriptedEngine:
    """Answers prompt r with `r % (N + 1)` correct responses out of N (then wrong ones, the
    last of them cut at the length limit), one token each; records every request's seeds."""

    weight_version = 0

    def __init__(self) -> None:
        self.seeds: list[int | None] = []

    async def generate_group(
        self, input_ids: Sequence[int], params: Sequence[SamplingParams]
    ) -> list[Generation]:
        row = input_ids[0]
        correct = row % (N + 1)
        self.seeds += [p.sampling_seed for p in params]
        return [
            Generation(
                output_ids=(100 + row if i < correct else 0,),
                output_logprobs=(-0.5,),
                finish_reason="length" if i == len(params) - 1 and i >= correct else "stop",
                server_weight_version="0",
                server_url="scripted",
            )
            for i in range(len(params))
        ]


def _dataset(tmp_path: Path, seed: int = 1, **changes: object) -> dict:
    path = tmp_path / "held-out.jsonl"
    rows = [{"prompt": "7 7 7" if r == 7 else str(r), "answer": 100 + r} for r in range(ROWS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {
        "name": "held-out",
        "source": "jsonl",
        "path": str(path),
        "prompt_key": "prompt",
        "answer_key": "answer",
        "max_prompt_length": 2,
        "seed": seed,
        **changes,
    }


def _evaluator(config: EvalConfig, registry: CollectorRegistry | None = None) -> Evaluator:
    tokenizer = RowTokenizer()
    return Evaluator(
        config,
        [PromptSet.load(dataset, tokenizer) for dataset in config.datasets],
        SamplingParams(max_new_tokens=1, temperature=1.0),
        FunctionScorer(exact_match_reward),
        lambda ids: " ".join(map(str, ids)),
        "as_is",
        EvalMetrics(registry) if registry is not None else None,
    )


def test_numbers_of_a_dataset(tmp_path: Path) -> None:
    config = EvalConfig(n_samples=N, temperature=1.0, ks=(1, 2, 4), datasets=[_dataset(tmp_path)])
    registry = CollectorRegistry()
    report = asyncio.run(_evaluator(config, registry).evaluate(ScriptedEngine(), 5))
    (result,) = report.datasets
    assert (result.num_prompts, result.skipped_prompts) == (7, 1)  # row 7 is too long
    correct = [r % (N + 1) for r in range(7)]
    assert sorted(sum(s.correct for s in prompt) for prompt in result.samples) == sorted(correct)
    for k in (1, 2, 4):
        assert result.scores[f"pass@{k}"] == pytest.approx(
            sum(pass_at_k(N, c, k) for c in correct) / 7
        )
        assert result.scores[f"mean@{k}"] == pytest.approx(sum(correct) / (7 * N))
    assert result.response_length_mean == 1.0
    assert result.truncated_ratio == pytest.approx(sum(c < N for c in correct) / (7 * N))
    assert (
        report.policy_version == 5
        and report.record()["datasets"]["held-out"]["pass@4"] == (result.scores["pass@4"])
    )
    assert report.lines()[0].startswith("eval v5 | held-out: mean@1 ")
    value = registry.get_sample_value(
        "dapo_eval_score_ratio", {"run": "default", "dataset": "held-out", "metric": "pass@2"}
    )
    assert value == result.scores["pass@2"]


def test_max_prompts_takes_the_first_of_the_seeded_order(tmp_path: Path) -> None:
    config = EvalConfig(datasets=[_dataset(tmp_path, max_prompts=3)])
    (prompt_set,) = _evaluator(config).prompt_sets
    again = PromptSet.load(config.datasets[0], RowTokenizer())
    assert len(prompt_set.prompts) == 3 and prompt_set.prompts == again.prompts


def test_seeds_are_per_response_reproducible_and_the_datasets_own(tmp_path: Path) -> None:
    def seeds(seed: int) -> list[int | None]:
        config = EvalConfig(n_samples=N, temperature=1.0, datasets=[_dataset(tmp_path, seed)])
        engine = ScriptedEngine()
        asyncio.run(_evaluator(config).evaluate(engine, 0))
        return engine.seeds

    first, again, other = seeds(1), seeds(1), seeds(2)
    assert len(set(first)) == len(first) == 7 * N
    assert sorted(first) == sorted(again)  # requests run concurrently: compare as sets
    assert not set(first) & set(other)
