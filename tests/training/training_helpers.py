"""Tiny run configs and random `TrainBatch`es shared by the training-plane tests."""

from __future__ import annotations

import torch

from megatron_dapo.config.schema import RunConfig
from pipeline.train_batch import TrainBatch

VOCAB = 128


def tiny_run_config(
    moe: bool = False, world_size: int = 1, max_tokens: int = 64, **parallelism: object
) -> RunConfig:
    """A 4-layer GQA policy for `world_size` ranks.

    Dense: tied embeddings. MoE: untied, 4 experts, top-2, aux loss, shared expert.
    """
    model: dict[str, object] = {
        "num_layers": 4,
        "hidden_size": 32,
        "ffn_hidden_size": 64,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
        "qk_layernorm": True,
        "add_qkv_bias": True,
        "tie_embeddings": not moe,
    }
    if moe:
        model["moe"] = {
            "num_experts": 4,
            "router_topk": 2,
            "ffn_hidden_size": 32,
            "shared_expert_ffn_hidden_size": 32,
            "aux_loss_coeff": 1e-2,
        }
    return RunConfig.model_validate(
        {
            "model": model,
            "parallelism": {"backend": "gloo", **parallelism},
            "rollout": {"n_samples_per_prompt": 4, "max_response_length": max_tokens // 2},
            "data": {
                "source": "reasoning_gym",
                "task": "basic_arithmetic",
                "max_prompt_length": max_tokens // 2,
            },
            "reward": {"overlong": {"cache_length": 4}},
            "optimizer": {
                "lr": 1e-2,
                "lr_warmup_steps": 2,
                "weight_decay": 0.01,
                "clip_grad": 1.0,
                "adam_eps": 1e-4,  # Adam's first step is ~sign(g): keep it continuous
            },
            "training": {
                "steps": 4,
                "prompts_per_step": 2,
                "mini_batch_size": 8,
                "micro_batch_max_tokens": max_tokens,
                "log_prob_chunk_size": 16,
            },
            "launch": {"nproc_per_node": world_size},
        }
    )


def random_train_batch(
    seed: int, lengths: tuple[int, ...] = (17, 9, 30, 5, 22, 12, 26, 8), vocab: int = VOCAB
) -> TrainBatch:
    """Samples of the given token lengths (prompt 2-4 tokens), random tokens and advantages.

    The last sample is overlong-filtered (no loss tokens); old log-probs are near the tiny
    policy's (about -log(vocab)) so that some ratios leave the clip range.
    """
    generator = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    num_samples = len(lengths)
    prompts = torch.randint(2, 5, (num_samples,), generator=generator)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths_t.cumsum(0)])
    num_tokens = int(offsets[-1])
    sample_of_token = torch.repeat_interleave(torch.arange(num_samples), lengths_t)
    position = torch.arange(num_tokens) - offsets[sample_of_token]
    response = position >= prompts[sample_of_token]
    filtered = torch.zeros(num_samples, dtype=torch.bool)
    filtered[-1] = True
    old_log_probs = -torch.rand(num_tokens, generator=generator) * 2.0 - 4.0
    return TrainBatch(
        tokens=torch.randint(0, vocab, (num_tokens,), generator=generator),
        sample_offsets=offsets,
        prompt_lengths=prompts,
        rollout_log_probs=torch.where(response, old_log_probs, 0.0),
        loss_mask=response & ~filtered[sample_of_token],
        advantages=torch.randn(num_samples, generator=generator),
        rewards=torch.randn(num_samples, generator=generator),
        group_ids=torch.arange(num_samples) // 4,
        weight_versions=torch.zeros(num_samples, dtype=torch.int64),
    )


def unpacked_log_probs(trainer, batch: TrainBatch):
    """From the trainer's policy (`PolicyTrainer`, one chunk, one rank) with a full-vocabulary
    log_softmax, each sample alone (no packing, no mask): the log-probs and entropies of every
    target `[num targets]` (nats, at `rollout.temperature`), which batch tokens are targets
    (`keep`, `[N]` bool) and each target's sample `[num targets]`."""
    (model,) = trainer.models
    log_probs, entropy, sequence_ids = [], [], []
    for sample in range(batch.num_samples):
        start, end = batch.sample_offsets[sample], batch.sample_offsets[sample + 1]
        tokens = batch.tokens[start:end].unsqueeze(0)
        n = int(end - start)
        causal = torch.ones(n, n, dtype=torch.bool).triu(1).view(1, 1, n, n)  # True = masked
        logits = model(tokens, torch.arange(n).unsqueeze(0), causal)[0, :-1]
        logits = logits / trainer.config.rollout.temperature
        full = torch.log_softmax(logits.float(), dim=-1)
        log_probs.append(full.gather(1, batch.tokens[start + 1 : end, None]).squeeze(1))
        entropy.append(-(full.exp() * full).sum(-1))
        sequence_ids.append(torch.full((end - start - 1,), sample))
    keep = torch.ones(batch.num_tokens, dtype=torch.bool)
    keep[batch.sample_offsets[:-1]] = False  # the first token of a sample is never a target
    return torch.cat(log_probs), torch.cat(entropy), keep, torch.cat(sequence_ids)
