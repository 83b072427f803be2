"""Load HF-format weights into a sharded Megatron-Core `GPTModel`, and export it back to HF.

`load_hf_checkpoint(chunks, dir)` runs on every rank: each rank reads only the tensors of the
layers (PP / virtual stages) and experts (EP) it owns from `config.json` + `*.safetensors`, builds
the full Megatron tensor (`hf_mappings.to_megatron`) and copies its TP / expert-TP shard into the
parameter. `export_hf_checkpoint(chunks, out_dir, source_dir)` is collective: every parameter is
all-gathered over its TP group, converted back (`hf_mappings.to_hf`), gathered on global rank 0,
which writes `model.safetensors` (per-expert on-disk layout that transformers 5.x and SGLang
load) plus `config.json`, the generation config and the tokenizer files of `source_dir`.

Names follow the chunk's `TransformerConfig` (`chunk_rules`: Megatron-Core's local or
Transformer Engine spec, SequentialMLP or grouped-GEMM experts); the split dimension of a sharded
tensor comes from its `Rule` (Transformer Engine marks every grouped expert weight as split along
dim 0, also the row-parallel `linear_fc2`), layer numbers from `TransformerLayer.layer_number` and
global expert ids from the expert-parallel rank.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_dapo.hf.mappings import (
    AttentionShape,
    Rule,
    name_template,
    shard,
    to_hf,
    to_megatron,
    unshard,
    weight_rules,
)

HF_SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


class _SafetensorsReader:
    """Tensor name -> file of an HF checkpoint directory (sharded or not), read lazily."""

    def __init__(self, directory: Path):
        self._files: dict[str, Path] = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(path, framework="pt") as f:
                self._files.update(dict.fromkeys(f.keys(), path))
        if not self._files:
            raise FileNotFoundError(f"no *.safetensors in {directory}")

    def get(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise KeyError(f"HF checkpoint has no tensor {name!r}")
        with safe_open(self._files[name], framework="pt") as f:
            return f.get_tensor(name)


class _ShardGroup:
    """The (tensor or expert-tensor) parallel group a parameter is split over."""

    def __init__(self, expert: bool):
        from megatron.core import parallel_state as ps

        if expert:
            self.group = ps.get_expert_tensor_parallel_group(check_initialized=False)
            self.rank = ps.get_expert_tensor_parallel_rank()
            self.size = ps.get_expert_tensor_parallel_world_size()
        else:
            self.group = ps.get_tensor_model_parallel_group(check_initialized=False)
            self.rank = ps.get_tensor_model_parallel_rank()
            self.size = ps.get_tensor_model_parallel_world_size()


def _unshard(param: torch.Tensor, rule: Rule, group: _ShardGroup) -> torch.Tensor:
    """The full tensor from every rank's shard (collective over the parameter's group)."""
    local = param.detach()
    if rule.split is None or group.size == 1:
        return local
    shards = [torch.empty_like(local) for _ in range(group.size)]
    dist.all_gather(shards, local.contiguous(), group=group.group)
    return unshard(shards, rule)


def _global_parameters(chunk: torch.nn.Module) -> Iterator[tuple[str, str, int, int, torch.Tensor]]:
    """(template, global name, layer, expert, parameter) for every parameter of a GPTModel chunk.

    The template replaces the global layer index by `{layer}` and the expert id by `{expert}`.
    """
    from megatron.core import parallel_state as ps

    layers = chunk.decoder.layers if hasattr(chunk, "decoder") else []
    ep_rank = ps.get_expert_model_parallel_rank()
    for name, param in chunk.named_parameters():
        template, layer, expert = name_template(name)
        if layer >= 0:
            local_layer = layers[layer]
            layer = local_layer.layer_number - 1
            if expert >= 0:
                expert += ep_rank * local_layer.mlp.experts.num_local_experts
        yield template, name, layer, expert, param


def _attention_shape(chunk: torch.nn.Module) -> AttentionShape:
    config = chunk.config
    return AttentionShape(
        heads=config.num_attention_heads,
        groups=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels,
    )


def _hf_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def chunk_rules(chunk: torch.nn.Module, model_type: str) -> dict[str, Rule]:
    """`weight_rules` of a `GPTModel` chunk, for the layer implementation and grouped GEMM its
    `TransformerConfig` was built with (`model.transformer_impl`, `model.moe.grouped_gemm`)."""
    config = chunk.config
    return weight_rules(
        model_type,
        chunk.share_embeddings_and_output_weights,
        config.transformer_impl,
        config.moe_grouped_gemm,
    )


def _rule(rules: dict[str, Rule], template: str) -> Rule:
    if template not in rules:
        raise KeyError(f"no HF mapping for Megatron parameter {template!r}")
    return rules[template]


@torch.no_grad()
def load_hf_checkpoint(chunks: list[torch.nn.Module], checkpoint_dir: str | Path) -> None:
    """Copy this rank's shards of an HF checkpoint into the `GPTModel` chunks, in place.

    Call it on the unwrapped chunks (no DDP / Float16Module prefix) before building the
    optimizer, whose main (fp32) parameters are copied from the model parameters.

    Args:
        chunks: this rank's model chunks (one per virtual pipeline stage), unwrapped.
        checkpoint_dir: directory with `config.json` and `*.safetensors`.
    Raises:
        KeyError: a parameter has no mapping, or the checkpoint lacks one of its tensors.
        ValueError: a tensor's shape does not match the model.
    """
    directory = Path(checkpoint_dir)
    hf_config, reader = _hf_config(directory), _SafetensorsReader(directory)
    for chunk in chunks:
        rules, shape = chunk_rules(chunk, hf_config["model_type"]), _attention_shape(chunk)
        for template, name, layer, expert, param in _global_parameters(chunk):
            rule = _rule(rules, template)
            hf = [reader.get(n.format(layer=layer, expert=expert)) for n in rule.hf]
            full = to_megatron(rule, hf, shape)
            group = _ShardGroup(expert >= 0)
            local = shard(full, rule, group.rank, group.size)
            if local.shape != param.shape:
                raise ValueError(f"{name}: HF gives {tuple(local.shape)}, model has {param.shape}")
            param.copy_(local)


@torch.no_grad()
def gather_hf_state_dict(chunks: list[torch.nn.Module], model_type: str) -> dict[str, torch.Tensor]:
    """The full HF state dict on global rank 0 (empty dict elsewhere). Collective.

    Every parameter is all-gathered over its TP / expert-TP group; the first rank of that group
    contributes it; global rank 0 collects all contributions (covering every PP stage and EP
    rank, duplicates from data-parallel replicas are dropped).
    """
    local: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        rules, shape = chunk_rules(chunk, model_type), _attention_shape(chunk)
        for template, _, layer, expert, param in _global_parameters(chunk):
            if chunk.share_embeddings_and_output_weights and template == "output_layer.weight":
                continue  # tied: HF stores the embedding only
            rule, group = _rule(rules, template), _ShardGroup(expert >= 0)
            full = _unshard(param, rule, group)
            if group.rank == 0:
                tensors = to_hf(rule, full, shape)
                for hf_name, tensor in zip(rule.hf, tensors, strict=True):
                    local[hf_name.format(layer=layer, expert=expert)] = tensor.clone()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    if dist.get_rank() != 0:
        return {}
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        for hf_name, tensor in part.items():
            merged.setdefault(hf_name, tensor)
    return merged


def gather_hf_weights(
    chunks: list[torch.nn.Module], source_dir: str | Path
) -> dict[str, torch.Tensor]:
    """`gather_hf_state_dict` of the architecture in `source_dir`'s `config.json`. Collective."""
    return gather_hf_state_dict(chunks, _hf_config(Path(source_dir))["model_type"])


def export_hf_checkpoint(
    chunks: list[torch.nn.Module], out_dir: str | Path, source_dir: str | Path
) -> None:
    """Write the model as an HF checkpoint in `out_dir` (collective; global rank 0 writes).

    Args:
        chunks: this rank's model chunks.
        out_dir: created if missing; receives `model.safetensors`, `config.json` and the
            tokenizer / generation files found in `source_dir`.
        source_dir: the HF checkpoint the model was built from (its `config.json` describes
            the architecture).
    """
    source = Path(source_dir)
    state = gather_hf_weights(chunks, source)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", {"format": "pt"}
    )
    for name in ("config.json", *HF_SIDE_FILES):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
