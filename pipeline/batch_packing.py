"""Packing scored groups into a `TrainBatch` (the layout is `pipeline.train_batch`'s).

Each group's responses follow their prompt back to back, groups in order, and share a group id
(`first_group_id`, `first_group_id + 1`, ... for the groups in order). The advantages are the
configured estimator's (`pipeline.advantages`) over the groups' shaped rewards. The loss mask
covers response tokens; with overlong filtering (`filter_truncated`) a response truncated at the
length limit gets none (`pipeline.overlong.overlong_keep_mask`). The fleet's routed experts
(routing replay) are packed with their tokens, the last token of each sample unrouted; either
every response carries them or none does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.advantages import AdvantageConfig, compute_advantages
from pipeline.overlong import overlong_keep_mask
from pipeline.scoring import ScoredGroup
from pipeline.train_batch import TrainBatch, unrouted


def pack_batch(
    groups: Sequence[ScoredGroup],
    advantage: AdvantageConfig,
    first_group_id: int,
    filter_truncated: bool,
) -> TrainBatch:
    """The groups as one `TrainBatch`; see the module docstring.

    Raises:
        ValueError: some responses carry routed experts and others not.
    """
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
    advantages = compute_advantages(rewards, advantage)
    tokens: list[int] = []
    log_probs: list[float] = []
    loss_mask: list[bool] = []
    lengths, prompt_lengths, group_ids, versions = [], [], [], []
    metadata: list[dict[str, Any]] = []
    routes: list[torch.Tensor] = []
    for group_id, group in enumerate(groups, start=first_group_id):
        prompt = list(group.prompt.input_ids)
        trains = [True] * len(group.generations)
        if filter_truncated:
            trains = overlong_keep_mask([g.finish_reason for g in group.generations]).tolist()
        for i, generation in enumerate(group.generations):
            response = list(generation.output_ids)
            tokens += prompt + response
            log_probs += [0.0] * len(prompt) + list(generation.output_logprobs)
            loss_mask += [False] * len(prompt) + [trains[i]] * len(response)
            lengths.append(len(prompt) + len(response))
            prompt_lengths.append(len(prompt))
            group_ids.append(group_id)
            versions.append(generation.weight_version)
            if generation.routed_experts is not None:  # all but the last token's
                routes += [generation.routed_experts, unrouted(1, generation.routed_experts)]
            metadata.append(
                {
                    "row_index": group.prompt.row_index,
                    "finish_reason": generation.finish_reason,
                    "correct": group.correct[i],
                    "score": group.scores[i],
                    "response_length": len(response),
                }
            )
    return TrainBatch(
        tokens=torch.tensor(tokens, dtype=torch.int64),
        sample_offsets=torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0),
        prompt_lengths=torch.tensor(prompt_lengths, dtype=torch.int64),
        rollout_log_probs=torch.tensor(log_probs, dtype=torch.float32),
        loss_mask=torch.tensor(loss_mask, dtype=torch.bool),
        advantages=advantages.reshape(-1).to(torch.float32),
        rewards=rewards.reshape(-1),
        group_ids=torch.tensor(group_ids, dtype=torch.int64),
        weight_versions=torch.tensor(versions, dtype=torch.int64),
        metadata=tuple(metadata),
        routed_experts=_packed_routes(routes, len(lengths)),
    )


def _packed_routes(routes: list[torch.Tensor], num_samples: int) -> torch.Tensor | None:
    """The samples' routes (two tensors per sample) packed `[N, L, K]`; None without routes.

    Raises:
        ValueError: some samples have routes and others not.
    """
    if not routes:
        return None
    if len(routes) != 2 * num_samples:
        raise ValueError(
            f"{len(routes) // 2} of {num_samples} responses carry routed experts: the fleet "
            "must return them for every response (routing replay)"
        )
    return torch.cat(routes)
