"""Prompt sources: jsonl / parquet files (HF `datasets`, offline) and `reasoning_gym` tasks.

A row is a chat (a list of `{"role", "content"}` messages, or a plain string taken as one user
message) plus a reference answer. The file layout defaults to DAPO-Math-17k: messages under
`prompt`, the answer under `reward_model.ground_truth` (a dotted path into nested columns).

Malformed rows are errors, not skips: a line that is not JSON, a missing or null field, a
prompt that is not a string or a list of `{"role": str, "content": str}` messages, an empty
prompt, or an answer that is not a non-empty string or a number. `load_rows` reads the whole
file and raises one `MalformedPromptData` naming the file, the line (jsonl; row index for
parquet) and the field of each bad row (the first ten, and how many there are), so a data set
is fixed once rather than silently thinned. Blank jsonl lines are ignored.

`PromptSource` walks the rows in a deterministic order (a fresh permutation per epoch from
`seed + epoch`, or file order without shuffling), renders each with the tokenizer's chat
template, and skips prompts longer than `max_prompt_length` tokens, counting them and saying
so in the log. Its position (`state_dict`) resumes the exact sequence after a restart.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pipeline.config import DataConfig, RowSourceConfig

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class ChatTokenizer(Protocol):
    """The part of a `transformers` tokenizer the prompt source uses."""

    def apply_chat_template(self, conversation: Messages, **kwargs: Any) -> Any: ...

    def encode(self, text: str, **kwargs: Any) -> list[int]: ...


@dataclass(frozen=True)
class PromptRow:
    """One source row: the chat and its reference answer."""

    messages: Messages
    ground_truth: str


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt.

    Attributes:
        row_index: the row's index in the source (stable across epochs).
        input_ids: [P] token ids after the chat template.
        ground_truth: the reference answer the reward compares against.
    """

    row_index: int
    input_ids: tuple[int, ...]
    ground_truth: str


MAX_REPORTED_ROWS = 10
"""How many malformed rows a `MalformedPromptData` message lists."""


class MalformedPromptData(ValueError):
    """Rows of a prompt file that cannot be used; the message names file, line and field."""


class _BadField(ValueError):
    """One field of one row is missing or malformed (message: `field 'x': problem`)."""


def _lookup(row: dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for key in dotted.split("."):
        if not isinstance(value, dict) or value.get(key) is None:
            raise _BadField(f"field {dotted!r}: missing (no {key!r}; row keys: {list(row)})")
        value = value[key]
    return value


def _as_messages(value: Any, field: str) -> Messages:
    """A prompt value (a string, or a list of role/content messages) as chat messages."""
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
    else:
        raise _BadField(
            f"field {field!r}: expected a string or a list of {{'role': str, 'content': str}} "
            f"messages, got {str(value)[:80]!r}"
        )
    if not any(m["content"].strip() for m in messages):
        raise _BadField(f"field {field!r}: empty prompt")
    return messages


def _as_answer(value: Any, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _BadField(
            f"field {field!r}: expected a string or a number, got {type(value).__name__}"
        )
    if not str(value).strip():
        raise _BadField(f"field {field!r}: empty answer")
    return str(value)


def _parse_row(row: Any, prompt_key: str, answer_key: str) -> PromptRow:
    if not isinstance(row, dict):
        raise _BadField(f"the row is a {type(row).__name__}, not an object")
    return PromptRow(
        _as_messages(_lookup(row, prompt_key), prompt_key),
        _as_answer(_lookup(row, answer_key), answer_key),
    )


def _file_records(config: RowSourceConfig) -> Iterator[tuple[str, Any]]:
    """(location, record) of every record of the file: a parquet row, or a jsonl line's text
    (blank lines skipped)."""
    assert config.path is not None
    if config.source == "parquet":
        import datasets

        table = datasets.load_dataset("parquet", data_files=config.path, split="train")
        for index, row in enumerate(table):
            yield f"{config.path} row {index}", row
        return
    with open(config.path, encoding="utf-8-sig") as lines:  # tolerates a byte-order mark
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield f"{config.path}:{number}", line


def _decode_json(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise _BadField(f"invalid JSON ({error.msg} at column {error.colno})") from error


def _read_file(config: RowSourceConfig) -> list[PromptRow]:
    prompt_key, answer_key = config.row_keys()
    rows: list[PromptRow] = []
    problems: list[str] = []
    for where, record in _file_records(config):
        try:
            row = _decode_json(record) if config.source == "jsonl" else record
            rows.append(_parse_row(row, prompt_key, answer_key))
        except _BadField as error:
            problems.append(f"{where}: {error}")
    if problems:
        listed = "\n  ".join(problems[:MAX_REPORTED_ROWS])
        raise MalformedPromptData(
            f"{len(problems)} malformed row(s) in {config.path} ({config.describe_keys()}):"
            f"\n  {listed}"
        )
    return rows


def read_rows(config: RowSourceConfig) -> list[PromptRow]:
    """Every row of the configured source (no network): its prompt (rewritten by
    `prompt_template` if set) and its answer, from the fields `config.row_keys()` names.

    Raises:
        MalformedPromptData: a file has malformed rows (see the module docstring).
    """
    if config.source == "reasoning_gym":
        import reasoning_gym

        assert config.task is not None
        dataset = reasoning_gym.create_dataset(
            config.task, size=config.task_size, seed=config.seed, **config.task_options
        )
        rows = [_parse_row(item, *config.row_keys()) for item in dataset]
    else:
        rows = _read_file(config)
    if config.prompt_template is not None:
        rows = [_with_template(row, config.prompt_template) for row in rows]
    return rows


def load_rows(config: DataConfig) -> list[PromptRow]:
    """The RL prompts (`read_rows`) whose answer fits `max_answer_chars`.

    Raises:
        MalformedPromptData: a file has malformed rows (see the module docstring).
    """
    rows = read_rows(config)
    if config.max_answer_chars is not None:
        rows = [row for row in rows if len(row.ground_truth) <= config.max_answer_chars]
    return rows


def _with_template(row: PromptRow, template: str) -> PromptRow:
    """`row` with its last user message rewritten as `template.format(prompt=content)`."""
    users = [i for i, m in enumerate(row.messages) if m["role"] == "user"]
    if not users:
        raise ValueError(f"data.prompt_template needs a user message; a row has {row.messages}")
    last_user = users[-1]
    messages = [dict(m) for m in row.messages]
    messages[last_user]["content"] = template.format(prompt=messages[last_user]["content"])
    return PromptRow(messages, row.ground_truth)


def held_out_prompts(
    config: DataConfig, tokenizer: ChatTokenizer, limit: int | None = None
) -> tuple[list[Prompt], int]:
    """A fixed prompt set (evaluation): the first `limit` prompts (all if None) of the
    source's first epoch order that fit `max_prompt_length`, and how many were skipped as
    longer. Each row is used at most once; no stream position changes.

    Raises:
        ValueError: no prompt fits `max_prompt_length`.
        MalformedPromptData: a file has malformed rows.
    """
    rows = load_rows(config)
    prompts: list[Prompt] = []
    skipped = 0
    for index in epoch_order(len(rows), config.seed, 0, config.shuffle):
        if limit is not None and len(prompts) == limit:
            break
        input_ids = prompt_token_ids(tokenizer, rows[index].messages, config.apply_chat_template)
        if len(input_ids) > config.max_prompt_length:
            skipped += 1
            continue
        prompts.append(Prompt(index, tuple(input_ids), rows[index].ground_truth))
    if not prompts:
        raise ValueError(
            f"no prompt of the {len(rows)} rows fits max_prompt_length={config.max_prompt_length}"
        )
    return prompts, skipped


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The row indices of one epoch: a permutation seeded by `seed + epoch`, or file order."""
    if not shuffle:
        return list(range(num_rows))
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_rows, generator=generator).tolist()


def prompt_token_ids(
    tokenizer: ChatTokenizer, messages: Messages, apply_chat_template: bool
) -> list[int]:
    """A prompt's token ids as the policy sees them: the chat template with the assistant's
    generation header, or (without a template) the message contents concatenated and encoded."""
    if apply_chat_template:
        return list(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    return list(tokenizer.encode("".join(m["content"] for m in messages)))


class PromptSource:
    """Deterministic, resumable stream of tokenized prompts.

    Args:
        rows: the prompt rows.
        tokenizer: renders the chat template and tokenizes.
        max_prompt_length: longer prompts (tokens) are skipped and counted.
        apply_chat_template: False = tokenize the concatenated message contents as they are.
        shuffle: visit the rows in a seeded random order, re-drawn every epoch.
        seed: the order's seed.
    """

    def __init__(
        self,
        rows: Sequence[PromptRow],
        tokenizer: ChatTokenizer,
        max_prompt_length: int,
        apply_chat_template: bool = True,
        shuffle: bool = True,
        seed: int = 1,
    ) -> None:
        if not rows:
            raise ValueError("the prompt source is empty")
        self.rows = rows
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.apply_chat_template = apply_chat_template
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self.num_skipped = 0
        self._order = self._epoch_order()

    @classmethod
    def from_config(cls, config: DataConfig, tokenizer: ChatTokenizer) -> PromptSource:
        return cls(
            load_rows(config),
            tokenizer,
            config.max_prompt_length,
            config.apply_chat_template,
            config.shuffle,
            config.seed,
        )

    def _epoch_order(self) -> list[int]:
        return epoch_order(len(self.rows), self.seed, self.epoch, self.shuffle)

    def tokenize(self, row: PromptRow) -> list[int]:
        return prompt_token_ids(self.tokenizer, row.messages, self.apply_chat_template)

    def _advance(self) -> int:
        if self.cursor == len(self._order):
            self.epoch += 1
            self.cursor = 0
            self._order = self._epoch_order()
        index = self._order[self.cursor]
        self.cursor += 1
        return index

    def next_prompts(self, count: int) -> list[Prompt]:
        """The next `count` prompts within the length limit, wrapping into new epochs.

        Raises:
            ValueError: if no prompt of a whole epoch fits `max_prompt_length`.
        """
        prompts: list[Prompt] = []
        consecutive_skips = 0
        while len(prompts) < count:
            index = self._advance()
            input_ids = self.tokenize(self.rows[index])
            if len(input_ids) > self.max_prompt_length:
                self.num_skipped += 1
                consecutive_skips += 1
                logger.warning(
                    "prompt row %d has %d tokens > max_prompt_length=%d: skipped "
                    "(%d over-length prompts skipped so far)",
                    index,
                    len(input_ids),
                    self.max_prompt_length,
                    self.num_skipped,
                )
                if consecutive_skips >= len(self.rows):
                    raise ValueError(
                        f"no prompt fits max_prompt_length={self.max_prompt_length} tokens"
                    )
                continue
            consecutive_skips = 0
            prompts.append(Prompt(index, tuple(input_ids), self.rows[index].ground_truth))
        return prompts

    def state_dict(self) -> dict[str, int]:
        """The position in the stream (the order is re-derived from the seed)."""
        return {"epoch": self.epoch, "cursor": self.cursor, "num_skipped": self.num_skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]
        self.cursor = state["cursor"]
        self.num_skipped = state["num_skipped"]
        self._order = self._epoch_order()
