"""Prompt sources: jsonl / parquet files (HF `datasets`, offline) and `reasoning_gym` tasks.

A row is a chat (a list of `{"role", "content"}` messages, or a plain string taken as one user
message) plus a reference answer. The file layout defaults to DAPO-Math-17k: messages under
`prompt`, the answer under `reward_model.ground_truth` (a dotted path into nested columns).

`PromptSource` walks the rows in a deterministic order (a fresh permutation per epoch from
`seed + epoch`, or file order without shuffling), renders each with the tokenizer's chat
template, and skips prompts longer than `max_prompt_length` tokens, counting them and saying
so in the log. Its position (`state_dict`) resumes the exact sequence after a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pipeline.config import DataConfig

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


def _lookup(row: dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"prompt row has no {dotted!r} (missing {key!r}); keys: {list(row)}")
        value = value[key]
    return value


def _as_messages(value: Any) -> Messages:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def load_rows(config: DataConfig) -> list[PromptRow]:
    """Read every row of the configured source (files through `datasets`, no network), keeping
    those whose answer fits `max_answer_chars`."""
    if config.source == "reasoning_gym":
        import reasoning_gym

        assert config.task is not None
        dataset = reasoning_gym.create_dataset(
            config.task, size=config.task_size, seed=config.seed, **config.task_options
        )
        rows = [PromptRow(_as_messages(item["question"]), str(item["answer"])) for item in dataset]
    else:
        import datasets

        table = datasets.load_dataset(
            "json" if config.source == "jsonl" else "parquet", data_files=config.path, split="train"
        )
        rows = [
            PromptRow(
                _as_messages(_lookup(row, config.prompt_key)), str(_lookup(row, config.answer_key))
            )
            for row in table
        ]
    if config.max_answer_chars is not None:
        rows = [row for row in rows if len(row.ground_truth) <= config.max_answer_chars]
    return rows


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
        if not self.shuffle:
            return list(range(len(self.rows)))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.rows), generator=generator).tolist()

    def tokenize(self, row: PromptRow) -> list[int]:
        if self.apply_chat_template:
            return list(
                self.tokenizer.apply_chat_template(
                    row.messages, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        return list(self.tokenizer.encode("".join(m["content"] for m in row.messages)))

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
