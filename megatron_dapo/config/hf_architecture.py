"""The architecture of an HF checkpoint, read from its `config.json` as `RunConfig.model` fields.

`model_fields_from_hf(dir)` maps the HF config of a supported `model_type` to the `ModelConfig`
fields that describe the network (layers, widths, heads, vocabulary, RoPE base, norm epsilon,
biases, qk-norm, tied embeddings, experts), and refuses options that have no Megatron-Core
equivalent here. The run config takes the architecture from it whenever `model.hf_checkpoint`
holds a `config.json` (`schema.ModelConfig`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")
"""HF `model_type`s with a Megatron-Core mapping (`megatron_dapo.hf.mappings`)."""


def _rope_theta(hf: dict[str, Any]) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (only plain RoPE)")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"unsupported HF config: {message}")


def model_fields_from_hf(checkpoint_dir: str | Path) -> dict[str, Any]:
    """`RunConfig.model` fields (a `ModelConfig` dict) from an HF checkpoint's `config.json`.

    Raises:
        ValueError: the architecture or one of its options has no Megatron-Core equivalent here
            (sliding windows, RoPE scaling, non-SiLU MLPs, biased MLP/output projections,
            dense layers inside an MoE model, un-normalised top-k routing).
    """
    hf = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported HF model_type {model_type!r}; {SUPPORTED_MODEL_TYPES}")
    _require(hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')}")
    _require(not hf.get("use_sliding_window", False), "use_sliding_window")
    _require(model_type == "qwen2" or not hf.get("attention_bias", False), "attention_bias")
    _require(not hf.get("mlp_bias", False), "mlp_bias")
    heads = hf["num_attention_heads"]
    fields: dict[str, Any] = {
        "hf_checkpoint": str(checkpoint_dir),
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "kv_channels": hf.get("head_dim") or hf["hidden_size"] // heads,
        "vocab_size": hf["vocab_size"],
        "max_position_embeddings": hf["max_position_embeddings"],
        "rotary_base": _rope_theta(hf),
        "norm_epsilon": hf["rms_norm_eps"],
        "add_qkv_bias": model_type == "qwen2",
        "qk_layernorm": model_type in ("qwen3", "qwen3_moe"),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
    if model_type == "qwen3_moe":
        _require(hf.get("decoder_sparse_step", 1) == 1, "decoder_sparse_step != 1")
        _require(not hf.get("mlp_only_layers"), "mlp_only_layers (dense layers in an MoE)")
        _require(hf.get("norm_topk_prob", True), "norm_topk_prob=false")
        fields["moe"] = {
            "num_experts": hf.get("num_experts") or hf["num_local_experts"],  # 4.x / 5.x name
            "router_topk": hf["num_experts_per_tok"],
            "ffn_hidden_size": hf["moe_intermediate_size"],
            "aux_loss_coeff": hf.get("router_aux_loss_coef", 1e-3),
        }
    elif model_type == "mixtral":
        _require(hf.get("sliding_window") is None, "sliding_window")
        fields["moe"] = {  # every layer is MoE: intermediate_size is the expert width
            "num_experts": hf["num_local_experts"],
            "router_topk": hf["num_experts_per_tok"],
            "ffn_hidden_size": hf["intermediate_size"],
            "aux_loss_coeff": hf.get("router_aux_loss_coef", 1e-3),
        }
    return fields


_EXPERT_ARCHITECTURE = ("num_experts", "router_topk", "ffn_hidden_size")
"""`model.moe` fields a checkpoint fixes; its other MoE fields are training choices."""


def merge_architecture(
    configured: dict[str, Any], checkpoint: dict[str, Any], source: str
) -> dict[str, Any]:
    """The run config's `model` section completed with a checkpoint's architecture.

    A field the run config leaves unset (absent or null) takes the checkpoint's value; a field
    set to the same value is kept; the MoE training choices (aux loss weight, dispatcher, ...)
    stay the run config's when set.

    Args:
        configured: the `model` section as written (a dict of `ModelConfig` fields).
        checkpoint: `model_fields_from_hf` of the checkpoint.
        source: where `checkpoint` was read, for messages (its `config.json`).

    Raises:
        ValueError: fields set in the run config that differ from the checkpoint, each named
            with both values.
    """
    merged = dict(configured)
    conflicts = []

    def take(key: str, ours: dict[str, Any], theirs: dict[str, Any], prefix: str, fixed: bool):
        if ours.get(key) is None:
            ours[key] = theirs[key]
        elif fixed and ours[key] != theirs[key]:
            conflicts.append(
                f"{prefix}{key} is {ours[key]!r} in the run config but {theirs[key]!r}"
            )

    for key in checkpoint:
        if key == "hf_checkpoint":
            continue
        if key == "moe" and isinstance(merged.get("moe"), dict):
            merged["moe"] = moe = dict(merged["moe"])
            for moe_key in checkpoint["moe"]:
                fixed = moe_key in _EXPERT_ARCHITECTURE
                take(moe_key, moe, checkpoint["moe"], "moe.", fixed)
        else:
            take(key, merged, checkpoint, "", fixed=True)
    if configured.get("moe") is not None and "moe" not in checkpoint:
        conflicts.append("moe is set in the run config but the checkpoint is dense")
    if conflicts:
        raise ValueError(f"the architecture differs from {source}: " + "; ".join(conflicts))
    return merged
