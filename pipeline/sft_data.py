"""Prompt/response pairs of supervised fine-tuning, tokenized as the RL step sees its samples.

    pairs = SFTPairs.from_config(config.sft.data, tokenizer)   # every row read and tokenized
    batch = pairs.batch(step, batch_size)                        # a TrainBatch, loss on responses

A pair is the sample an RL rollout would make of the row if the policy wrote the reference
response: the prompt's token ids exactly as the RL prompts are rendered (`prompts.read_rows`:
same fields, `prompt_template`, chat template with the assistant's generation header), then the
response text encoded without special tokens and closed by the token generation stops at (the
chat template's end-of-turn token, else the tokenizer's end-of-sequence token), as a fleet
response that finished returns it. Pairs longer than `max_length` tokens are counted, logged and
skipped.

Batches follow a deterministic, stateless order: optimizer step k reads the k-th `batch_size`
slice of its epoch's order (`prompts.epoch_order`: a permutation per epoch seeded by `seed +
epoch`, or file order); an epoch is `len(pairs) // batch_size` steps, the remainder is
dropped (verl, NeMo-RL). The batch's `loss_mask` is True at response tokens, so the training
plane's loss covers exactly the response (`TrainBatch`: the other per-token and per-sample
fields are zeros, as no rollout produced them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import SFTDataConfig
from pipeline.prompts import PromptRow, epoch_order, prompt_token_ids, read_rows
from pipeline.stop_tokens import end_of_turn_token_id
from pipeline.train_batch import TrainBatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTPair:
    """One tokenized pair.

    Attributes:
        row_index: the row's index in the source.
        prompt_ids: `[P]` the prompt's token ids after the chat template.
        response_ids: `[R]` the response's token ids, the stop token last.
    """

    row_index: int
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]

    @property
    def length(self) -> int:
        """Prompt + response tokens."""
        return len(self.prompt_ids) + len(self.response_ids)


def stop_token_id(tokenizer: Any, apply_chat_template: bool) -> int:
    """The token that ends a response: the chat template's end-of-turn token when the template
    is applied and writes one, else the tokenizer's end-of-sequence token.

    Raises:
        ValueError: the tokenizer has neither.
    """
    end_of_turn = end_of_turn_token_id(tokenizer) if apply_chat_template else None
    token = end_of_turn if end_of_turn is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has no end-of-sequence token to end the responses with")
    return int(token)


def tokenize_pair(
    row: PromptRow, index: int, tokenizer: Any, apply_chat_template: bool, stop: int
) -> SFTPair:
    """`row` (its answer is the response) as token ids; `stop` ends the response."""
    response = tokenizer.encode(row.ground_truth, add_special_tokens=False)
    return SFTPair(
        index,
        tuple(prompt_token_ids(tokenizer, row.messages, apply_chat_template)),
        (*response, stop),
    )


class SFTPairs:
    """The tokenized pairs of a source that fit `max_length`, and their batches.

    Args:
        pairs: the pairs, in source order.
        shuffle: visit them in a seeded random order, re-drawn every epoch.
        seed: the order's seed.
    """

    def __init__(self, pairs: list[SFTPair], shuffle: bool, seed: int) -> None:
        if not pairs:
            raise ValueError("no prompt/response pair to train on")
        self.pairs = pairs
        self.shuffle = shuffle
        self.seed = seed

    @classmethod
    def from_config(cls, config: SFTDataConfig, tokenizer: Any) -> SFTPairs:
        """Read and tokenize every row of `config` (see the module doc).

        Raises:
            MalformedPromptData: a file has malformed rows (file, line and field of each).
            ValueError: no pair fits `config.max_length`.
        """
        stop = stop_token_id(tokenizer, config.apply_chat_template)
        rows = read_rows(config)
        tokenized = [
            tokenize_pair(row, index, tokenizer, config.apply_chat_template, stop)
            for index, row in enumerate(rows)
        ]
        pairs = [p for p in tokenized if p.length <= config.max_length]
        skipped = len(tokenized) - len(pairs)
        if skipped:
            logger.warning(
                "%d of %d prompt/response pairs are longer than sft.data.max_length=%d tokens: "
                "skipped",
                skipped,
                len(tokenized),
                config.max_length,
            )
        if not pairs:
            raise ValueError(
                f"none of the {len(tokenized)} prompt/response pairs fits sft.data.max_length="
                f"{config.max_length} tokens"
            )
        return cls(pairs, config.shuffle, config.seed)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Optimizer steps of one epoch (>= 1; the remainder of the pairs is dropped).

        Raises:
            ValueError: fewer pairs than `batch_size`.
        """
        if len(self.pairs) < batch_size:
            raise ValueError(
                f"{len(self.pairs)} prompt/response pairs do not fill one batch of "
                f"sft.batch_size={batch_size}"
            )
        return len(self.pairs) // batch_size

    def batch(self, step: int, batch_size: int) -> TrainBatch:
        """The pairs of optimizer step `step` (0-based) as a `TrainBatch` of `batch_size`
        samples whose loss mask holds their response tokens (`pairs_batch`)."""
        per_epoch = self.steps_per_epoch(batch_size)
        epoch, position = divmod(step, per_epoch)
        order = epoch_order(len(self.pairs), self.seed, epoch, self.shuffle)
        chosen = [self.pairs[i] for i in order[position * batch_size : (position + 1) * batch_size]]
        return pairs_batch(chosen)


def pairs_batch(pairs: list[SFTPair]) -> TrainBatch:
    """The pairs packed back to back as a `TrainBatch`: loss mask True at response tokens;
    rollout log-probs, advantages, rewards and weight versions 0; one group per sample."""
    prompts = [len(p.prompt_ids) for p in pairs]
    lengths = torch.tensor([p.length for p in pairs])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    tokens = torch.tensor([t for p in pairs for t in (*p.prompt_ids, *p.response_ids)])
    loss_mask = torch.tensor(
        [flag for p in pairs for flag in [False] * len(p.prompt_ids) + [True] * len(p.response_ids)]
    )
    num_samples = len(pairs)
    return TrainBatch(
        tokens=tokens,
        sample_offsets=offsets,
        prompt_lengths=torch.tensor(prompts, dtype=torch.int64),
        rollout_log_probs=torch.zeros(len(tokens)),
        loss_mask=loss_mask,
        advantages=torch.zeros(num_samples),
        rewards=torch.zeros(num_samples),
        group_ids=torch.arange(num_samples),
        weight_versions=torch.zeros(num_samples, dtype=torch.int64),
        metadata=tuple({"row_index": p.row_index} for p in pairs),
    )
