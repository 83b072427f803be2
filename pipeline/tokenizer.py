"""A procedurally built character-level tokenizer and tiny random-weight models.

No model hub is reachable in tests, CI or the CPU demo, so both the tokenizer and the model are
built from code: `build_char_tokenizer` writes an HF tokenizer directory (loadable by
`transformers.AutoTokenizer` and by SGLang) with one token per printable ASCII character, the
special tokens of a ChatML-style chat template, and that template. `write_tiny_model` writes a
randomly initialised Llama causal LM whose vocabulary is that tokenizer, into the same directory,
so the directory is a complete SGLang `--model-path`.

Llama, not Qwen2: transformers 5 replaces the tokenizer class of a `qwen2` model directory by
its byte-level Qwen2 tokenizer whatever `tokenizer_config.json` says, which would undo the
character-level pre-tokenizer.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

EOS_TOKEN = "<|im_end|>"
"""Ends every chat turn; the model's end-of-sequence token."""
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
IM_START_TOKEN = "<|im_start|>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, IM_START_TOKEN, EOS_TOKEN)
"""Special tokens, with ids 0..3 in this order."""
ALPHABET = string.printable
"""Characters with a token of their own (ids 4..); anything else maps to `UNK_TOKEN`."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message."""


def build_char_tokenizer(out_dir: str | Path) -> Path:
    """Write a character-level HF tokenizer directory and return its path.

    The vocabulary holds `SPECIAL_TOKENS` then every character of `ALPHABET`
    (len(SPECIAL_TOKENS) + len(ALPHABET) = 104 tokens). Special tokens are matched whole
    before splitting into characters, decoding concatenates characters without separators, and
    `tokenizer_config.json` carries the eos/pad tokens and the chat template.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *ALPHABET))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START_TOKEN],
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    fast.save_pretrained(out)
    return out


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of a tiny random-weight causal LM (sizes in elements, not bytes)."""

    num_layers: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    seed: int = 0
    """Seeds the random weights: two seeds give two different policies of the same shape."""


def write_tiny_model(out_dir: str | Path, config: TinyModelConfig = TinyModelConfig()) -> Path:
    """Write a random-weight HF Llama model (float32 safetensors) plus its tokenizer to `out_dir`.

    The vocabulary is the `build_char_tokenizer` vocabulary and the end-of-sequence id is
    `EOS_TOKEN`'s, so generation stops at the end of a chat turn. Returns `out_dir`.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = build_char_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out)
    hf_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(hf_config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    return out
