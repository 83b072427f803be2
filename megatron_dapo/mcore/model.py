"""The policy as Megatron-Core `GPTModel` chunks built from `RunConfig.model` + `.parallelism`.

Architecture: RoPE (relative, so packed samples need only a block-diagonal mask), SwiGLU MLPs
without biases, RMSNorm, GQA, optional qk-layernorm and qkv bias, tied or untied embeddings, dense
or MoE MLPs (router top-k, load balancing, shared expert, grouped GEMM on GPU). No dropout: RL
log-probs must be those of the policy that is being optimised.

Layer implementation (`model.transformer_impl`): `local` is Megatron-Core's plain-torch spec
(runs on CPU); `transformer_engine` is the Transformer Engine spec and raises if
`transformer_engine` cannot be imported (there is no silent fallback).

Call after `parallel.initialize_parallel`; returns one chunk per virtual pipeline stage.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from megatron_dapo.config.schema import ModelConfig, ParallelismConfig, RecomputeConfig

NO_RECOMPUTE = RecomputeConfig()
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _recompute_kwargs(recompute: RecomputeConfig) -> dict:
    """`TransformerConfig` activation-recompute fields of `training.recompute`."""
    if recompute.granularity == "none":
        return {}
    if recompute.granularity == "selective":
        return {"recompute_granularity": "selective"}
    return {
        "recompute_granularity": "full",
        "recompute_method": recompute.method,
        "recompute_num_layers": recompute.num_layers,
    }


def transformer_config(
    model: ModelConfig,
    parallelism: ParallelismConfig,
    recompute: RecomputeConfig = NO_RECOMPUTE,
    routing_replay: bool = False,
):
    """The Megatron-Core `TransformerConfig` of the policy (returned type: TransformerConfig);
    `routing_replay` gives every MoE router a `RouterReplay` (`algorithm.routing_replay`)."""
    from megatron.core.transformer import TransformerConfig

    dtype = _DTYPES[model.params_dtype]
    on_gpu = torch.cuda.is_available()
    fused = on_gpu and model.transformer_impl == "transformer_engine"
    moe = model.moe
    moe_kwargs = {}
    if moe is not None:
        if moe.grouped_gemm and not on_gpu:
            raise ValueError("model.moe.grouped_gemm needs CUDA; set it to false on CPU")
        moe_kwargs = {
            "num_moe_experts": moe.num_experts,
            "moe_router_topk": moe.router_topk,
            "moe_ffn_hidden_size": moe.ffn_hidden_size or model.ffn_hidden_size,
            "moe_shared_expert_intermediate_size": moe.shared_expert_ffn_hidden_size,
            "moe_router_load_balancing_type": moe.load_balancing_type,
            "moe_aux_loss_coeff": moe.aux_loss_coeff,
            "moe_token_dispatcher_type": moe.token_dispatcher,
            "moe_grouped_gemm": moe.grouped_gemm,
            "moe_router_dtype": "fp32",
            "moe_permute_fusion": False,
            "moe_enable_routing_replay": routing_replay,
        }
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=parallelism.tensor,
        pipeline_model_parallel_size=parallelism.pipeline,
        virtual_pipeline_model_parallel_size=parallelism.virtual_pipeline,
        sequence_parallel=parallelism.sequence_parallel and parallelism.tensor > 1,
        expert_model_parallel_size=parallelism.expert,
        expert_tensor_parallel_size=parallelism.expert_tensor,
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        masked_softmax_fusion=fused,
        apply_rope_fusion=fused,
        persist_layer_norm=fused,
        deallocate_pipeline_outputs=True,
        # Batched isend/irecv on gloo match messages to one peer in posting order, which swaps
        # activations and gradients between the two ranks of PP=2 in the interleaved schedule.
        batch_p2p_comm=on_gpu,
        calculate_per_token_loss=False,
        cuda_graph_scope=[],  # the whole layer; Megatron-Core's default "full" is deprecated
        transformer_impl=model.transformer_impl,
        **_recompute_kwargs(recompute),
        **moe_kwargs,
    )


def layer_spec(model: ModelConfig):
    """The `ModuleSpec` of one transformer layer for `model.transformer_impl`.

    Raises:
        RuntimeError: `transformer_engine` was asked for but cannot be imported.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    num_experts = model.moe.num_experts if model.moe else None
    grouped_gemm = bool(model.moe and model.moe.grouped_gemm)
    if model.transformer_impl == "transformer_engine":
        if importlib.util.find_spec("transformer_engine") is None:
            raise RuntimeError(
                "model.transformer_impl='transformer_engine' but transformer_engine is not "
                "installed; use the GPU container image or set model.transformer_impl='local'"
            )
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=grouped_gemm, qk_layernorm=model.qk_layernorm
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts,
        moe_grouped_gemm=grouped_gemm,
        qk_layernorm=model.qk_layernorm,
        normalization="RMSNorm",
    )


def build_model_chunks(
    model: ModelConfig,
    parallelism: ParallelismConfig,
    recompute: RecomputeConfig = NO_RECOMPUTE,
    routing_replay: bool = False,
) -> list:
    """This rank's `GPTModel` chunks (one per virtual pipeline stage; one without VPP); MoE
    routers can replay given routes with `routing_replay` (`transformer_config`).

    Each chunk has `vp_stage` set and only the first/last stage owns the embedding/output
    layer. The forward of a last-stage chunk without labels returns logits
    `[batch, seq, vocab_size / tensor]` (vocab-parallel, not gathered).

    Raises:
        ValueError: the vocabulary does not split evenly over tensor-parallel ranks.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if model.vocab_size % parallelism.tensor:
        raise ValueError(
            f"model.vocab_size={model.vocab_size} must be a multiple of parallelism.tensor="
            f"{parallelism.tensor} (vocab-parallel embedding and output layer)"
        )
    config = transformer_config(model, parallelism, recompute, routing_replay)
    spec = layer_spec(model)
    chunks = []
    for index in range(parallelism.virtual_pipeline or 1):
        vp_stage = index if parallelism.virtual_pipeline else None
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=spec,
                vocab_size=model.vocab_size,
                max_sequence_length=model.max_position_embeddings,
                pre_process=parallel_state.is_pipeline_first_stage(
                    ignore_virtual=False, vp_stage=vp_stage
                ),
                post_process=parallel_state.is_pipeline_last_stage(
                    ignore_virtual=False, vp_stage=vp_stage
                ),
                parallel_output=True,
                share_embeddings_and_output_weights=model.tie_embeddings,
                position_embedding_type="rope",
                rotary_base=model.rotary_base,
                vp_stage=vp_stage,
            )
        )
    return chunks
