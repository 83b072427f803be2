"""torchrun worker (2 ranks, gloo): vocab-parallel log-probs/entropy vs the full-vocab result.

Every rank builds the same fp64 data, keeps its vocab shard, and compares its shard's values
and gradients with the single-process full-vocab reference; rank 0 writes the max abs errors
(max over ranks) as JSON to argv[1]. Targets include both sides of the shard boundary.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from megatron_dapo.mcore.cpu_patches import apply_cpu_patches
from megatron_dapo.mcore.logprobs import (
    fused_linear_log_probs_and_entropy,
    output_layer_input,
    vocab_parallel_log_probs_and_entropy,
)

TOKENS, HIDDEN, VOCAB, TEMPERATURE = 22, 6, 40, 0.9


def _reference_loss(logits, targets, a, b):
    logp_all = torch.log_softmax(logits / TEMPERATURE, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = torch.distributions.Categorical(logits=logits / TEMPERATURE).entropy()
    return logp, entropy, (a * logp + b * entropy).sum()


def _err(x, y) -> float:
    return (x.detach() - y.detach()).abs().max().item()


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    apply_cpu_patches()  # Megatron's sequence-parallel gather allocates on current_device()
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    local_vocab = VOCAB // world
    lo, hi = rank * local_vocab, (rank + 1) * local_vocab
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    boundary = torch.tensor([0, local_vocab - 1, local_vocab, VOCAB - 1])
    targets[: len(boundary)] = boundary
    a, b = torch.randn(2, TOKENS, generator=g, dtype=torch.float64)

    full_h, full_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_logp, ref_entropy, ref_loss = _reference_loss(full_h @ full_w.t(), targets, a, b)
    ref_loss.backward()
    errors = {}

    logits = (hidden @ weight[lo:hi].t()).requires_grad_()
    full_logits = (hidden @ weight.t()).requires_grad_()
    _, _, full_loss = _reference_loss(full_logits, targets, a, b)
    full_loss.backward()
    logp, entropy = vocab_parallel_log_probs_and_entropy(
        logits, targets, tp_group=group, chunk_size=5, temperature=TEMPERATURE
    )
    (a * logp + b * entropy).sum().backward()
    errors["logits_logp"] = _err(logp, ref_logp)
    errors["logits_entropy"] = _err(entropy, ref_entropy)
    errors["logits_grad"] = _err(logits.grad, full_logits.grad[:, lo:hi])

    h = hidden.clone().requires_grad_()
    w = weight[lo:hi].clone().requires_grad_()
    logp, entropy = fused_linear_log_probs_and_entropy(
        output_layer_input(h, False, group),
        w,
        targets,
        tp_group=group,
        chunk_size=4,
        temperature=TEMPERATURE,
    )
    (a * logp + b * entropy).sum().backward()
    errors["fused_logp"] = _err(logp, ref_logp)
    errors["fused_entropy"] = _err(entropy, ref_entropy)
    errors["fused_grad_hidden"] = _err(h.grad, full_h.grad)
    errors["fused_grad_weight"] = _err(w.grad, full_w.grad[lo:hi])

    # sequence parallel: each rank holds a slice of the tokens, gathered before the output layer
    rows = slice(rank * TOKENS // world, (rank + 1) * TOKENS // world)
    h_sp = hidden[rows].clone().requires_grad_()
    logp, entropy = fused_linear_log_probs_and_entropy(
        output_layer_input(h_sp, True, group),
        w.detach(),
        targets,
        tp_group=group,
        chunk_size=7,
        temperature=TEMPERATURE,
    )
    (a * logp + b * entropy).sum().backward()
    errors["fused_sp_grad_hidden"] = _err(h_sp.grad, full_h.grad[rows])

    values = torch.tensor(list(errors.values()), dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(zip(errors, values.tolist(), strict=True)), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
