"""Prompt/response pairs of the supervised warm-up (`pipeline.sft_data`) with the project's
character-level tokenizer and ChatML template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import reasoning_gym
import torch
from transformers import AutoTokenizer

from pipeline.config import SFTDataConfig
from pipeline.prompts import prompt_token_ids
from pipeline.sft_data import SFTPairs
from pipeline.tokenizer import EOS_TOKEN, build_char_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return AutoTokenizer.from_pretrained(build_char_tokenizer(tmp_path_factory.mktemp("tok")))


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_pair_is_the_rl_prompt_then_the_response_and_its_end_of_turn(tokenizer, tmp_path):
    rows = [
        {"q": "Fruit of red?", "a": {"text": "apple"}},
        {"q": "Fruit of pink?", "a": {"text": "peach"}},
    ]
    config = SFTDataConfig(
        path=_jsonl(tmp_path / "p.jsonl", rows),
        prompt_key="q",
        response_key="a.text",
        prompt_template="Answer in one word. {prompt}",
        max_length=64,
        shuffle=False,
    )
    pairs = SFTPairs.from_config(config, tokenizer)
    batch = pairs.batch(0, 2)
    messages = [{"role": "user", "content": "Answer in one word. Fruit of red?"}]
    prompt = prompt_token_ids(tokenizer, messages, True)
    response = [
        *tokenizer.encode("apple", add_special_tokens=False),
        tokenizer.convert_tokens_to_ids(EOS_TOKEN),
    ]
    first = batch.tokens[: batch.sample_offsets[1]].tolist()
    assert first == prompt + response
    assert batch.prompt_lengths.tolist() == [len(prompt), len(prompt) + 1]  # "pink" is longer
    expected_mask = [False] * len(prompt) + [True] * len(response)
    assert batch.loss_mask[: batch.sample_offsets[1]].tolist() == expected_mask
    assert int(batch.loss_mask.sum()) == 2 * len(response)
    assert not batch.advantages.any() and not batch.rollout_log_probs.any()


def test_long_pairs_are_skipped_and_epochs_visit_every_pair_once(tokenizer, tmp_path):
    rows = [{"prompt": f"p{i}", "response": "x" * (40 if i == 3 else 1)} for i in range(7)]
    config = SFTDataConfig(path=_jsonl(tmp_path / "p.jsonl", rows), max_length=30, seed=5)
    pairs = SFTPairs.from_config(config, tokenizer)
    assert sorted(p.row_index for p in pairs.pairs) == [0, 1, 2, 4, 5, 6]
    assert pairs.steps_per_epoch(4) == 1  # 6 pairs: the remainder of the epoch is dropped
    assert pairs.steps_per_epoch(2) == 3
    for epoch in (0, 1):
        seen = [m["row_index"] for k in range(3) for m in pairs.batch(3 * epoch + k, 2).metadata]
        assert sorted(seen) == [0, 1, 2, 4, 5, 6]
    first, second = (pairs.batch(3 * epoch, 2).metadata for epoch in (0, 1))
    assert first != second  # a new order each epoch
    with pytest.raises(ValueError, match="6 prompt/response pairs do not fill one batch"):
        pairs.steps_per_epoch(7)
    with pytest.raises(ValueError, match="none of the 7 prompt/response pairs fits"):
        SFTPairs.from_config(config.model_copy(update={"max_length": 5}), tokenizer)


def test_a_reasoning_gym_task_gives_its_answer_as_the_response(tokenizer):
    config = SFTDataConfig(
        source="reasoning_gym",
        task="basic_arithmetic",
        task_size=4,
        task_options={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        max_length=512,
    )
    pairs = SFTPairs.from_config(config, tokenizer)

    items = list(
        reasoning_gym.create_dataset("basic_arithmetic", size=4, seed=1, **config.task_options)
    )
    for pair in pairs.pairs:
        answer = tokenizer.decode(list(pair.response_ids), skip_special_tokens=True)
        assert answer == str(items[pair.row_index]["answer"])
    assert len(pairs.batch(0, 4).tokens) == sum(p.length for p in pairs.pairs)
    assert torch.equal(pairs.batch(0, 4).group_ids, torch.arange(4))
