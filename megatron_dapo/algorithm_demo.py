"""DAPO's algorithm core on a toy policy, as a stand-in main job until the trainer exists.

The task: prompts `a+b` with a, b in 0..4; a response is up to `MAX_TOKENS` tokens from
{0..9, EOS}, read as the digits before EOS and scored by the DAPO-Math rule reward on
`Answer: <digits>` (+1 / -1), plus the soft overlong punishment (paper Eq. 13) for long
responses. The policy is a table of logits [prompt, position, token] (no model, no rollout
server): everything else is the real algorithm core of one DAPO step:

    sample G responses per prompt from pi_old -> reward + overlong shaping
    -> dynamic sampling (keep groups with 0 < accuracy < 1, re-sample until the batch is full)
    -> group advantages -> mini-batches of micro-batches with the global token normaliser
    -> clip-higher token-level loss -> AdamW step
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import torch

from megatron_dapo.advantages import AdvantageConfig, broadcast_to_tokens, get_advantage_estimator
from megatron_dapo.config import RunConfig
from megatron_dapo.loss_aggregation import count_loss_normalizers, get_loss_aggregation
from megatron_dapo.policy_loss import get_policy_loss, policy_loss_config_at
from megatron_dapo.policy_stats import ClipStats, EntropyStats, clip_stats, entropy_stats
from pipeline.group_filter import filter_groups
from pipeline.overlong import soft_overlong_punishment
from pipeline.rewards.dapo_math import dapo_math_reward

NUM_DIGITS = 10
EOS = NUM_DIGITS
VOCAB = NUM_DIGITS + 1
MAX_TOKENS = 4
"""L_max of the toy: a response that has not emitted EOS after this many tokens is truncated."""
OVERLONG_CACHE = 2
"""L_cache of the toy: responses longer than MAX_TOKENS - OVERLONG_CACHE are punished."""
MICRO_BATCHES_PER_MINI_BATCH = 2
NUM_OPERANDS = 5
"""Operands a, b are in 0..NUM_OPERANDS-1, so answers are single digits."""
INITIAL_EOS_LOGIT = 2.3
"""Initial preference for stopping after the first token (P(EOS) ~ 0.5), so that a random
policy answers correctly now and then and dynamic sampling finds mixed groups."""


@dataclass(frozen=True)
class StepReport:
    """What one toy step did."""

    step: int
    accuracy: float
    """Fraction of correct responses in the step's first generation round (all its groups)."""
    entropy: float
    """Mean policy entropy over the trained response tokens, nats."""
    clip_low: float
    clip_high: float
    generation_rounds: int


class TabularPolicy(torch.nn.Module):
    """Independent categorical distributions per (prompt, position): logits [P, T, V]."""

    def __init__(self, num_prompts: int) -> None:
        super().__init__()
        logits = torch.zeros(num_prompts, MAX_TOKENS, VOCAB)
        logits[:, 1:, EOS] = INITIAL_EOS_LOGIT
        self.logits = torch.nn.Parameter(logits)

    def log_probs(self, prompts: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, T, V] for prompt indices [B]."""
        return torch.log_softmax(self.logits[prompts], dim=-1)


def _decode(tokens: list[int]) -> tuple[str, int]:
    """(response text, length in tokens including EOS) of one sampled token row."""
    length = tokens.index(EOS) + 1 if EOS in tokens else len(tokens) + 1  # +1: over the limit
    digits = "".join(str(t) for t in tokens[: length - 1])
    return f"Answer: {digits}", length


def _sample_groups(
    policy: TabularPolicy, prompts: torch.Tensor, group_size: int, gen: torch.Generator
):
    """Sample G responses per prompt.

    Returns tokens [P*G, T], loss mask [P*G, T], rewards [P, G] and correctness [P, G].
    """
    repeated = prompts.repeat_interleave(group_size)
    with torch.no_grad():
        probs = policy.log_probs(repeated).exp()
    tokens = torch.multinomial(probs.reshape(-1, VOCAB), 1, generator=gen).view(
        len(repeated), MAX_TOKENS
    )
    mask = torch.zeros_like(tokens, dtype=torch.float32)
    correct, lengths = [], []
    for row, prompt in enumerate(repeated.tolist()):
        text, length = _decode(tokens[row].tolist())
        mask[row, : min(length, MAX_TOKENS)] = 1.0
        a, b = divmod(prompt, NUM_OPERANDS)
        correct.append(dapo_math_reward(text, str(a + b)).acc)
        lengths.append(length)
    acc = torch.tensor(correct, dtype=torch.float32)
    reward = torch.where(acc > 0, 1.0, -1.0) + soft_overlong_punishment(
        lengths, MAX_TOKENS, OVERLONG_CACHE
    )
    return tokens, mask, reward.view(-1, group_size), acc.view(-1, group_size)


def _collect_batch(policy, config: RunConfig, step: int, gen: torch.Generator):
    """Dynamic sampling: generate rounds of groups until `prompts_per_step` groups are kept.

    Returns (prompts [N], tokens [N, T], mask [N, T], advantages [N], accuracy of the first
    round over all its responses, generation rounds), N = prompts_per_step x G.
    """
    algo, group_size = config.algorithm, config.rollout.n_samples_per_prompt
    wanted = config.training.prompts_per_step * group_size
    advantage_fn = get_advantage_estimator(algo.advantage_estimator)
    parts, rounds, first_accuracy = [], 0, None
    while sum(len(p[0]) for p in parts) < wanted:
        rounds += 1
        if rounds > algo.dynamic_sampling.max_generation_rounds:
            raise RuntimeError(
                f"step {step}: fewer than {config.training.prompts_per_step} groups with "
                f"0 < accuracy < 1 after {rounds - 1} generation rounds "
                "(algorithm.dynamic_sampling.max_generation_rounds)"
            )
        prompts = torch.randint(
            0, NUM_OPERANDS**2, (config.training.prompts_per_step,), generator=gen
        )
        tokens, mask, reward, acc = _sample_groups(policy, prompts, group_size, gen)
        first_accuracy = float(acc.mean()) if first_accuracy is None else first_accuracy
        keep = (
            filter_groups(acc).keep
            if algo.dynamic_sampling.enabled
            else torch.ones_like(prompts, dtype=torch.bool)
        )
        rows = keep.repeat_interleave(group_size)
        advantages = advantage_fn(reward[keep], AdvantageConfig()).reshape(-1)
        parts.append(
            (prompts.repeat_interleave(group_size)[rows], tokens[rows], mask[rows], advantages)
        )
    prompts, tokens, mask, advantages = (torch.cat(p)[:wanted] for p in zip(*parts, strict=True))
    return prompts, tokens, mask, advantages, first_accuracy, rounds


def run_algorithm_demo(config: RunConfig, lr: float = 0.05, progress=print) -> list[StepReport]:
    """Train the toy policy for `config.training.steps` steps; returns one report per step.

    `lr` is the toy's own (a logits table wants a larger step than a transformer).
    """
    gen = torch.Generator().manual_seed(config.training.seed)
    algo = config.algorithm
    policy = TabularPolicy(NUM_OPERANDS**2)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    loss_fn = get_policy_loss(algo.policy_loss)
    aggregate = get_loss_aggregation(algo.loss_aggregation)
    reports = []
    for step in range(config.training.steps):
        loss_config = policy_loss_config_at(algo, step)
        prompts, tokens, mask, advantages, accuracy, rounds = _collect_batch(
            policy, config, step, gen
        )
        with torch.no_grad():
            old_log_probs = policy.log_probs(prompts).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        sequence_ids = torch.arange(len(tokens)).unsqueeze(1).expand_as(tokens)
        token_advantages = broadcast_to_tokens(advantages, sequence_ids, mask)
        clips, entropies = [], []
        for mini_batch in torch.arange(len(tokens)).split(config.training.mini_batch_size):
            micro_batches = [
                mini_batch[i::MICRO_BATCHES_PER_MINI_BATCH]
                for i in range(MICRO_BATCHES_PER_MINI_BATCH)
            ]
            local_ids = [sequence_ids[rows] - sequence_ids[rows].min() for rows in micro_batches]
            normalizers = count_loss_normalizers(
                [mask[rows] for rows in micro_batches],
                local_ids,
                algo.loss_norm_constant or MAX_TOKENS,
            )
            optimizer.zero_grad()
            for rows in micro_batches:
                ids = torch.arange(len(rows)).unsqueeze(1).expand(-1, MAX_TOKENS)
                log_p = policy.log_probs(prompts[rows])
                token_log_p = log_p.gather(-1, tokens[rows].unsqueeze(-1)).squeeze(-1)
                out = loss_fn(
                    token_log_p,
                    old_log_probs[rows],
                    token_advantages[rows],
                    mask[rows],
                    ids,
                    loss_config,
                )
                aggregate(out.token_loss, mask[rows], ids, normalizers).backward()
                clips.append(
                    clip_stats(out.clipped_low, out.clipped_high, out.dual_clipped, mask[rows])
                )
                entropies.append(entropy_stats(-(log_p.exp() * log_p).sum(-1), mask[rows]))
            optimizer.step()
        clip, entropy = reduce(ClipStats.merge, clips), reduce(EntropyStats.merge, entropies)
        report = StepReport(
            step=step,
            accuracy=accuracy,
            entropy=float(entropy.mean()),
            clip_low=float(clip.low_fraction()),
            clip_high=float(clip.high_fraction()),
            generation_rounds=rounds,
        )
        progress(report)
        reports.append(report)
    return reports
