"""Prompt sources: DAPO-Math layout from jsonl and parquet, reasoning_gym, order and resume."""

from __future__ import annotations

import json
import logging
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from pipeline.config import DataConfig
from pipeline.prompts import PromptRow, PromptSource, load_rows
from pipeline.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(build_char_tokenizer(tmp_path_factory.mktemp("tok")))


def dapo_rows(count: int) -> list[dict]:
    return [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
            "reward_model": {"ground_truth": str(2 * i), "style": "rule"},
        }
        for i in range(count)
    ]


@pytest.mark.parametrize("source", ["jsonl", "parquet"])
def test_dapo_math_layout_is_read_from_files(tmp_path, tokenizer, source):
    rows = dapo_rows(5)
    path = tmp_path / f"prompts.{source}"
    if source == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    config = DataConfig(source=source, path=str(path), shuffle=False)
    stream = PromptSource.from_config(config, tokenizer)
    prompts = stream.next_prompts(5)
    assert [p.ground_truth for p in prompts] == ["0", "2", "4", "6", "8"]
    assert tokenizer.decode(prompts[3].input_ids) == (
        "<|im_start|>user\nWhat is 3 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_prompt_template_rewrites_the_last_user_message(tmp_path, tokenizer):
    rows = dapo_rows(2)
    rows[1]["prompt"] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is {x}?"},  # braces in data are kept as they are
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = "{prompt} Reply with {{the number}} only."
    config = DataConfig(source="jsonl", path=str(path), shuffle=False, prompt_template=template)
    first, second = load_rows(config)
    assert first.messages == [
        {"role": "user", "content": "What is 0 + 0? Reply with {the number} only."}
    ]
    assert second.messages[0] == {"role": "system", "content": "Be brief."}
    assert second.messages[1]["content"] == "What is {x}? Reply with {the number} only."
    for bad, found in (
        ("Answer: {answer}", "['answer']"),
        ("no field", "[]"),
        ("{prompt}{prompt}", "['prompt', 'prompt']"),
    ):
        with pytest.raises(ValueError, match=re.escape(f"no other, found {found}")):
            DataConfig(source="jsonl", path=str(path), prompt_template=bad)


def test_reasoning_gym_task_gives_questions_and_answers():
    config = DataConfig(source="reasoning_gym", task="basic_arithmetic", task_size=4, seed=3)
    rows = load_rows(config)
    assert len(rows) == 4
    assert all(r.messages[0]["role"] == "user" and r.messages[0]["content"] for r in rows)
    assert rows == load_rows(config), "procedural tasks must be deterministic given the seed"


def test_task_options_reach_reasoning_gym_and_answers_can_be_length_filtered():
    options = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    options |= {"allow_parentheses": False, "allow_negation": False}
    config = DataConfig(
        source="reasoning_gym",
        task="basic_arithmetic",
        task_size=200,
        task_options={**options, "operators": ["+"]},
        max_answer_chars=1,
    )
    rows = load_rows(config)
    assert 0 < len(rows) < 200  # two-digit sums are filtered out
    for row in rows:
        a, b = (int(t) for t in re.findall(r"\d+", row.messages[0]["content"]))
        assert str(a + b) == row.ground_truth and len(row.ground_truth) == 1


def make_rows(lengths: list[int]) -> list[PromptRow]:
    return [
        PromptRow([{"role": "user", "content": "x" * n}], str(i)) for i, n in enumerate(lengths)
    ]


def test_overlong_prompts_are_counted_skipped_and_logged(tokenizer, caplog):
    template_tokens = len(
        PromptSource(make_rows([0]), tokenizer, 10**6).next_prompts(1)[0].input_ids
    )
    lengths = [1, 50, 2, 60, 3]
    stream = PromptSource(make_rows(lengths), tokenizer, template_tokens + 10, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="pipeline.prompts"):
        prompts = stream.next_prompts(3)
    assert [p.ground_truth for p in prompts] == ["0", "2", "4"]
    assert stream.num_skipped == 2
    assert "max_prompt_length" in caplog.text and "2 over-length prompts skipped" in caplog.text
    with pytest.raises(ValueError, match="no prompt fits"):
        PromptSource(make_rows([50, 60]), tokenizer, template_tokens + 10).next_prompts(1)


def test_order_is_seeded_per_epoch_and_resumes_exactly(tokenizer):
    rows = make_rows(list(range(7)))

    def answers(stream: PromptSource, count: int) -> list[str]:
        return [p.ground_truth for p in stream.next_prompts(count)]

    full = answers(PromptSource(rows, tokenizer, 1000, seed=5), 20)
    assert full == answers(PromptSource(rows, tokenizer, 1000, seed=5), 20)
    assert full != answers(PromptSource(rows, tokenizer, 1000, seed=6), 20)
    for epoch in range(2):
        assert sorted(full[7 * epoch : 7 * epoch + 7], key=int) == [str(i) for i in range(7)]
    assert full[:7] != full[7:14], "every epoch draws a fresh permutation"

    first = PromptSource(rows, tokenizer, 1000, seed=5)
    head = answers(first, 9)
    resumed = PromptSource(rows, tokenizer, 1000, seed=5)
    resumed.load_state_dict(first.state_dict())
    assert head + answers(resumed, 11) == full
