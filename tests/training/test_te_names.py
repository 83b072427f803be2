"""HF mappings of the Transformer Engine layer spec, checked against Megatron-Core's own spec.

Transformer Engine is not installed here, so no TE model can be built. Instead the parameter
names a model would have are listed from the layer `ModuleSpec` that `mcore.model.layer_spec`
builds (Megatron-Core's `get_gpt_layer_with_transformer_engine_spec`, with its real
`TESpecProvider`): the submodule fields give the module paths, `_OWN_PARAMETERS` the parameters
each named class creates itself. The same walk over the local spec must list exactly the
parameters of a built local model, which checks the walk and the Megatron-Core entries.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import NonCallableMock

import pytest
import torch
from hf_worker import ARCHITECTURES, make_hf_checkpoint
from megatron.core.extensions import transformer_engine as te_extensions
from megatron.core.extensions import transformer_engine_spec_provider
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.spec_utils import ModuleSpec
from safetensors.torch import load_file

from megatron_dapo.config.hf_architecture import model_fields_from_hf
from megatron_dapo.config.schema import ModelConfig, ParallelismConfig
from megatron_dapo.hf.convert import chunk_rules
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
from megatron_dapo.mcore.model import build_model_chunks, layer_spec

MOE = ("qwen3_moe", "mixtral")
_MODEL_LEVEL = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight")
"""`GPTModel`'s own parameters outside the layers (its final norm, `TransformerBlock`'s
`LayerNormImpl`, is a `TENorm` with TE and `WrappedTorchNorm` without: `weight` either way),
plus `output_layer.weight` when the embeddings are untied."""

_OWN_PARAMETERS: dict[str, tuple[str, ...]] = {
    # Megatron-Core's classes (checked against a built local model below)
    "IdentityOp": (),
    "IdentityFuncOp": (),
    "DotProductAttention": (),
    "WrappedTorchNorm": ("weight",),
    "TopKRouter": ("weight",),
    "ColumnParallelLinear": ("weight",),
    "RowParallelLinear": ("weight",),
    # Transformer Engine's own names (transformer_engine/pytorch/module/*.py): the Megatron
    # wrappers pass through the parameters of te.pytorch.Linear (`weight`, `bias` if bias),
    # LayerNormLinear (also `layer_norm_weight`; `layer_norm_bias` only for LayerNorm, not
    # RMSNorm), RMSNorm (`weight`, what TENorm returns for RMSNorm) and GroupedLinear (`weight{i}`
    # per GEMM, see `_grouped`); Megatron's extensions/transformer_engine.py names
    # `layer_norm_weight` and `weight{gemm_idx}` in its checkpoint code.
    "TEDotProductAttention": (),
    "TENorm": ("weight",),
    "TEColumnParallelLinear": ("weight",),
    "TERowParallelLinear": ("weight",),
    "TELayerNormColumnParallelLinear": ("layer_norm_weight", "weight"),
}
"""Parameters a module class creates itself, by class name."""
_GROUPED = ("TEColumnParallelGroupedLinear", "TERowParallelGroupedLinear")
_CONTAINERS = ("TransformerLayer", "SelfAttention", "MLP", "TEGroupedMLP")
"""Classes whose parameters are those of their spec's submodules (field name = attribute)."""


@dataclasses.dataclass(frozen=True)
class _Sizes:
    """What the spec alone does not say: Megatron's `SelfAttention` gives `linear_qkv` a bias
    when `add_qkv_bias` (no other linear has one: `add_bias_linear` is false in `model.py`)."""

    qkv_bias: bool
    local_experts: int


def _class_name(entry: object) -> str | None:
    """The class name of a spec entry; None for what is not a module (functions, maps, None).

    Without TE, Megatron's TE wrappers subclass a `MagicMock` and so are mock objects: their
    names are the attribute names in `megatron.core.extensions.transformer_engine`.
    """
    if isinstance(entry, type):
        return entry.__name__
    if isinstance(entry, NonCallableMock):
        return next(k for k, v in vars(te_extensions).items() if v is entry)
    return None


def _walk(entry: object, prefix: str, sizes: _Sizes) -> list[str]:
    """Parameter names (under `prefix`) of the module a spec entry builds."""
    module, submodules = (
        (entry.module, entry.submodules) if isinstance(entry, ModuleSpec) else (entry, None)
    )
    name = _class_name(module)
    if name in _OWN_PARAMETERS:
        own = _OWN_PARAMETERS[name]
        if prefix.endswith(".linear_qkv.") and sizes.qkv_bias:
            own = (*own, "bias")
        return [prefix + p for p in own]
    if name in _GROUPED:
        return [f"{prefix}weight{i}" for i in range(sizes.local_experts)]
    if name == "SequentialMLP":
        expert = ModuleSpec(module=gpt_layer_specs.MLP, submodules=submodules)
        return [
            n
            for i in range(sizes.local_experts)
            for n in _walk(expert, f"{prefix}local_experts.{i}.", sizes)
        ]
    if name == "MoELayer":  # router + experts; the architectures have no shared expert
        return _walk(submodules.router, prefix + "router.", sizes) + _walk(
            submodules.experts, prefix + "experts.", sizes
        )
    if name not in _CONTAINERS:
        raise KeyError(f"no parameter list for {name} at {prefix!r}")
    names = []
    for field in dataclasses.fields(submodules):
        value = getattr(submodules, field.name)
        if isinstance(value, ModuleSpec) or _class_name(value) is not None:
            names += _walk(value, f"{prefix}{field.name}.", sizes)
    return names


def model_parameter_names(model: ModelConfig, spec: ModuleSpec, expert_ranks: int = 1) -> list:
    """The parameter names of a one-stage `GPTModel` of `model` with layer `spec`, on an
    expert-parallel rank of `expert_ranks` (local expert indices)."""
    experts = model.moe.num_experts // expert_ranks if model.moe else 0
    sizes = _Sizes(qkv_bias=model.add_qkv_bias, local_experts=experts)
    layer = _walk(spec, "", sizes)
    untied = () if model.tie_embeddings else ("output_layer.weight",)
    return [
        *_MODEL_LEVEL,
        *untied,
        *(f"decoder.layers.{i}.{n}" for i in range(model.num_layers) for n in layer),
    ]


class _GroupedLinearStandIn:
    """Stands in for Megatron's TE grouped linears, which are None when TE is missing."""


@pytest.fixture
def te_spec(monkeypatch: pytest.MonkeyPatch):
    """`layer_spec` of a `ModelConfig` with `transformer_impl: transformer_engine`, as the GPU
    image builds it, without TE: `gpt_layer_specs` gets the `TESpecProvider` it imports only
    when TE imports, `layer_spec` is told TE is installed, TE >= 1.9 is assumed (q/k norms are
    TENorm, not apex's; the grouped linears exist: stand-in classes of their names, as Megatron
    sets them to None without TE)."""
    provider = transformer_engine_spec_provider
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", provider.TESpecProvider, raising=False)
    monkeypatch.setattr(provider, "is_te_min_version", lambda version: True)
    for name in _GROUPED:
        monkeypatch.setattr(provider, name, type(name, (_GroupedLinearStandIn,), {}))
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return object() if name == "transformer_engine" else real_find_spec(name, *args)

    monkeypatch.setattr("importlib.util.find_spec", find_spec)

    def build(model: ModelConfig) -> ModuleSpec:
        return layer_spec(model.model_copy(update={"transformer_impl": "transformer_engine"}))

    return build


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random HF checkpoint per architecture of `hf_worker.ARCHITECTURES`."""
    root = tmp_path_factory.mktemp("hf")
    for model_type in ARCHITECTURES:
        make_hf_checkpoint(model_type, root / model_type)
    return {model_type: root / model_type for model_type in ARCHITECTURES}


def _model(checkpoint: Path, grouped_gemm: bool = False) -> ModelConfig:
    model = ModelConfig(**model_fields_from_hf(checkpoint))
    if model.moe is None:
        return model
    moe = model.moe.model_copy(update={"grouped_gemm": grouped_gemm})
    return model.model_copy(update={"moe": moe})


def _hf_names(rule: Rule, layer: int, expert: int) -> list[str]:
    return [n.format(layer=layer, expert=expert) for n in rule.hf]


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_walk_lists_the_local_models_parameters_and_rules_split_as_megatron(
    single_rank, checkpoints, model_type
):
    model = _model(checkpoints[model_type])
    (chunk,) = build_model_chunks(model, ParallelismConfig(backend="gloo"))
    params = dict(chunk.named_parameters())
    assert sorted(params) == sorted(model_parameter_names(model, layer_spec(model)))
    rules = chunk_rules(chunk, model_type)
    assert rules == weight_rules(model_type, model.tie_embeddings)
    for name, param in params.items():
        split = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        assert rules[name_template(name)[0]].split == split, name


@pytest.mark.parametrize(
    ("model_type", "grouped"),
    [(t, False) for t in sorted(ARCHITECTURES)] + [(t, True) for t in MOE],
)
def test_te_spec_names_and_rules_match(te_spec, checkpoints, model_type, grouped):
    """Every parameter of the TE spec has a rule, every rule whose HF tensors the architecture
    has names a parameter, and the parameters cover the whole HF checkpoint."""
    model = _model(checkpoints[model_type], grouped)
    spec = te_spec(model)
    chunk = SimpleNamespace(
        transformer_layer_spec=spec,
        share_embeddings_and_output_weights=model.tie_embeddings,
        config=SimpleNamespace(transformer_impl="transformer_engine", moe_grouped_gemm=grouped),
    )
    rules = chunk_rules(chunk, model_type)
    assert rules == weight_rules(model_type, model.tie_embeddings, "transformer_engine", grouped)
    hf = set(load_file(checkpoints[model_type] / "model.safetensors"))
    created = model_parameter_names(model, spec)
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in created
    experts = range(model.moe.num_experts if model.moe else 1)
    covered, live = set(), set()
    for template, rule in rules.items():
        for layer in range(model.num_layers):
            for expert in experts:
                if all(n in hf for n in _hf_names(rule, layer, expert)):
                    live.add(template.format(layer=layer, expert=expert))
                    covered.update(_hf_names(rule, layer, expert))
    if model.tie_embeddings:  # the output layer's copy of the embedding exists only under PP
        live.remove("output_layer.weight")
    assert sorted(created) == sorted(live)
    assert covered == hf


def _global_name(name: str, ep_rank: int, local_experts: int) -> tuple[str, int, int]:
    """`name_template` of a rank's parameter, with the global expert index of EP rank
    `ep_rank` (-1: not an expert)."""
    template, layer, expert = name_template(name)
    return template, layer, expert + ep_rank * local_experts if expert >= 0 else -1


def _attention_shape(model: ModelConfig) -> AttentionShape:
    heads = model.num_attention_heads
    return AttentionShape(
        heads, model.num_query_groups or heads, model.kv_channels or model.hidden_size // heads
    )


@pytest.mark.parametrize(
    ("model_type", "expert_tensor"),
    [(t, 2) for t in sorted(ARCHITECTURES)] + [(t, 1) for t in MOE],
)
def test_te_names_round_trip_over_tp_ep_etp(te_spec, checkpoints, model_type, expert_tensor):
    """HF -> the shards of every rank of TP=2, EP=2, ETP -> HF gives the HF tensors back.

    Dense tensors are split over the 2 TP ranks, experts over the ETP ranks of their EP rank
    (2 local experts each; grouped GEMM for MoE): `shard` / `unshard` and the TE names of the
    conversion functions, without process groups.
    """
    tensor, expert_ranks = 2, 2
    model = _model(checkpoints[model_type], grouped_gemm=True)
    rules = weight_rules(model_type, model.tie_embeddings, "transformer_engine", True)
    shape, spec = _attention_shape(model), te_spec(model)
    local_experts = model.moe.num_experts // expert_ranks if model.moe else 0
    hf = load_file(checkpoints[model_type] / "model.safetensors")
    shards: dict[tuple[int, str], list[torch.Tensor]] = {}  # (EP rank, name) -> TP/ETP shards
    for ep_rank in range(expert_ranks):
        for name in model_parameter_names(model, spec, expert_ranks):
            template, layer, expert = _global_name(name, ep_rank, local_experts)
            rule, size = rules[template], expert_tensor if expert >= 0 else tensor
            full = to_megatron(rule, [hf[n] for n in _hf_names(rule, layer, expert)], shape)
            shards[ep_rank, name] = [shard(full, rule, rank, size) for rank in range(size)]
    if model.moe:
        ffn, hidden = model.moe.ffn_hidden_size, model.hidden_size
        fc1, fc2 = (shards[1, f"decoder.layers.0.mlp.experts.linear_fc{i}.weight1"] for i in (1, 2))
        assert fc1[0].shape == (2 * ffn // expert_tensor, hidden)  # column: [gate; up] rows
        assert fc2[0].shape == (hidden, ffn // expert_tensor)  # row-parallel: input columns
    else:
        norms = shards[0, "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"]
        assert all(n.shape == (model.hidden_size,) for n in norms)  # not split over TP

    exported: dict[str, torch.Tensor] = {}
    for (ep_rank, name), parts in shards.items():
        template, layer, expert = _global_name(name, ep_rank, local_experts)
        rule = rules[template]
        tensors = to_hf(rule, unshard(parts, rule), shape)
        for hf_name, value in zip(_hf_names(rule, layer, expert), tensors, strict=True):
            exported.setdefault(hf_name, value)  # dense tensors: the same on every EP rank
    assert sorted(exported) == sorted(hf)
    assert all(torch.equal(exported[k], hf[k]) for k in hf)
