"""Load HF-format weights into a sharded Megatron-Core `GPTModel`, and export it back to HF.

`load_hf_checkpoint(chunks, dir)` runs on every rank: each rank reads only the tensors of the
layers (PP / virtual stages) and experts (EP) it owns from `config.json` + `*.safetensors`, builds
the full Megatron tensor (`hf_mappings.to_megatron`) and copies its TP / expert-TP shard into the
parameter. `hf_weight_buckets(chunks, model_type, bucket_bytes)` is the way back, run by every
rank: each pipeline stage's sender (`SyncRole`) receives its stage's parameters unsharded over
their TP / expert-TP group, experts gathered across the expert-parallel group, converted to HF
names and layouts (`hf_mappings.to_hf`, per-expert on-disk layout that transformers 5.x and
SGLang load) and packed in buckets (`pipeline.weight_sync`), one parameter at a time; nothing
is gathered on global rank 0. `stream_weights` hands them to the data plane,
`export_hf_checkpoint` writes them as a sharded HF checkpoint with the config, generation and
tokenizer files of the source checkpoint.

Names follow the chunk's `TransformerConfig` (`chunk_rules`: Megatron-Core's local or
Transformer Engine spec, SequentialMLP or grouped-GEMM experts); the split dimension of a sharded
tensor comes from its `Rule` (Transformer Engine marks every grouped expert weight as split along
dim 0, also the row-parallel `linear_fc2`), layer numbers from `TransformerLayer.layer_number` and
global expert ids from the expert-parallel rank.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

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
from pipeline.config import DEFAULT_BUCKET_MB
from pipeline.weight_sync import (
    WeightBucket,
    WeightSender,
    finish_hf_checkpoint,
    pack_buckets,
    shard_file_name,
    write_safetensors,
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

    def names(self) -> list[str]:
        return sorted(self._files)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise KeyError(f"HF checkpoint has no tensor {name!r}")
        with safe_open(self._files[name], framework="pt") as f:
            return f.get_tensor(name)


def hf_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the HF checkpoint in `directory`, whatever its sharding (a single
    `model.safetensors` or the shards `export_hf_checkpoint` and the disk weight sync write)."""
    reader = _SafetensorsReader(Path(directory))
    return {name: reader.get(name) for name in reader.names()}


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


def hf_model_type(source_dir: str | Path) -> str:
    """The `model_type` of the HF checkpoint in `source_dir` (its `config.json`)."""
    return _hf_config(Path(source_dir))["model_type"]


@dataclass(frozen=True)
class SyncRole:
    """What this rank does in streaming its pipeline stage's weights (`hf_weight_buckets`).

    Attributes:
        stage: the pipeline stage.
        sender: the stage's rank of tensor, data, expert and expert-tensor rank 0: it receives
            the stage's buckets.
        dense: data-parallel rank 0: unshards the stage's dense parameters with its TP group.
        expert: expert-data-parallel rank 0: unshards the stage's experts with its expert-TP
            group, and (expert-TP rank 0) gathers them across its expert-parallel group.
    """

    stage: int
    sender: bool
    dense: bool
    expert: bool

    @classmethod
    def of_rank(cls) -> SyncRole:
        from megatron.core import parallel_state as ps

        dense = ps.get_data_parallel_rank(with_context_parallel=True) == 0
        expert = ps.get_expert_data_parallel_rank() == 0
        sender = (
            dense
            and expert
            and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_expert_model_parallel_rank() == 0
            and ps.get_expert_tensor_parallel_rank() == 0
        )
        return cls(ps.get_pipeline_model_parallel_rank(), sender, dense, expert)


def _gather_experts(full: torch.Tensor) -> list[torch.Tensor]:
    """[EP] every expert-parallel rank's `full` (one local expert's tensor) on EP rank 0, in EP
    rank order; [] on the other ranks. Collective over the expert-parallel group."""
    from megatron.core import parallel_state as ps

    size = ps.get_expert_model_parallel_world_size()
    if size == 1:
        return [full]
    group = ps.get_expert_model_parallel_group()
    root = ps.get_expert_model_parallel_rank() == 0
    gathered = [torch.empty_like(full) for _ in range(size)] if root else None
    dist.gather(full.contiguous(), gathered, group_dst=0, group=group)
    return gathered or []


def _stage_hf_tensors(
    chunks: list[torch.nn.Module], model_type: str, role: SyncRole
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every parameter of this rank's pipeline stage, yielded on the
    stage's sender (nothing elsewhere), one parameter's tensors at a time. Collective over the
    TP, expert-TP and expert-parallel groups as `role` says; the tied output layer is skipped
    (HF stores the embedding only)."""
    from megatron.core import parallel_state as ps

    ep_size = ps.get_expert_model_parallel_world_size()
    for chunk in chunks:
        rules, shape = chunk_rules(chunk, model_type), _attention_shape(chunk)
        local_experts = (chunk.config.num_moe_experts or 0) // ep_size
        for template, _, layer, expert, param in _global_parameters(chunk):
            if chunk.share_embeddings_and_output_weights and template == "output_layer.weight":
                continue
            if not (role.expert if expert >= 0 else role.dense):
                continue
            rule = _rule(rules, template)
            copies = _sender_copies(param, rule, expert >= 0, role)
            for ep_rank in range(len(copies)):  # the sender's EP rank is 0
                ids = {"layer": layer, "expert": expert + ep_rank * local_experts}
                tensors = to_hf(rule, copies[ep_rank], shape)
                yield from zip([n.format(**ids) for n in rule.hf], tensors, strict=True)
                del tensors
            del copies  # freed before the next parameter is gathered


def _sender_copies(
    param: torch.Tensor, rule: Rule, expert: bool, role: SyncRole
) -> list[torch.Tensor]:
    """The full (TP / expert-TP unsharded) tensor of `param` on the stage's sender: [1] for a
    dense parameter, [EP] for an expert's (every expert-parallel rank's, in rank order); []
    elsewhere. Collective over the parameter's groups."""
    group = _ShardGroup(expert)
    full = _unshard(param, rule, group)
    if not expert:
        return [full] if role.sender else []
    return _gather_experts(full) if group.rank == 0 else []


@torch.no_grad()
def hf_weight_buckets(
    chunks: list[torch.nn.Module], model_type: str, bucket_bytes: int
) -> Iterator[WeightBucket]:
    """This pipeline stage's weights in HF names and layouts, as buckets of at most
    `bucket_bytes` bytes (`pipeline.weight_sync.pack_buckets`), yielded on the stage's sender.

    Run it on every rank (to the end): the ranks of the stage's sending TP / expert-TP /
    expert-parallel groups unshard one parameter at a time (experts gathered across
    expert-parallel ranks parameter by parameter), the others return at once. The sender holds
    one bucket buffer plus the parameter being converted (its gathered shards and HF tensors,
    at most twice the full tensor), never the whole stage. No collective involves rank 0
    unless it is in the stage's groups.
    """
    role = SyncRole.of_rank()
    if role.dense or role.expert:
        yield from pack_buckets(_stage_hf_tensors(chunks, model_type, role), bucket_bytes)


def stream_weights(
    chunks: list[torch.nn.Module],
    model_type: str,
    bucket_bytes: int,
    sender: WeightSender | None,
    version: int,
) -> None:
    """Hand this stage's weights to the data plane as `version` (`sender`: on the stage's
    sending rank, None elsewhere). Collective as `hf_weight_buckets`; returns on the sender once
    its last bucket was published (and, per mode, broadcast or loaded)."""
    buckets = hf_weight_buckets(chunks, model_type, bucket_bytes)
    if sender is not None:
        sender.send(version, buckets)
    else:
        for _ in buckets:
            raise RuntimeError("a rank that is not its stage's sender produced a bucket")


def export_hf_checkpoint(
    chunks: list[torch.nn.Module],
    out_dir: str | Path,
    source_dir: str | Path,
    bucket_bytes: int = DEFAULT_BUCKET_MB * 2**20,
) -> None:
    """Write the model as an HF checkpoint in `out_dir` (collective).

    Each stage's sender writes its buckets as safetensors shards (`hf_weight_buckets`), then
    global rank 0 writes the shard index, `config.json` and the tokenizer / generation files
    found in `source_dir` (the HF checkpoint the model was built from, whose `config.json`
    describes the architecture).
    """
    source, out = Path(source_dir), Path(out_dir)
    stage = SyncRole.of_rank().stage
    for index, bucket in enumerate(hf_weight_buckets(chunks, hf_model_type(source), bucket_bytes)):
        write_safetensors(out / shard_file_name(stage, index), bucket)
    if dist.is_initialized():
        dist.barrier()
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    weight_map: dict[str, str] = {}
    for path in sorted(out.glob("model-*.safetensors")):
        with safe_open(path, framework="pt") as f:
            weight_map.update(dict.fromkeys(f.keys(), path.name))
    finish_hf_checkpoint(out, weight_map, source)
