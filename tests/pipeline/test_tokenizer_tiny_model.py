"""The procedural character-level tokenizer and the tiny random-weight model directory."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.tokenizer import (
    ALPHABET,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TinyModelConfig,
    build_char_tokenizer,
    write_tiny_model,
)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    small = TinyModelConfig(num_layers=1, hidden_size=32, intermediate_size=64)
    return (
        write_tiny_model(root / "a", small),
        write_tiny_model(
            root / "b", TinyModelConfig(num_layers=1, hidden_size=32, intermediate_size=64, seed=1)
        ),
    )


def test_char_tokenizer_round_trips_text_one_token_per_character(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(build_char_tokenizer(tmp_path))
    text = "Solve: 3 * (x + 1) = 12\n\tAnswer: \\boxed{3}"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == len(SPECIAL_TOKENS) + len(ALPHABET)
    assert tokenizer.decode(tokenizer.encode("é", add_special_tokens=False)) == "<|unk|>"
    assert tokenizer.convert_ids_to_tokens([tokenizer.eos_token_id, tokenizer.pad_token_id]) == [
        EOS_TOKEN,
        PAD_TOKEN,
    ]


def test_chat_template_renders_chatml(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(build_char_tokenizer(tmp_path))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ids.count(tokenizer.eos_token_id) == 2


def test_tiny_model_dir_is_a_complete_model_path(model_dirs):
    first, second = model_dirs
    tokenizer = AutoTokenizer.from_pretrained(first)
    config = json.loads((first / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer)
    assert config["eos_token_id"] == tokenizer.eos_token_id
    a = AutoModelForCausalLM.from_pretrained(first)
    b = AutoModelForCausalLM.from_pretrained(second)
    logits = a(torch.tensor([[2, 10, 11]])).logits
    assert logits.shape == (1, 3, len(tokenizer)) and logits.dtype == torch.float32
    weight = "model.embed_tokens.weight"
    assert not torch.equal(a.state_dict()[weight], b.state_dict()[weight])
