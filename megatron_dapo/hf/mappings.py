"""Hugging Face <-> Megatron-Core `GPTModel` parameter names and layouts, per architecture.

Supported `model_type`s: `llama`, `qwen2`, `qwen3`, `qwen3_moe`, `mixtral`, in their on-disk
safetensors layout (transformers 5.x fuses MoE experts in memory, `experts.gate_up_proj`, but
`save_pretrained` writes per-expert tensors, which is also what SGLang loads). Names of
Megatron-Core's local layer spec (global layer L, global expert E):

    Megatron-Core (local spec)                        HF                              rule    split
    embedding.word_embeddings.weight                  model.embed_tokens.weight       copy    0
    decoder.layers.L.input_layernorm.weight           model.layers.L.input_layernorm  copy    -
    decoder.layers.L.self_attention.linear_qkv.*      self_attn.{q,k,v}_proj.*        qkv     0
    decoder.layers.L.self_attention.linear_proj       self_attn.o_proj                copy    1
    decoder.layers.L.self_attention.{q,k}_layernorm   self_attn.{q,k}_norm            copy    -
    decoder.layers.L.pre_mlp_layernorm.weight         post_attention_layernorm        copy    -
    decoder.layers.L.mlp.linear_fc1.weight            mlp.{gate,up}_proj              gate_up 0
    decoder.layers.L.mlp.linear_fc2.weight            mlp.down_proj                   copy    1
    decoder.layers.L.mlp.router.weight                {mlp,block_sparse_moe}.gate     copy    -
    ...mlp.experts.local_experts.E.linear_fc1.weight  experts.E.{gate,up} (w1, w3)    gate_up 0
    ...mlp.experts.local_experts.E.linear_fc2.weight  experts.E.down (w2)             copy    1
    decoder.final_layernorm.weight                    model.norm.weight               copy    -
    output_layer.weight                               lm_head.weight (tied: embed)    copy    0

The Transformer Engine spec (`model.transformer_impl: transformer_engine`,
`gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec`) renames a few of them
(`_TE_RENAMES`): the input norm is fused into `linear_qkv` (`TELayerNormColumnParallelLinear`,
`input_layernorm` is an identity), and so is a dense MLP's pre-norm into `linear_fc1` (an MoE
layer keeps `pre_mlp_layernorm` as a `TENorm`); grouped-GEMM experts (`moe.grouped_gemm`,
`TEGroupedMLP`) hold expert i of the rank as `mlp.experts.linear_fc{1,2}.weight{i}` of TE's
`GroupedLinear`. The layouts and splits of the renamed tensors are those of the local ones.

`qkv`: Megatron's fused QKV rows are ordered per query group `g`: the group's query heads, then
its key head, then its value head (so a TP shard is a contiguous run of groups). `gate_up`:
`linear_fc1` is `[gate; up]` (SwiGLU), and a TP shard is `[gate shard; up shard]`. `split`: the
dimension a tensor is split along over tensor-parallel ranks (expert-tensor-parallel for
experts), as in Megatron-Core's `sharded_state_dict` axis maps; `-` = every rank holds it all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_dapo.config.hf_architecture import SUPPORTED_MODEL_TYPES

TransformerImpl = Literal["local", "transformer_engine"]


@dataclass(frozen=True)
class MoENames:
    """Where an architecture keeps its router and experts, relative to `model.layers.L.`."""

    block: str
    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class Rule:
    """How one Megatron tensor is made of HF tensors (`hf` are templates in `layer`/`expert`),
    and the dimension it is split along over tensor-parallel ranks, expert-tensor-parallel ones
    for experts (`split`; None: every rank holds the whole tensor)."""

    kind: Literal["copy", "qkv", "gate_up"]
    hf: tuple[str, ...]
    split: int | None = None


_MOE_NAMES = {
    "qwen3_moe": MoENames("mlp", "gate_proj", "up_proj", "down_proj"),
    "mixtral": MoENames("block_sparse_moe", "w1", "w3", "w2"),
}
_LAYER, _EXPERT = "decoder.layers.{layer}.", "mlp.experts.local_experts.{expert}."
_TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",  # dense MLPs only
}
"""Local-spec name -> Transformer Engine spec name, relative to `decoder.layers.{layer}.`."""
_GROUPED_RENAMES = {
    _EXPERT + "linear_fc1.weight": "mlp.experts.linear_fc1.weight{expert}",
    _EXPERT + "linear_fc2.weight": "mlp.experts.linear_fc2.weight{expert}",
}
"""SequentialMLP expert name -> TEGroupedMLP name (one GroupedLinear GEMM per local expert)."""
_LAYER_INDEX = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT_INDEX = re.compile(
    r"(?<=\.local_experts\.)\d+(?=\.)|(?<=\.experts\.linear_fc[12]\.weight)\d+$"
)


def weight_rules(
    model_type: str,
    tied: bool,
    transformer_impl: TransformerImpl = "local",
    grouped_gemm: bool = False,
) -> dict[str, Rule]:
    """Megatron global-name template -> `Rule` for `model_type` and the layer spec.

    Templates use `{layer}` (global layer index) and `{expert}` (global expert index).
    With `tied` embeddings the output layer (a last-stage copy under PP) reads the embedding.
    `transformer_impl` and `grouped_gemm` (MoE only) are `model.transformer_impl` and
    `model.moe.grouped_gemm`: they select the names of `_TE_RENAMES` / `_GROUPED_RENAMES`.

    Raises:
        ValueError: unsupported `model_type`, or grouped GEMM with the local spec (Megatron-Core's
            legacy `GroupedMLP`, which stacks all local experts in one transposed tensor).
    """
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported HF model_type {model_type!r}; {SUPPORTED_MODEL_TYPES}")
    moe = _MOE_NAMES.get(model_type)
    grouped = grouped_gemm and moe is not None
    if grouped and transformer_impl == "local":
        raise ValueError("grouped-GEMM experts have HF mappings with transformer_engine only")
    rules = _local_rules(model_type, tied)
    renames: dict[str, str] = {}
    if transformer_impl == "transformer_engine":
        renames.update(_TE_RENAMES)
        if moe is not None:
            del renames["pre_mlp_layernorm.weight"]
    if grouped:
        renames.update(_GROUPED_RENAMES)
    renamed = {_LAYER + old: _LAYER + new for old, new in renames.items()}
    return {renamed.get(name, name): rule for name, rule in rules.items()}


def _local_rules(model_type: str, tied: bool) -> dict[str, Rule]:
    """`weight_rules` of Megatron-Core's local layer spec."""
    hf_layer, layer = "model.layers.{layer}.", _LAYER
    attn = hf_layer + "self_attn."
    embed = "model.embed_tokens.weight"
    column, row = 0, 1
    rules = {
        "embedding.word_embeddings.weight": Rule("copy", (embed,), column),
        "decoder.final_layernorm.weight": Rule("copy", ("model.norm.weight",)),
        "output_layer.weight": Rule("copy", (embed if tied else "lm_head.weight",), column),
        layer + "input_layernorm.weight": Rule("copy", (hf_layer + "input_layernorm.weight",)),
        layer + "pre_mlp_layernorm.weight": Rule(
            "copy", (hf_layer + "post_attention_layernorm.weight",)
        ),
        layer + "self_attention.linear_proj.weight": Rule("copy", (attn + "o_proj.weight",), row),
        layer + "self_attention.q_layernorm.weight": Rule("copy", (attn + "q_norm.weight",)),
        layer + "self_attention.k_layernorm.weight": Rule("copy", (attn + "k_norm.weight",)),
    }
    for kind in ("weight", "bias"):
        rules[layer + f"self_attention.linear_qkv.{kind}"] = Rule(
            "qkv", tuple(f"{attn}{p}_proj.{kind}" for p in "qkv"), column
        )
    moe = _MOE_NAMES.get(model_type)
    if moe is None:
        mlp = hf_layer + "mlp."
        rules[layer + "mlp.linear_fc1.weight"] = Rule(
            "gate_up", (mlp + "gate_proj.weight", mlp + "up_proj.weight"), column
        )
        rules[layer + "mlp.linear_fc2.weight"] = Rule("copy", (mlp + "down_proj.weight",), row)
        return rules
    block = f"{hf_layer}{moe.block}."
    expert, hf_expert = layer + _EXPERT, block + "experts.{expert}."
    rules[layer + "mlp.router.weight"] = Rule("copy", (block + "gate.weight",))
    rules[expert + "linear_fc1.weight"] = Rule(
        "gate_up", (f"{hf_expert}{moe.gate}.weight", f"{hf_expert}{moe.up}.weight"), column
    )
    rules[expert + "linear_fc2.weight"] = Rule("copy", (f"{hf_expert}{moe.down}.weight",), row)
    return rules


def name_template(name: str) -> tuple[str, int, int]:
    """(template, layer, expert) of a model chunk's parameter name: the template has `{layer}` and
    `{expert}` where the name has the chunk's layer index and the rank's local expert index
    (-1: none), e.g. `decoder.layers.3.mlp.experts.linear_fc2.weight5` ->
    (`decoder.layers.{layer}.mlp.experts.linear_fc2.weight{expert}`, 3, 5)."""
    layer = expert = -1
    if match := _LAYER_INDEX.match(name):
        layer, name = int(match[1]), _LAYER + name[match.end() :]
    if match := _EXPERT_INDEX.search(name):
        expert, name = int(match[0]), f"{name[: match.start()]}{{expert}}{name[match.end() :]}"
    return name, layer, expert


def shard(full: torch.Tensor, rule: Rule, rank: int, size: int) -> torch.Tensor:
    """Tensor-parallel rank `rank`'s slice (of `size` ranks) of the full Megatron tensor `full`:
    `full.shape[rule.split] / size` long along `rule.split`, the rest unchanged; gate and up are
    split separately and concatenated (`[gate shard; up shard]`)."""
    if rule.split is None or size == 1:
        return full
    if rule.kind == "gate_up":
        return torch.cat([half.chunk(size, dim=rule.split)[rank] for half in full.chunk(2)])
    return full.chunk(size, dim=rule.split)[rank]


def unshard(shards: list[torch.Tensor], rule: Rule) -> torch.Tensor:
    """Inverse of `shard`: the full tensor from every rank's slice (`shards`, in rank order)."""
    if rule.split is None or len(shards) == 1:
        return shards[0]
    if rule.kind == "gate_up":
        halves = [s.chunk(2) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(shards, dim=rule.split)


@dataclass(frozen=True)
class AttentionShape:
    """Heads of the fused QKV layout: query heads, key/value groups, per-head size."""

    heads: int
    groups: int
    head_dim: int


def to_megatron(rule: Rule, tensors: list[torch.Tensor], shape: AttentionShape) -> torch.Tensor:
    """The full (unsharded) Megatron tensor from the rule's HF tensors (in `rule.hf` order)."""
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "gate_up":
        return torch.cat(tensors, dim=0)
    q, k, v = tensors
    rest = q.shape[1:]
    per_group = shape.heads // shape.groups * shape.head_dim
    grouped = (
        q.reshape(shape.groups, per_group, *rest),
        k.reshape(shape.groups, shape.head_dim, *rest),
        v.reshape(shape.groups, shape.head_dim, *rest),
    )
    return torch.cat(grouped, dim=1).reshape(-1, *rest)


def to_hf(rule: Rule, full: torch.Tensor, shape: AttentionShape) -> list[torch.Tensor]:
    """Inverse of `to_megatron`: the rule's HF tensors from the full Megatron tensor."""
    if rule.kind == "copy":
        return [full]
    if rule.kind == "gate_up":
        return list(full.chunk(2, dim=0))
    rest = full.shape[1:]
    per_group = shape.heads // shape.groups * shape.head_dim
    grouped = full.reshape(shape.groups, per_group + 2 * shape.head_dim, *rest)
    parts = grouped.split([per_group, shape.head_dim, shape.head_dim], dim=1)
    return [p.reshape(-1, *rest).contiguous() for p in parts]
