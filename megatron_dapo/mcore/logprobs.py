"""Per-token log-probs and entropy from vocab-parallel logits, without gathering the vocabulary.

Each tensor-parallel (TP) rank holds a contiguous shard `[start, start + V_local)` of the
vocabulary (Megatron-Core's `VocabUtility`: shard `r` starts at `r * V_local`). For logits `z`
(already divided by the sampling temperature) the scheme of Megatron's
`vocab_parallel_cross_entropy` gives, per token, with one MAX and one SUM all-reduce over the
TP group:

    m      = max_v z_v                                   (all-reduce MAX)
    s      = sum_v exp(z_v - m)                          (all-reduce SUM, stacked with ...)
    z_t    = z at the sampled token (0 on other shards)  (... the same SUM)
    q      = sum_v exp(z_v - m) (z_v - m)                (... the same SUM, entropy only)
    log Z  = m + log s,   log p_t = z_t - log Z,   H = log s - q / s

Tokens are processed in chunks of `chunk_size`, each upcast to float32 (logits may be bf16), so
the float32 intermediates are
`chunk_size x V_local`, never `tokens x V_local`. The backward pass recomputes each chunk's
softmax from the saved `log Z` and `H` (two floats per token) and needs no communication:

    d log p_t / dz_v = 1[v = t] - p_v,      dH / dz_v = -p_v (log p_v + H)

Two entry points:

* `vocab_parallel_log_probs` / `vocab_parallel_entropy` /
  `vocab_parallel_log_probs_and_entropy` take logits `[..., V_local]` that already exist
  (e.g. `GPTModel` output with `parallel_output=True`). The logits themselves (and their
  gradient) are still `tokens x V_local`.
* `fused_linear_log_probs` / `fused_linear_log_probs_and_entropy` (targets None: entropy only)
  take the last hidden states `[..., H]` and the vocab-parallel output weight `[V_local, H]` and
  compute the logits chunk by chunk, in backward too, so `tokens x V_local` is never
  materialised; peak memory is the weight, its gradient and a few chunks.

Getting hidden states and the output weight out of Megatron-Core 0.16.1's `GPTModel` (its
`_postprocess` applies `output_layer` to the decoder output, after the final norm):

    class HiddenStatesGPTModel(GPTModel):   # valid without MTP (config.mtp_num_layers None)
        def _postprocess(self, hidden_states, *args, **kwargs):
            return hidden_states                # skip output_layer (and the loss)

    hidden = model(tokens, position_ids, attention_mask)   # [s, b, H] (s / TP with SP)
    hidden = output_layer_input(hidden, model.output_layer.sequence_parallel, tp_group)
    weight = output_weight(model)                           # [V_local, H]
    logp = fused_linear_log_probs(hidden, weight, labels.t(), tp_group=tp_group, ...)

`output_layer_input` is what `ColumnParallelLinear` does to its input: a sequence-parallel
all-gather, or an identity whose backward all-reduces. The fused functions return this rank's
partial gradient of `hidden` (its vocab shard's share); that region mapping sums it over TP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.tensor_parallel.utils import VocabUtility
from torch import Tensor

_ProcessGroup = dist.ProcessGroup | None


def _world(group: _ProcessGroup) -> tuple[int, int]:
    """(rank, size) in the TP group; (0, 1) without one."""
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics are at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _all_reduce(tensor: Tensor, op: dist.ReduceOp.RedOpType, group: _ProcessGroup) -> None:
    if _world(group)[1] > 1:
        dist.all_reduce(tensor, op=op, group=group)


class _ShardTargets:
    """Sampled-token indices local to this rank's vocab shard."""

    def __init__(self, targets: Tensor | None, vocab_local: int, group: _ProcessGroup):
        self.present = targets is not None
        if targets is None:
            return
        rank, size = _world(group)
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(vocab_local, rank, size)
        self.in_shard = (targets >= start) & (targets < end)
        self.local = torch.where(self.in_shard, targets - start, 0)

    def chunk(self, sl: slice) -> tuple[Tensor, Tensor]:
        return self.local[sl, None], self.in_shard[sl]


def _chunk_forward(
    z: Tensor,
    targets: _ShardTargets,
    sl: slice,
    with_entropy: bool,
    group: _ProcessGroup,
) -> tuple[Tensor, Tensor]:
    """log Z and (log p_t, H) of one chunk; `z` [n, V_local] is temperature-scaled, overwritten.

    Returns (log_z [n], stats [n, 2]) where stats[:, 0] = log p_t and stats[:, 1] = H (zeros
    for what was not asked).
    """
    n = z.shape[0]
    m = z.max(dim=-1).values
    _all_reduce(m, dist.ReduceOp.MAX, group)
    sums = z.new_zeros(n, 3)
    if targets.present:
        local, in_shard = targets.chunk(sl)
        sums[:, 1] = torch.where(in_shard, z.gather(1, local).squeeze(1), 0.0)
    z.sub_(m[:, None])  # z - m
    e = torch.exp(z)
    sums[:, 0] = e.sum(dim=-1)
    if with_entropy:
        sums[:, 2] = torch.linalg.vecdot(e, z)
    del e
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    log_s = sums[:, 0].log()
    log_z = m + log_s
    stats = torch.zeros_like(sums[:, :2])
    if targets.present:
        stats[:, 0] = sums[:, 1] - log_z
    if with_entropy:
        stats[:, 1] = log_s - sums[:, 2] / sums[:, 0]
    return log_z, stats


def _chunk_grad(
    z: Tensor,
    targets: _ShardTargets,
    sl: slice,
    log_z: Tensor,
    entropy: Tensor,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
) -> Tensor:
    """d(loss)/d(logits) of one chunk, [n, V_local]; `z` (temperature-scaled) is overwritten.

    grad_v = g_lp (1[v = t] - p_v) - g_H p_v (log p_v + H), divided by the temperature.
    """
    if grad_logp is None and grad_entropy is None:
        return z.zero_()
    g_lp = None if grad_logp is None else grad_logp / temperature
    logp_all = z.sub_(log_z[:, None])
    p = torch.exp(logp_all)
    if grad_entropy is None:
        grad = p.mul_(-g_lp[:, None])
    else:  # -(g_lp + g_H (log p + H)) / T = a log p + b per token
        g_h = grad_entropy / temperature
        bias = -g_h * entropy if g_lp is None else -(g_lp + g_h * entropy)
        grad = p.mul_(logp_all.mul_(-g_h[:, None]).add_(bias[:, None]))
    if g_lp is not None:
        local, in_shard = targets.chunk(sl)
        grad.scatter_add_(1, local, torch.where(in_shard, g_lp, 0.0)[:, None])
    return grad


def _chunks(n: int, chunk_size: int) -> list[slice]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [slice(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


def _grads_in(grad: Tensor | None, needed: bool, dtype: torch.dtype) -> Tensor | None:
    return grad.reshape(-1).to(dtype) if needed and grad is not None else None


@dataclass(frozen=True)
class _Options:
    group: _ProcessGroup
    chunk_size: int
    temperature: float
    with_logp: bool
    with_entropy: bool


class _LogitsSource:
    """Chunks of given logits `[N, V_local]`; the gradient is `[N, V_local]` too."""

    def __init__(self, logits: Tensor):
        self.logits = logits
        self.num_tokens, self.vocab_local = logits.shape

    def chunk(self, sl: slice, dtype: torch.dtype, temperature: float) -> Tensor:
        z = self.logits[sl].to(dtype, copy=True)
        return z if temperature == 1.0 else z.div_(temperature)

    def grad_buffers(self, needed: tuple[bool, ...]) -> list[Tensor | None]:
        return [torch.empty_like(self.logits) if needed[0] else None]

    def accumulate(self, sl: slice, grad_z: Tensor, grads: list[Tensor | None]) -> None:
        grads[0][sl] = grad_z


class _LinearSource:
    """Chunks of `hidden [N, H] @ weight[V_local, H].T`, computed on demand."""

    def __init__(self, hidden: Tensor, weight: Tensor):
        self.hidden, self.weight = hidden, weight
        self.num_tokens, self.vocab_local = hidden.shape[0], weight.shape[0]

    def chunk(self, sl: slice, dtype: torch.dtype, temperature: float) -> Tensor:
        hidden = self.hidden[sl] if temperature == 1.0 else self.hidden[sl] / temperature
        return (hidden @ self.weight.t()).to(dtype)

    def grad_buffers(self, needed: tuple[bool, ...]) -> list[Tensor | None]:
        return [
            torch.empty_like(self.hidden) if needed[0] else None,
            torch.zeros_like(self.weight) if needed[1] else None,
        ]

    def accumulate(self, sl: slice, grad_z: Tensor, grads: list[Tensor | None]) -> None:
        grad_z = grad_z.to(self.weight.dtype)
        grad_hidden, grad_weight = grads
        if grad_hidden is not None:
            torch.mm(grad_z, self.weight, out=grad_hidden[sl])
        if grad_weight is not None:
            grad_weight.addmm_(grad_z.t(), self.hidden[sl])


def _source(inputs: tuple[Tensor, ...]) -> _LogitsSource | _LinearSource:
    return _LogitsSource(*inputs) if len(inputs) == 1 else _LinearSource(*inputs)


class _ChunkedLogProbsEntropy(torch.autograd.Function):
    """Chunked log-probs/entropy of `inputs` = (logits,) or (hidden, weight); see the module
    docstring. Only per-token statistics are saved; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, options: _Options, targets: Tensor | None, *inputs: Tensor):
        source = _source(inputs)
        compute = _compute_dtype(inputs[0].dtype)
        shard = _ShardTargets(targets, source.vocab_local, options.group)
        stats = inputs[0].new_empty(source.num_tokens, 2, dtype=compute)
        log_z = inputs[0].new_empty(source.num_tokens, dtype=compute)
        for sl in _chunks(source.num_tokens, options.chunk_size):
            z = source.chunk(sl, compute, options.temperature)
            log_z[sl], stats[sl] = _chunk_forward(z, shard, sl, options.with_entropy, options.group)
        ctx.save_for_backward(*inputs, log_z, stats)
        ctx.shard, ctx.options = shard, options
        return stats[:, 0].clone(), stats[:, 1].clone()

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        *inputs, log_z, stats = ctx.saved_tensors
        options, source = ctx.options, _source(tuple(inputs))
        g_lp = _grads_in(grad_logp, options.with_logp, log_z.dtype)
        g_h = _grads_in(grad_entropy, options.with_entropy, log_z.dtype)
        grads = source.grad_buffers(ctx.needs_input_grad[2:])
        for sl in _chunks(source.num_tokens, options.chunk_size):
            z = source.chunk(sl, log_z.dtype, options.temperature)
            grad_z = _chunk_grad(
                z,
                ctx.shard,
                sl,
                log_z[sl],
                stats[sl, 1],
                None if g_lp is None else g_lp[sl],
                None if g_h is None else g_h[sl],
                options.temperature,
            )
            source.accumulate(sl, grad_z, grads)
        return None, None, *grads


def _apply(
    inputs: tuple[Tensor, ...], targets: Tensor | None, options: _Options
) -> tuple[Tensor, Tensor]:
    """Flattens the leading dims of `inputs[0]`, runs the chunked function, restores them."""
    first = inputs[0]
    lead = first.shape[:-1]
    flat_targets = None
    if options.with_logp:
        if targets.shape != lead:
            raise ValueError(f"targets shape {tuple(targets.shape)} != leading shape {lead}")
        flat_targets = targets.reshape(-1).long()
    flat = (first.reshape(-1, first.shape[-1]), *inputs[1:])
    logp, entropy = _ChunkedLogProbsEntropy.apply(options, flat_targets, *flat)
    return logp.reshape(lead), entropy.reshape(lead)


def vocab_parallel_log_probs_and_entropy(
    logits: Tensor,
    targets: Tensor,
    tp_group: _ProcessGroup = None,
    chunk_size: int = 4096,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Log-probs of `targets` and entropies under `softmax(logits / temperature)`, one pass.

    Args:
        logits: `[..., V_local]`, this rank's vocab shard (`[..., V]` without TP).
        targets: `[...]` int64 global token ids.
        tp_group: the tensor-parallel group the vocabulary is split over; None = no TP.
        chunk_size: tokens per chunk (bounds the `chunk_size x V_local` float32 temporaries).
        temperature: the sampling temperature the logits are divided by.
    Returns:
        (log_probs `[...]`, entropy `[...]` in nats), differentiable, in float32 (float64 for
        float64 logits) whatever the logits' dtype: bf16 would round a log-prob of -5 by 0.02,
        a 2% error in the importance ratio.
    """
    options = _Options(tp_group, chunk_size, temperature, True, True)
    return _apply((logits,), targets, options)


def vocab_parallel_log_probs(
    logits: Tensor,
    targets: Tensor,
    tp_group: _ProcessGroup = None,
    chunk_size: int = 4096,
    temperature: float = 1.0,
) -> Tensor:
    """Log-probs `[...]` of `targets` (see `vocab_parallel_log_probs_and_entropy`)."""
    return _apply((logits,), targets, _Options(tp_group, chunk_size, temperature, True, False))[0]


def vocab_parallel_entropy(
    logits: Tensor, tp_group: _ProcessGroup = None, chunk_size: int = 4096, temperature: float = 1.0
) -> Tensor:
    """Entropy `[...]` in nats (see `vocab_parallel_log_probs_and_entropy`)."""
    return _apply((logits,), None, _Options(tp_group, chunk_size, temperature, False, True))[1]


def fused_linear_log_probs_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor | None,
    tp_group: _ProcessGroup = None,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies of `softmax(hidden @ weight.T / temperature)`, chunked.

    Args:
        hidden: `[..., H]` output-layer input, full sequence, identical on all TP ranks
            (see `output_layer_input`); its gradient is this rank's partial sum.
        weight: `[V_local, H]` this rank's vocab shard of the output (or tied embedding) weight.
        targets: `[...]` int64 global token ids; None = entropy only (log-probs are zeros).
        tp_group, chunk_size, temperature: as in `vocab_parallel_log_probs_and_entropy`.
    Returns:
        (log_probs `[...]`, entropy `[...]`), in float32 (float64 for float64 inputs).
    """
    options = _Options(tp_group, chunk_size, temperature, targets is not None, True)
    return _apply((hidden, weight), targets, options)


def fused_linear_log_probs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    tp_group: _ProcessGroup = None,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> Tensor:
    """Log-probs `[...]` of `targets` (see `fused_linear_log_probs_and_entropy`)."""
    options = _Options(tp_group, chunk_size, temperature, True, False)
    return _apply((hidden, weight), targets, options)[0]


def output_layer_input(hidden: Tensor, sequence_parallel: bool, tp_group: _ProcessGroup) -> Tensor:
    """The TP-replicated, full-sequence input of the output layer, as `ColumnParallelLinear` makes
    it: all-gather along the sequence (dim 0) with sequence parallelism, else an identity whose
    backward all-reduces the partial gradients over TP."""
    if _world(tp_group)[1] == 1:
        return hidden
    if sequence_parallel:
        return gather_from_sequence_parallel_region(hidden, group=tp_group)
    return copy_to_tensor_model_parallel_region(hidden, group=tp_group)


def output_weight(model: torch.nn.Module) -> Tensor:
    """The `[V_local, H]` output weight of a Megatron `GPTModel` last stage (tied or not)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight
