"""Per-GPU memory of a run, from its `RunConfig` alone (`megatron-dapo plan CONFIG`).

Pure arithmetic, no Megatron or torch import. All sizes are bytes unless named `_gib`
(GiB = 2**30 bytes). Notation: h = hidden size, q = heads x kv_channels (query width),
k = query groups x kv_channels (key/value width), f = MLP width, a = attention heads,
d = bytes of `model.params_dtype`, s = tokens of one micro-batch
(`training.micro_batch_max_tokens`), t = tensor-parallel size.

Trainer, per rank (Megatron-Core 0.16.1 as `megatron_dapo.mcore.policy_step` builds it):

* parameters: this rank's shard x d (TP splits linear layers and the vocabulary, PP the layers,
  EP the experts, expert-TP each expert; norms and routers are replicated).
* reference policy (`algorithm.kl_coef > 0`): a frozen copy of the parameters, the same shard
  x d; no gradients, no optimizer state (0 without a KL penalty).
* gradients: Megatron DDP's contiguous `main_grad` buffers, fp32 for every parameter
  (`grad_reduce_in_fp32=True`), 4 bytes per parameter of the rank.
* optimizer: Adam's m and v in fp32 (8 bytes per parameter) plus an fp32 master copy (4) when
  the parameters are 16-bit; with the distributed optimizer these are sharded over the data-
  parallel group, dense parameters over DP = world / (TP x PP) and expert parameters over
  expert DP = world / (EP x ETP x PP).
* activations: what one micro-batch's forward keeps for backward, per layer per token, after
  Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
  (arXiv 2205.05198, Sec. 4), adapted to this model (RMSNorm, no biases or dropout, RoPE, GQA,
  SwiGLU, MoE top-k): every saved tensor is listed in `layer_activation_bytes`, for the local
  spec as measured on CPU with autograd's saved-tensor hooks (tests/training/
  test_memory_plan.py) and for Transformer Engine from its fused kernels' saved tensors. With
  sequence parallelism the tensors outside attention and MLP (norm inputs and outputs, the
  residual stream) are split over TP too. Pipeline 1F1B keeps up to PP micro-batches in flight
  on the first stage (one on the last; interleaved: `in_flight_chunks`). Recompute: `selective`
  keeps only core attention's inputs; `full` keeps each recomputed unit's input [s, h] and,
  during backward, one unit's activations.
* logits (last stage): the full logits [s, V / t] in the model dtype that the loss holds, their
  gradient of the same size, and two fp32 chunks [log_prob_chunk_size, V / t] of the chunked
  vocab-parallel log-prob/entropy (`megatron_dapo.mcore.logprobs`).

Rollout fleet, per SGLang server GPU: the weights / fleet TP, and a KV cache of 2 x layers x
kv_heads x head_dim x d bytes per token for `rollout.max_inflight_per_server` requests of
`data.max_prompt_length + rollout.max_response_length` tokens, in what SGLang leaves for
weights and KV (`SGLANG_RESERVED_GIB`, or the `--mem-fraction-static` of
`pipeline.colocation.server_memory_fraction`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_dapo.config.schema import RunConfig
from pipeline.colocation import server_memory_fraction
from pipeline.sglang_server import server_tensor_parallel

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of each `model.params_dtype`."""
FP32 = DTYPE_BYTES["float32"]
ADAM_STATE_BYTES = 2 * FP32
"""Adam's exp_avg and exp_avg_sq, fp32, per parameter."""
MARGIN_FIXED_GIB = 2.0
"""Reserved per trainer GPU beyond the estimate: CUDA context, cuBLAS workspaces, NCCL buffers."""
MARGIN_FRACTION = 0.10
"""Reserved per trainer GPU beyond the estimate, as a fraction of it: allocator fragmentation."""
SGLANG_RESERVED_GIB = 10.0
"""What SGLang 0.5.23 keeps out of its static pool (weights + KV) on GPUs over 60 GiB when
`--mem-fraction-static` is not given: at least 10 GiB for activations and CUDA graphs
(`sglang/srt/arg_groups/memory_hook.py`)."""
LOG_PROB_CHUNK_BUFFERS = 2
"""fp32 [chunk, V / t] buffers alive at once in a chunk of `logprobs` (the shifted logits and
their exponential, forward and backward alike)."""


@dataclass(frozen=True)
class StageMemory:
    """Bytes per rank of one pipeline stage.

    Attributes:
        name: `rank` (PP = 1), `first stage` or `last stage`.
        parameters, reference, gradients, optimizer: static memory (see the module doc).
        activations_no_recompute: activations without any recompute.
        activations: with `training.recompute` (equal to the above for `none`).
        logits: logits, their gradient and the log-prob chunks (0 except on the last stage).
    """

    name: str
    parameters: float
    reference: float
    gradients: float
    optimizer: float
    activations_no_recompute: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        """Peak estimate with the configured recompute."""
        static = self.parameters + self.reference + self.gradients + self.optimizer
        return static + self.activations + self.logits


@dataclass(frozen=True)
class FleetMemory:
    """One SGLang server of the rollout fleet.

    Attributes:
        servers: servers in the fleet (None: behind a router, count unknown).
        tensor_parallel: GPUs per server (`--tp` in `rollout.server_args`).
        weights_per_gpu: model weights per GPU, bytes.
        kv_bytes_per_token: KV cache per token per GPU.
        requests: concurrent requests per server (`rollout.max_inflight_per_server`).
        tokens_per_request: prompt + response tokens of one request.
        pool_per_gpu: what SGLang gives weights + KV per GPU.
    """

    servers: int | None
    tensor_parallel: int
    weights_per_gpu: float
    kv_bytes_per_token: float
    requests: int
    tokens_per_request: int
    pool_per_gpu: float

    @property
    def kv_needed_per_gpu(self) -> float:
        return self.requests * self.tokens_per_request * self.kv_bytes_per_token

    @property
    def full_requests_held(self) -> int:
        """Full-length requests the KV pool of a server holds at once."""
        room = max(self.pool_per_gpu - self.weights_per_gpu, 0.0)
        return int(room // (self.tokens_per_request * self.kv_bytes_per_token))


@dataclass(frozen=True)
class MemoryPlan:
    """The memory of a run's trainer ranks and fleet servers on GPUs of `gpu_gib`."""

    stages: tuple[StageMemory, ...]
    fleet: FleetMemory
    gpu_gib: float
    micro_batch_tokens: int
    in_flight: int
    """Micro-batches (or model-chunk passes with VPP) in flight on the first stage."""

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda stage: stage.total)

    @staticmethod
    def margin(estimate: float) -> float:
        """Bytes kept free beyond `estimate`: `MARGIN_FIXED_GIB` + `MARGIN_FRACTION`."""
        return MARGIN_FIXED_GIB * GIB + MARGIN_FRACTION * estimate

    def trainer_fits(self) -> bool:
        worst = self.worst.total
        return worst + self.margin(worst) <= self.gpu_gib * GIB

    def fleet_fits(self) -> bool:
        return self.fleet.full_requests_held >= self.fleet.requests


# --- model geometry ---------------------------------------------------------------------------


def _widths(config: RunConfig) -> tuple[int, int, int]:
    """(q, k, kv_channels): query and key/value projection widths and the head size."""
    model = config.model
    head = model.kv_channels or model.hidden_size // model.num_attention_heads
    groups = model.num_query_groups or model.num_attention_heads
    return model.num_attention_heads * head, groups * head, head


def layer_parameters(
    config: RunConfig, tensor: int, expert: int = 1, expert_tensor: int | None = None
) -> tuple[float, float]:
    """(dense, expert) parameters of one transformer layer on one rank of `tensor`-way TP,
    `expert`-way EP and `expert_tensor`-way expert TP (None: `tensor`); norms and the router are
    replicated."""
    model = config.model
    h, t = model.hidden_size, tensor
    q, k, head = _widths(config)
    attention = h * (q + 2 * k) / t + q * h / t + h  # qkv, proj, input norm
    if model.add_qkv_bias:
        attention += (q + 2 * k) / t
    if model.qk_layernorm:
        attention += 2 * head
    moe = model.moe
    if moe is None:
        return attention + 3 * h * model.ffn_hidden_size / t + h, 0.0
    dense = attention + h + moe.num_experts * h  # pre-MLP norm, router
    if moe.shared_expert_ffn_hidden_size:
        dense += 3 * h * moe.shared_expert_ffn_hidden_size / t
    width = moe.ffn_hidden_size or model.ffn_hidden_size
    experts = moe.num_experts / expert * 3 * h * width / (expert_tensor or tensor)
    return dense, experts


def stage_parameters(config: RunConfig, first: bool, last: bool) -> tuple[float, float]:
    """(dense, expert) parameters of a pipeline stage's rank: its layers, the embedding on the
    first stage, the output layer (a copy of the embedding when tied) and final norm on the
    last."""
    model, par = config.model, config.parallelism
    dense, expert = layer_parameters(config, par.tensor, par.expert, par.expert_tensor)
    layers = model.num_layers // par.pipeline
    dense *= layers
    vocab = model.vocab_size * model.hidden_size / par.tensor
    if first:
        dense += vocab
    if last:
        dense += model.hidden_size
        if not (model.tie_embeddings and first):
            dense += vocab
    return dense, expert * layers


def total_parameters(config: RunConfig) -> float:
    """Parameters of the whole model (what a fleet server loads)."""
    model = config.model
    dense, expert = layer_parameters(config, tensor=1)
    embeddings = (1 if model.tie_embeddings else 2) * model.vocab_size * model.hidden_size
    return (dense + expert) * model.num_layers + embeddings + model.hidden_size


# --- activations ------------------------------------------------------------------------------


def layer_activation_bytes(config: RunConfig, tokens: int, selective: bool = False) -> float:
    """Bytes one transformer layer keeps for backward over a micro-batch of `tokens` tokens.

        Per token, d = dtype bytes, t = TP, t_sp = t with sequence parallelism (else 1); local spec
    (measured on CPU in float32 and bfloat16):
            norms    2 x (input h + normalised h) 4 / t_sp + 2 rstd 4       (torch RMSNorm, fp32)
            linears  qkv input h d / t_sp, proj input q d / t, fc1 input h d / t_sp
            RoPE     4 kv_channels d                                        (cos, sin for q and k)
            core     q, k and v expanded to q: 3 q d / t; softmax probs a s 4 / t, and their
                     16-bit copy a s d / t when d < 4;
                     selective: its inputs q + k + the qkv output (q + 2k) d / t, no probs
            MLP      2f + f + f + f d / t      (fc1 output, silu, linear half + 0, fc2 input)
        Transformer Engine (fused norm-linears, fused RoPE, flash attention, fused SwiGLU):
            norms + linears  2 x (input h + normalised h) d / t_sp + 2 rstd 4
            core     q + 2k d / t (flash inputs), output q d / t (also proj's input), lse 4 a / t
            MLP      2f + f d / t              (SwiGLU input, fc2 input)
        MoE replaces the MLP term: router 4 (h + E) + 20 topk (fp32 input and scores, indices,
        probs), dispatch 5 E + 8 topk, and per routed copy (topk per token, balanced over EP) the
        expert input h d plus 6F d / etp (local, probs applied to the intermediate) or 3F d / etp
        (TE grouped GEMM), where tokens per rank are s / t_sp.
    """
    model, par = config.model, config.parallelism
    d = DTYPE_BYTES[model.params_dtype]
    h, a = model.hidden_size, model.num_attention_heads
    q, k, head = _widths(config)
    t = par.tensor
    t_sp = t if par.sequence_parallel and t > 1 else 1
    local = model.transformer_impl == "local"
    if local:
        per_token = 2 * (2 * h * FP32 / t_sp + FP32)  # norms
        per_token += 2 * h * d / t_sp + 4 * head * d  # qkv and fc1 inputs, RoPE
        if selective:
            per_token += (2 * q + 3 * k) * d / t
        else:
            probs = FP32 + (d if d < FP32 else 0)
            per_token += 3 * q * d / t + a * tokens * probs / t
        per_token += q * d / t  # proj input
    else:
        per_token = 4 * h * d / t_sp + 2 * FP32 + (2 * q + 2 * k) * d / t
        if not selective:
            per_token += FP32 * a / t
    moe = model.moe
    if moe is None:
        f = model.ffn_hidden_size
        per_token += (5 if local else 3) * f * d / t
        return per_token * tokens
    width = moe.ffn_hidden_size or model.ffn_hidden_size
    etp = par.expert_tensor or par.tensor
    topk, experts = moe.router_topk, moe.num_experts
    routed = topk * (h * d + (6 if local else 3) * width * d / etp + FP32)
    routing = FP32 * (h + experts) + 20 * topk + 5 * experts + 8 * topk
    per_token += (routed + routing) / t_sp
    if moe.shared_expert_ffn_hidden_size:
        per_token += (h * d / t_sp) + (
            5 if local else 3
        ) * moe.shared_expert_ffn_hidden_size * d / t
    return per_token * tokens


def micro_batch_overhead_bytes(config: RunConfig, tokens: int) -> float:
    """Per micro-batch, shared by the layers: RoPE frequencies [s, kv_channels] fp32 and, for the
    local spec, the block-diagonal attention mask [s, s] bool (TE takes packed-sequence
    parameters instead)."""
    head = _widths(config)[2]
    mask = tokens * tokens if config.model.transformer_impl == "local" else 0
    return FP32 * tokens * head + mask


def stage_input_bytes(config: RunConfig, tokens: int) -> float:
    """A layer's input [s, h] (split over TP with sequence parallelism): what full recompute keeps
    per recomputed unit."""
    par = config.parallelism
    t_sp = par.tensor if par.sequence_parallel and par.tensor > 1 else 1
    return tokens * config.model.hidden_size * DTYPE_BYTES[config.model.params_dtype] / t_sp


def recompute_activation_bytes(config: RunConfig, layers: int, tokens: int) -> tuple[float, float]:
    """(kept per micro-batch, transient) activations of `layers` layers under
    `training.recompute`: kept for backward from forward to backward; transient is the extra
    working set while backward recomputes one unit (or one core attention)."""
    recompute = config.training.recompute
    full_layer = layer_activation_bytes(config, tokens)
    if recompute.granularity == "none":
        return layers * full_layer, 0.0
    if recompute.granularity == "selective":
        kept = layer_activation_bytes(config, tokens, selective=True)
        return layers * kept, full_layer - kept
    unit, checkpoint = recompute.num_layers, stage_input_bytes(config, tokens)
    if recompute.method == "uniform":
        return math.ceil(layers / unit) * checkpoint, unit * full_layer
    recomputed = min(unit, layers)
    return recomputed * checkpoint + (layers - recomputed) * full_layer, full_layer


def micro_batches_per_rank(config: RunConfig) -> int:
    """Micro-batches of one mini-batch per DP rank, every sample at its longest (prompt +
    response) packed `micro_batch_max_tokens // longest` to a micro-batch."""
    longest = config.data.max_prompt_length + config.rollout.max_response_length
    per_micro_batch = max(config.training.micro_batch_max_tokens // longest, 1)
    micro_batches = math.ceil(config.training.mini_batch_size / per_micro_batch)
    return max(math.ceil(micro_batches / config.data_parallel_size), 1)


def in_flight_chunks(config: RunConfig) -> int:
    """Forward passes of a model chunk whose activations the first stage holds at once: 1F1B
    warms up with PP - 1 forwards before its first backward (PP in flight); interleaved 1F1B
    with v chunks warms up with 2 (PP - 1) + (v - 1) PP (Megatron-Core
    `get_pp_rank_microbatches`); never more than the micro-batches there are."""
    par = config.parallelism
    p, v = par.pipeline, par.virtual_pipeline or 1
    chunks = micro_batches_per_rank(config) * v
    warmup = p - 1 if v == 1 else 2 * (p - 1) + (v - 1) * p
    return min(warmup + 1, chunks)


# --- the plan ---------------------------------------------------------------------------------


def _stage(config: RunConfig, name: str, first: bool, last: bool, in_flight: int) -> StageMemory:
    model, par, training = config.model, config.parallelism, config.training
    d = DTYPE_BYTES[model.params_dtype]
    dense, expert = stage_parameters(config, first, last)
    state = ADAM_STATE_BYTES + (FP32 if d != FP32 else 0)  # + fp32 master params
    if par.distributed_optimizer:
        world = config.launch.world_size
        expert_dp = world // (par.expert * (par.expert_tensor or par.tensor) * par.pipeline)
        optimizer = state * (dense / config.data_parallel_size + expert / expert_dp)
    else:
        optimizer = state * (dense + expert)
    tokens = training.micro_batch_max_tokens
    chunk_layers = model.num_layers // (par.pipeline * (par.virtual_pipeline or 1))
    passes = in_flight if first else 1
    no_recompute = layer_activation_bytes(config, tokens) * chunk_layers
    kept, transient = recompute_activation_bytes(config, chunk_layers, tokens)
    overhead = micro_batch_overhead_bytes(config, tokens)
    logits = 0.0
    if last:
        t_sp = par.tensor if par.sequence_parallel and par.tensor > 1 else 1
        h = model.hidden_size
        if model.transformer_impl == "local":  # final norm (fp32) + output layer's input
            final = (2 * h * FP32 + h * d) / t_sp + FP32
        else:
            final = 2 * h * d / t_sp + FP32
        final *= tokens
        no_recompute += final
        kept += final
        vocab = model.vocab_size / par.tensor
        chunk = min(training.log_prob_chunk_size, tokens)
        logits = 2 * tokens * vocab * d + LOG_PROB_CHUNK_BUFFERS * chunk * vocab * FP32
    return StageMemory(
        name=name,
        parameters=(dense + expert) * d,
        reference=(dense + expert) * d if config.algorithm.kl_coef > 0 else 0.0,
        gradients=(dense + expert) * FP32,
        optimizer=optimizer,
        activations_no_recompute=passes * (no_recompute + overhead),
        activations=passes * (kept + overhead) + transient,
        logits=logits,
    )


def fleet_memory(config: RunConfig, gpu_gib: float) -> FleetMemory:
    """One fleet server's memory per GPU (see the module doc)."""
    model, rollout = config.model, config.rollout
    d = DTYPE_BYTES[model.params_dtype]
    tp = server_tensor_parallel(rollout.server_args)
    groups = model.num_query_groups or model.num_attention_heads
    kv_heads_per_gpu = max(groups / tp, 1)  # SGLang replicates KV heads when TP > groups
    head = _widths(config)[2]
    fraction = server_memory_fraction(rollout)
    pool = gpu_gib * GIB * fraction if fraction else (gpu_gib - SGLANG_RESERVED_GIB) * GIB
    if rollout.mode == "embedded":
        servers: int | None = rollout.num_servers
    elif config.launch.rollout_nodes:
        servers = config.launch.rollout_nodes
    else:
        servers = len(rollout.server_urls) or None
    return FleetMemory(
        servers=servers,
        tensor_parallel=tp,
        weights_per_gpu=total_parameters(config) * d / tp,
        kv_bytes_per_token=2 * model.num_layers * kv_heads_per_gpu * head * d,
        requests=rollout.max_inflight_per_server,
        tokens_per_request=config.data.max_prompt_length + rollout.max_response_length,
        pool_per_gpu=pool,
    )


def memory_plan(config: RunConfig, gpu_gib: float = 80.0) -> MemoryPlan:
    """Trainer ranks (the first and last pipeline stage) and fleet servers of `config`."""
    in_flight = in_flight_chunks(config)
    if config.parallelism.pipeline == 1:
        stages = (_stage(config, "rank", True, True, in_flight),)
    else:
        stages = (
            _stage(config, "first stage", True, False, in_flight),
            _stage(config, "last stage", False, True, in_flight),
        )
    return MemoryPlan(
        stages=stages,
        fleet=fleet_memory(config, gpu_gib),
        gpu_gib=gpu_gib,
        micro_batch_tokens=config.training.micro_batch_max_tokens,
        in_flight=in_flight,
    )


def _gib(value: float) -> str:
    return f"{value / GIB:9.2f}"


def format_plan(config: RunConfig, plan: MemoryPlan) -> str:
    """The plan as a table (GiB per GPU) with the GPU counts and the verdicts."""
    model, par, launch = config.model, config.parallelism, config.launch
    recompute = config.training.recompute
    etp = par.expert_tensor or par.tensor
    expert_dp = launch.world_size // (par.expert * etp * par.pipeline)
    dtype = model.params_dtype
    lines = [
        f"trainer: {launch.world_size} GPUs = {launch.nnodes} node(s) x {launch.nproc_per_node}; "
        f"TP {par.tensor} x PP {par.pipeline}"
        + (f" (VPP {par.virtual_pipeline})" if par.virtual_pipeline else "")
        + f" x DP {config.data_parallel_size}"
        + (f"; experts EP {par.expert} x ETP {etp}, expert DP {expert_dp}" if model.moe else "")
        + f"; SP {'on' if par.sequence_parallel and par.tensor > 1 else 'off'}; "
        f"{'distributed' if par.distributed_optimizer else 'replicated'} optimizer; "
        f"{model.transformer_impl} layers",
        f"micro-batch {plan.micro_batch_tokens} tokens, {plan.in_flight} in flight on the first "
        f"stage; recompute {recompute.granularity}"
        + (
            f" ({recompute.method}, {recompute.num_layers} layer(s))"
            if recompute.granularity == "full"
            else ""
        ),
        "",
        f"{'GiB per GPU':44s}" + "".join(f"{stage.name:>14s}" for stage in plan.stages),
    ]
    rows = [
        (f"parameters ({dtype})", lambda s: s.parameters),
        ("reference policy (frozen, algorithm.kl_coef > 0)", lambda s: s.reference),
        ("gradients (fp32 main_grad buffers)", lambda s: s.gradients),
        (
            "optimizer (Adam m, v"
            + (" + fp32 master" if DTYPE_BYTES[dtype] != FP32 else "")
            + (", / DP)" if par.distributed_optimizer else ")"),
            lambda s: s.optimizer,
        ),
        ("activations, no recompute", lambda s: s.activations_no_recompute),
        (f"activations, recompute {recompute.granularity}", lambda s: s.activations),
        ("logits [T, V/TP] + grad + log-prob chunks", lambda s: s.logits),
        ("total (configured recompute)", lambda s: s.total),
        (
            f"+ margin ({MARGIN_FIXED_GIB:g} GiB + {MARGIN_FRACTION:.0%})",
            lambda s: s.total + plan.margin(s.total),
        ),
    ]
    for label, value in rows:
        lines.append(f"{label:44s}" + "".join(f"{_gib(value(s)):>14s}" for s in plan.stages))
    worst = plan.worst
    needed = worst.total + plan.margin(worst.total)
    verdict = "fits" if plan.trainer_fits() else "does NOT fit"
    lines += [
        f"trainer {verdict} {plan.gpu_gib:g} GiB GPUs: worst rank ({worst.name}) "
        f"{needed / GIB:.1f} GiB with margin "
        f"(CUDA context + NCCL {MARGIN_FIXED_GIB:g} GiB, fragmentation {MARGIN_FRACTION:.0%})",
        "",
    ]
    fleet = plan.fleet
    servers = "?" if fleet.servers is None else str(fleet.servers)
    gpus = "?" if fleet.servers is None else str(fleet.servers * fleet.tensor_parallel)
    where = (
        f" on {launch.rollout_nodes} rollout node(s) of {launch.nproc_per_node} GPUs"
        if config.rollout.mode == "cluster" and launch.rollout_nodes
        else f" ({config.rollout.mode})"
    )
    lines.append(
        f"fleet: {servers} SGLang server(s) x TP {fleet.tensor_parallel} = {gpus} GPUs{where}"
    )
    if (
        config.rollout.mode == "cluster"
        and launch.rollout_nodes
        and fleet.tensor_parallel < launch.nproc_per_node
    ):
        lines.append(
            f"  one server per rollout node uses {fleet.tensor_parallel} of its "
            f"{launch.nproc_per_node} GPUs: add --tp {launch.nproc_per_node} to "
            "rollout.server_args"
        )
    kv_gib = fleet.kv_needed_per_gpu / GIB
    lines += [
        f"  per GPU: weights {fleet.weights_per_gpu / GIB:.2f} GiB, KV "
        f"{fleet.kv_bytes_per_token / 1024:.0f} KiB/token; {fleet.requests} requests x "
        f"{fleet.tokens_per_request} tokens need KV {kv_gib:.2f} GiB; "
        f"SGLang's pool (weights + KV) {fleet.pool_per_gpu / GIB:.1f} GiB",
        f"  fleet {'fits' if plan.fleet_fits() else 'does NOT fit'}: the KV pool holds "
        f"{fleet.full_requests_held} full-length requests per server "
        f"(rollout.max_inflight_per_server={fleet.requests})",
    ]
    return "\n".join(lines)
