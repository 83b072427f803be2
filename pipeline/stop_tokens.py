"""The tokens generation stops at, derived from a checkpoint when the run config names none.

SGLang stops on the end-of-sequence ids it finds in the model's config, generation config and
tokenizer. A chat model's turn may end with another token (ChatML's `<|im_end|>`, Llama 3's
`<|eot_id|>`): a base model used with a chat template then runs past the end of its turn, and
the decoded answer is scored on the run-on text. `default_stop_token_ids` adds the end-of-turn
token that the chat template writes after an assistant message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_MARKER = "\x00assistant-content\x00"
"""Stands for an assistant message's content when the chat template is rendered."""


def _eos_ids(value: Any) -> set[int]:
    """An `eos_token_id` field (an int, a list of ints, or missing) as a set."""
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, list) else {int(value)}


def end_of_turn_token_id(tokenizer: Any) -> int | None:
    """The special token the chat template writes right after an assistant message's content,
    or None (no chat template, or plain text follows the content)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARKER}],
        tokenize=False,
    )
    after = rendered.split(_MARKER, 1)[-1] if _MARKER in rendered else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | {
        token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    return ids[0] if ids and ids[0] in special else None


def default_stop_token_ids(model_path: str | Path) -> tuple[int, ...]:
    """End-of-sequence ids of `model_path` (config.json, generation_config.json, tokenizer) and
    its chat template's end-of-turn token, sorted."""
    from transformers import AutoTokenizer

    path = Path(model_path)
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        if (path / name).is_file():
            ids |= _eos_ids(json.loads((path / name).read_text()).get("eos_token_id"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids |= _eos_ids(tokenizer.eos_token_id)
    end_of_turn = end_of_turn_token_id(tokenizer)
    if end_of_turn is not None:
        ids.add(end_of_turn)
    return tuple(sorted(ids))


def resolve_stop_token_ids(
    configured: tuple[int, ...] | None, model_path: str | Path
) -> tuple[int, ...]:
    """`rollout.stop_token_ids` if set (() = none), else `default_stop_token_ids(model_path)`."""
    return configured if configured is not None else default_stop_token_ids(model_path)
