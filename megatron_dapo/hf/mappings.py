"""Hugging Face <-> Megatron-Core `GPTModel` (local spec) parameter names, per architecture.

Supported `model_type`s: `llama`, `qwen2`, `qwen3`, `qwen3_moe`, `mixtral`, in their on-disk
safetensors layout (transformers 5.x fuses MoE experts in memory, `experts.gate_up_proj`, but
`save_pretrained` writes per-expert tensors, which is also what SGLang loads):

    Megatron-Core (global layer L, global expert E)   HF                              rule
    embedding.word_embeddings.weight                  model.embed_tokens.weight       copy
    decoder.layers.L.input_layernorm.weight           model.layers.L.input_layernorm  copy
    decoder.layers.L.self_attention.linear_qkv.*      self_attn.{q,k,v}_proj.*        qkv
    decoder.layers.L.self_attention.linear_proj       self_attn.o_proj                copy
    decoder.layers.L.self_attention.{q,k}_layernorm   self_attn.{q,k}_norm            copy
    decoder.layers.L.pre_mlp_layernorm.weight         post_attention_layernorm        copy
    decoder.layers.L.mlp.linear_fc1.weight            mlp.{gate,up}_proj              gate_up
    decoder.layers.L.mlp.linear_fc2.weight            mlp.down_proj                   copy
    decoder.layers.L.mlp.router.weight                {mlp,block_sparse_moe}.gate     copy
    ...mlp.experts.local_experts.E.linear_fc1.weight  experts.E.{gate,up} (w1, w3)    gate_up
    ...mlp.experts.local_experts.E.linear_fc2.weight  experts.E.down (w2)             copy
    decoder.final_layernorm.weight                    model.norm.weight               copy
    output_layer.weight                               lm_head.weight (tied: embed)    copy

`qkv`: Megatron's fused QKV rows are ordered per query group `g`: the group's query heads, then
its key head, then its value head (so a TP shard is a contiguous run of groups). `gate_up`:
`linear_fc1` is `[gate; up]` (SwiGLU), and a TP shard is `[gate shard; up shard]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from megatron_dapo.config.hf_architecture import SUPPORTED_MODEL_TYPES


@dataclass(frozen=True)
class MoENames:
    """Where an architecture keeps its router and experts, relative to `model.layers.L.`."""

    block: str
    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class Rule:
    """How one Megatron tensor is made of HF tensors (`hf` are templates in `layer`/`expert`)."""

    kind: Literal["copy", "qkv", "gate_up"]
    hf: tuple[str, ...]


_MOE_NAMES = {
    "qwen3_moe": MoENames("mlp", "gate_proj", "up_proj", "down_proj"),
    "mixtral": MoENames("block_sparse_moe", "w1", "w3", "w2"),
}


def weight_rules(model_type: str, tied: bool) -> dict[str, Rule]:
    """Megatron global-name template -> `Rule` for `model_type`.

    Templates use `{layer}` (global layer index) and `{expert}` (global expert index).
    With `tied` embeddings the output layer (a last-stage copy under PP) reads the embedding.
    """
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported HF model_type {model_type!r}; {SUPPORTED_MODEL_TYPES}")
    hf_layer, layer = "model.layers.{layer}.", "decoder.layers.{layer}."
    attn = hf_layer + "self_attn."
    embed = "model.embed_tokens.weight"
    rules = {
        "embedding.word_embeddings.weight": Rule("copy", (embed,)),
        "decoder.final_layernorm.weight": Rule("copy", ("model.norm.weight",)),
        "output_layer.weight": Rule("copy", (embed if tied else "lm_head.weight",)),
        layer + "input_layernorm.weight": Rule("copy", (hf_layer + "input_layernorm.weight",)),
        layer + "pre_mlp_layernorm.weight": Rule(
            "copy", (hf_layer + "post_attention_layernorm.weight",)
        ),
        layer + "self_attention.linear_proj.weight": Rule("copy", (attn + "o_proj.weight",)),
        layer + "self_attention.q_layernorm.weight": Rule("copy", (attn + "q_norm.weight",)),
        layer + "self_attention.k_layernorm.weight": Rule("copy", (attn + "k_norm.weight",)),
    }
    for kind in ("weight", "bias"):
        rules[layer + f"self_attention.linear_qkv.{kind}"] = Rule(
            "qkv", tuple(f"{attn}{p}_proj.{kind}" for p in "qkv")
        )
    moe = _MOE_NAMES.get(model_type)
    if moe is None:
        mlp = hf_layer + "mlp."
        rules[layer + "mlp.linear_fc1.weight"] = Rule(
            "gate_up", (mlp + "gate_proj.weight", mlp + "up_proj.weight")
        )
        rules[layer + "mlp.linear_fc2.weight"] = Rule("copy", (mlp + "down_proj.weight",))
        return rules
    block = f"{hf_layer}{moe.block}."
    expert, hf_expert = layer + "mlp.experts.local_experts.{expert}.", block + "experts.{expert}."
    rules[layer + "mlp.router.weight"] = Rule("copy", (block + "gate.weight",))
    rules[expert + "linear_fc1.weight"] = Rule(
        "gate_up", (f"{hf_expert}{moe.gate}.weight", f"{hf_expert}{moe.up}.weight")
    )
    rules[expert + "linear_fc2.weight"] = Rule("copy", (f"{hf_expert}{moe.down}.weight",))
    return rules


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
