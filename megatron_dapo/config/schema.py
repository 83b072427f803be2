"""The run configuration: one typed schema for a whole megatron-dapo run.

`RunConfig` composes the training-plane sections defined here (model, parallelism, algorithm,
optimizer, training, metrics, checkpoint, launch) with the data-plane sections that
`pipeline.config` owns (rollout, data, reward, dynamic sampling). Every section is frozen and
rejects unknown keys; cross-section rules live in `RunConfig._check_consistency`. YAML loading
and dotted overrides are in `megatron_dapo.config.loading`.

Units: lengths in tokens, batch sizes in responses unless named `prompts_*`, times in seconds,
learning rates per optimizer step.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config import (
    DataConfig,
    DynamicSamplingConfig,
    RewardConfig,
    RolloutConfig,
    Section,
)

POLICY_LOSS_NAMES = ("dapo", "grpo", "gspo", "dr_grpo", "sapo")
ADVANTAGE_ESTIMATOR_NAMES = ("grpo", "dr_grpo")
LOSS_AGGREGATION_NAMES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


class MoEConfig(Section):
    """Mixture-of-experts MLP layers (Megatron-Core `num_moe_experts` and friends)."""

    num_experts: int = Field(ge=2)
    router_topk: int = Field(2, ge=1)
    ffn_hidden_size: int | None = Field(None, ge=1)
    """Per-expert MLP width; defaults to `model.ffn_hidden_size`."""
    shared_expert_ffn_hidden_size: int | None = Field(None, ge=1)
    """Width of the always-active shared expert(s); None = no shared expert."""
    load_balancing_type: Literal["aux_loss", "seq_aux_loss", "sinkhorn", "none"] = "aux_loss"
    aux_loss_coeff: float = Field(1e-3, ge=0.0)
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    grouped_gemm: bool = False
    """Grouped GEMM experts (GPU only)."""

    @model_validator(mode="after")
    def _check_topk(self) -> MoEConfig:
        if self.router_topk > self.num_experts:
            raise ValueError(
                f"router_topk={self.router_topk} exceeds num_experts={self.num_experts}"
            )
        return self


class ModelConfig(Section):
    """The policy: a Megatron-Core GPT model (dense or MoE)."""

    hf_checkpoint: str | None = None
    """Directory of an HF-format checkpoint (config.json + safetensors) to start from."""
    random_init: Literal["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral"] | None = None
    """If set and `hf_checkpoint` does not exist yet, the trainer first writes a random-weight
    checkpoint of this architecture there (sizes from this section, the project's
    character-level tokenizer): runs that start from scratch, like the CPU demo."""
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    ffn_hidden_size: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_query_groups: int | None = Field(None, ge=1)
    """GQA key/value heads; None = multi-head attention."""
    kv_channels: int | None = Field(None, ge=1)
    """Per-head dimension; None = hidden_size / num_attention_heads."""
    vocab_size: int = Field(ge=2)
    max_position_embeddings: int = Field(ge=1)
    rotary_base: float = Field(10000.0, gt=0.0)
    norm_epsilon: float = Field(1e-6, gt=0.0)
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    tie_embeddings: bool = False
    moe: MoEConfig | None = None
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    """Layer implementation: Megatron-Core's local spec (CPU) or Transformer Engine (GPU)."""
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={groups}"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}; set kv_channels"
            )
        return self


class ParallelismConfig(Section):
    """Megatron-Core model parallelism; data parallelism is what the world size leaves."""

    tensor: int = Field(1, ge=1)
    pipeline: int = Field(1, ge=1)
    virtual_pipeline: int | None = Field(None, ge=2)
    """Interleaved 1F1B: model chunks per pipeline rank."""
    expert: int = Field(1, ge=1)
    expert_tensor: int | None = Field(None, ge=1)
    """Tensor parallelism inside experts; None = Megatron's default (same as `tensor`)."""
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """`auto`: NCCL when CUDA is available, otherwise gloo."""

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one replica of the dense model (TP x PP)."""
        return self.tensor * self.pipeline


class AlgorithmConfig(Section):
    """The RL objective: policy loss, advantages, clipping, aggregation, regularisers."""

    policy_loss: Literal[POLICY_LOSS_NAMES] = "dapo"  # type: ignore[valid-type]
    advantage_estimator: Literal[ADVANTAGE_ESTIMATOR_NAMES] = "grpo"  # type: ignore[valid-type]
    loss_aggregation: Literal[LOSS_AGGREGATION_NAMES] = "token-mean"  # type: ignore[valid-type]
    eps_low: float = Field(0.2, ge=0.0, lt=1.0)
    eps_high: float = Field(0.28, ge=0.0)
    eps_high_end: float | None = Field(None, ge=0.0)
    """If set, eps_high moves from `eps_high` to this value over `eps_high_schedule_steps`."""
    eps_high_schedule: Literal["constant", "linear", "cosine"] = "constant"
    eps_high_schedule_steps: int = Field(0, ge=0)
    dual_clip_c: float | None = Field(None, gt=1.0)
    """Dual-clip constant c > 1 capping the loss of negative-advantage tokens; None = off."""
    gspo_eps_low: float = Field(3e-4, ge=0.0, lt=1.0)
    gspo_eps_high: float = Field(4e-4, ge=0.0)
    sapo_tau_pos: float = Field(1.0, gt=0.0)
    sapo_tau_neg: float = Field(1.05, gt=0.0)
    loss_norm_constant: int | None = Field(None, ge=1)
    """seq-mean-token-sum-norm divisor; None = rollout.max_response_length."""
    kl_coef: float = Field(0.0, ge=0.0)
    """Weight of the k3 KL-to-reference penalty (GRPO); 0 = no reference model (DAPO)."""
    entropy_coef: float = Field(0.0, ge=0.0)
    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()

    @model_validator(mode="after")
    def _check_schedule(self) -> AlgorithmConfig:
        incomplete = self.eps_high_end is None or self.eps_high_schedule_steps == 0
        if self.eps_high_schedule != "constant" and incomplete:
            raise ValueError(
                f"eps_high_schedule={self.eps_high_schedule!r} needs eps_high_end and "
                "eps_high_schedule_steps > 0"
            )
        return self


class OptimizerConfig(Section):
    """AdamW (decoupled weight decay) with warm-up, as Megatron-Core's optimizer builds it."""

    lr: float = Field(1e-6, gt=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    lr_warmup_steps: int = Field(0, ge=0)
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = Field(0.01, ge=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_eps: float = Field(1e-8, gt=0.0)
    clip_grad: float = Field(1.0, ge=0.0)
    """Global gradient-norm clip; 0 = off."""


class TrainingConfig(Section):
    """Batch geometry and length of the run."""

    steps: int = Field(ge=1)
    """Rollout steps (each: generate, score, filter, then one or more optimizer steps)."""
    prompts_per_step: int = Field(ge=1)
    """Groups (prompts) in the training batch of one rollout step."""
    mini_batch_size: int = Field(ge=1)
    """Responses per optimizer step; the batch of one rollout step is split into mini-batches."""
    micro_batch_max_tokens: int = Field(8192, ge=1)
    """Token budget of one packed micro-batch (prompt + response tokens)."""
    log_prob_chunk_size: int = Field(4096, ge=1)
    """Tokens per chunk of the vocab-parallel log-prob/entropy computation (bounds memory)."""
    seed: int = 1234
    on_nonfinite: Literal["skip", "stop"] = "skip"
    """A non-finite loss or gradient: `skip` the optimizer step (logged and counted in
    `dapo_skipped_optimizer_steps_total`) or `stop` the run with an error."""


class MetricsConfig(Section):
    """Prometheus exporter and console logging."""

    run_name: str = "megatron-dapo"
    prometheus: bool = True
    bind_address: str = "127.0.0.1"
    port: int = Field(9400, ge=0, le=65535)
    """0 = pick a free port."""
    log_every: int = Field(1, ge=1)


class CheckpointConfig(Section):
    """Megatron distributed checkpoints plus the pipeline's state."""

    dir: str = "checkpoints"
    save_interval: int = Field(0, ge=0)
    """Save every N rollout steps; 0 = only at the end."""
    keep_last: int = Field(2, ge=1)
    resume: Literal["auto", "never", "required"] = "auto"
    """`auto`: resume from the newest checkpoint in `dir` if there is one."""


class LaunchConfig(Section):
    """How ranks are started: in-process (local), torchrun, or SLURM."""

    launcher: Literal["local", "torchrun", "slurm"] = "local"
    nnodes: int = Field(1, ge=1)
    nproc_per_node: int = Field(1, ge=1)
    master_addr: str = "127.0.0.1"
    master_port: int = Field(29500, ge=1, le=65535)
    rollout_nodes: int = Field(0, ge=0)
    """SLURM: nodes reserved for the SGLang fleet (disaggregated mode)."""
    slurm_partition: str | None = None
    slurm_account: str | None = None
    slurm_time: str = "04:00:00"

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


class TensorInspectConfig(Section):
    """Optional nvdlfw-inspect tensor statistics of the policy's layers (off by default).

    See `megatron_dapo.mcore.tensor_inspect` and `configs/debug/tensor-inspect.yaml`. Relative paths
    resolve against the working directory, like `checkpoint.dir`.
    """

    tensor_inspect_config: str | None = None
    """nvdlfw-inspect YAML naming layers (module names from `named_modules()`) and statistics;
    None = off (nvdlfw-inspect is not even imported)."""
    log_dir: str = "tensor_inspect"
    """nvdlfw-inspect writes `nvdlfw_inspect_statistics_logs/` and `nvdlfw_inspect_logs/` here."""
    feature_dirs: tuple[str, ...] = ()
    """Extra nvdlfw-inspect feature directories (its built-in features are always loaded)."""


class RunConfig(Section):
    """Everything one run needs; the YAML files in `configs/` are instances of it."""

    model: ModelConfig
    parallelism: ParallelismConfig = ParallelismConfig()
    rollout: RolloutConfig = RolloutConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    data: DataConfig
    reward: RewardConfig = RewardConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    training: TrainingConfig
    metrics: MetricsConfig = MetricsConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    launch: LaunchConfig = LaunchConfig()
    debug: TensorInspectConfig = TensorInspectConfig()

    @property
    def data_parallel_size(self) -> int:
        """Dense data-parallel replicas (world / (TP x PP))."""
        return self.launch.world_size // self.parallelism.model_parallel_size

    @model_validator(mode="after")
    def _check_consistency(self) -> RunConfig:
        model, par = self.model, self.parallelism
        groups = model.num_query_groups or model.num_attention_heads
        if model.num_attention_heads % par.tensor or groups % par.tensor:
            raise ValueError(
                f"parallelism.tensor={par.tensor} must divide model.num_attention_heads="
                f"{model.num_attention_heads} and the query groups ({groups})"
            )
        if par.expert > 1 and model.moe is None:
            raise ValueError(f"parallelism.expert={par.expert} needs an MoE model (model.moe)")
        if model.moe is not None and model.moe.num_experts % par.expert:
            raise ValueError(
                f"parallelism.expert={par.expert} must divide model.moe.num_experts="
                f"{model.moe.num_experts}"
            )
        if model.moe is not None and par.tensor > 1 and not par.sequence_parallel:
            raise ValueError(
                "Megatron-Core requires parallelism.sequence_parallel=true for MoE with tensor > 1"
            )
        if model.num_layers % (par.pipeline * (par.virtual_pipeline or 1)):
            raise ValueError(
                f"model.num_layers={model.num_layers} must split evenly over parallelism.pipeline="
                f"{par.pipeline} x virtual_pipeline={par.virtual_pipeline or 1} stages"
            )
        world = self.launch.world_size
        if world % par.model_parallel_size:
            raise ValueError(
                f"launch world size {world} is not a multiple of tensor x pipeline = "
                f"{par.model_parallel_size}"
            )
        expert_world = par.expert * (par.expert_tensor or par.tensor) * par.pipeline
        if world % expert_world:
            raise ValueError(
                f"launch world size {world} is not a multiple of expert x expert_tensor x "
                f"pipeline = {expert_world}"
            )
        responses = self.training.prompts_per_step * self.rollout.n_samples_per_prompt
        if responses % self.training.mini_batch_size:
            raise ValueError(
                f"training.mini_batch_size={self.training.mini_batch_size} must divide the "
                f"responses per step (prompts_per_step x n_samples_per_prompt = {responses})"
            )
        overlong = self.reward.overlong
        if overlong.soft_punishment and overlong.cache_length > self.rollout.max_response_length:
            raise ValueError(
                f"reward.overlong.cache_length={overlong.cache_length} exceeds "
                f"rollout.max_response_length={self.rollout.max_response_length}"
            )
        return self
