"""A random-weight HF checkpoint of the configured shape, for runs that start from scratch.

No model hub is reachable on the CPU machines, so the embedded demo starts from a policy it
builds itself: `write_random_checkpoint` writes an HF checkpoint (config.json, float32
safetensors and the project's character-level tokenizer from `pipeline.tokenizer`) whose
architecture is `model.random_init` and whose sizes are those of `RunConfig.model`. The trainer
then loads it like any other `model.hf_checkpoint`, and the rollout fleet serves it as version 0.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_dapo.config.hf_architecture import model_fields_from_hf
from megatron_dapo.config.schema import ModelConfig
from pipeline.tokenizer import build_char_tokenizer

_COMPARED_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "vocab_size",
    "max_position_embeddings",
    "tie_embeddings",
    "qk_layernorm",
    "add_qkv_bias",
)


_MOE_FIELD_NAMES = {
    "mixtral": ("num_local_experts", "intermediate_size"),
    "qwen3_moe": ("num_experts", "moe_intermediate_size"),
}
"""HF config keys of (number of experts, expert MLP width) per MoE architecture."""
_MOE_EXTRA_FIELDS = {"mixtral": {"sliding_window": None}, "qwen3_moe": {"norm_topk_prob": True}}


def _hf_config_fields(model: ModelConfig, model_type: str) -> dict:
    """transformers config kwargs for `model_type` with the sizes of `model`."""
    fields = {
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups or model.num_attention_heads,
        "head_dim": model.kv_channels or model.hidden_size // model.num_attention_heads,
        "max_position_embeddings": model.max_position_embeddings,
        "rope_theta": model.rotary_base,
        "rms_norm_eps": model.norm_epsilon,
        "tie_word_embeddings": model.tie_embeddings,
        "torch_dtype": "float32",
    }
    moe = model.moe
    names = _MOE_FIELD_NAMES.get(model_type)
    if (names is None) != (moe is None):
        kind = "an MoE" if names else "a dense"
        raise ValueError(
            f"model.random_init={model_type!r} is {kind} architecture, model.moe is {moe}"
        )
    if names is not None and moe is not None:
        experts, width = names
        fields.update(
            {experts: moe.num_experts, width: moe.ffn_hidden_size or model.ffn_hidden_size},
            num_experts_per_tok=moe.router_topk,
            router_aux_loss_coef=moe.aux_loss_coeff,
            **_MOE_EXTRA_FIELDS[model_type],
        )
    return fields


def write_random_checkpoint(model: ModelConfig, out_dir: str | Path, seed: int) -> Path:
    """Write a seeded random-weight checkpoint of `model.random_init` to `out_dir`; return it.

    Raises:
        ValueError: `model.random_init` is unset, the architecture does not fit `model`, or
            the vocabulary is smaller than the character tokenizer's.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if model.random_init is None:
        raise ValueError("model.random_init must name an architecture to create a checkpoint")
    out = build_char_tokenizer(out_dir)
    tokenizer_size = len(AutoTokenizer.from_pretrained(out))
    if model.vocab_size < tokenizer_size:
        raise ValueError(
            f"model.vocab_size={model.vocab_size} is smaller than the character tokenizer "
            f"({tokenizer_size} tokens)"
        )
    hf_config = AutoConfig.for_model(
        model.random_init, **_hf_config_fields(model, model.random_init)
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    hf_config.eos_token_id, hf_config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    hf_config.bos_token_id = None
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(hf_config).to(torch.float32).save_pretrained(out)
    written = model_fields_from_hf(out)
    expected = {**model.model_dump(), "num_query_groups": hf_config.num_key_value_heads}
    mismatched = {f for f in _COMPARED_FIELDS if written[f] != expected[f]}
    if mismatched:
        raise ValueError(f"the written checkpoint differs from model.* in {sorted(mismatched)}")
    return out


def ensure_initial_checkpoint(model: ModelConfig, seed: int) -> Path:
    """`model.hf_checkpoint`, first written by `write_random_checkpoint` (with `seed`) when it
    holds no `config.json` yet and `model.random_init` names an architecture. Not collective:
    one process calls it (the trainer's rank 0, or `launch/initial_model.py` before a fleet).

    Raises:
        ValueError: `model.hf_checkpoint` is unset.
        FileNotFoundError: the checkpoint is missing and `model.random_init` is unset.
    """
    if model.hf_checkpoint is None:
        raise ValueError("model.hf_checkpoint must name the HF checkpoint the policy starts from")
    path = Path(model.hf_checkpoint)
    if (path / "config.json").is_file():
        return path
    if model.random_init is None:
        raise FileNotFoundError(
            f"model.hf_checkpoint={path} has no config.json (set model.random_init to start "
            "from a random policy)"
        )
    return write_random_checkpoint(model, path, seed)
