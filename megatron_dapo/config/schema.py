"""The run configuration: one typed schema for a whole megatron-dapo run.

`RunConfig` composes the training-plane sections defined here (model, parallelism, algorithm,
optimizer, training, metrics, checkpoint, launch, and the supervised warm-up's sft) with the
data-plane sections that `pipeline` owns (rollout, data, reward, dynamic sampling, advantage,
eval, sft.data). Every section is frozen and rejects
unknown keys; cross-section rules live in `RunConfig._check_consistency`. The algorithm's names,
pairings and hyper-parameter ranges come from `megatron_dapo.algo` and `pipeline.advantages`
(registries, `PAPER_RECIPES`, `LOSS_PARAMETER_RANGES`) and are checked here, once, at load time.
The data plane is handed `RunConfig.data_plane_config()`, never the run config. YAML loading and
dotted overrides are in `megatron_dapo.config.loading`.

Units: lengths in tokens, batch sizes in responses unless named `prompts_*`, times in seconds,
learning rates per optimizer step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from megatron_dapo.algo.aggregation import LOSS_AGGREGATIONS
from megatron_dapo.algo.eps_schedule import SCHEDULE_SHAPES, EpsHighSchedule
from megatron_dapo.algo.kl import KL_ESTIMATORS
from megatron_dapo.algo.objective import ObjectiveConfig
from megatron_dapo.algo.policy_loss import (
    LOSS_PARAMETER_RANGES,
    PAPER_RECIPES,
    POLICY_LOSSES,
    PolicyLossConfig,
)
from megatron_dapo.algo.rollout_correction import CORRECTION_MODES
from megatron_dapo.config.hf_architecture import (
    SUPPORTED_MODEL_TYPES,
    merge_architecture,
    model_fields_from_hf,
)
from pipeline.advantages import AdvantageConfig
from pipeline.colocation import embedded_server_gpus
from pipeline.config import (
    DataConfig,
    DynamicSamplingConfig,
    EvalConfig,
    RewardConfig,
    RolloutConfig,
    Section,
    SFTDataConfig,
)
from pipeline.data_plane import DataPlaneConfig
from pipeline.sglang_server import sample_token_budget
from pipeline.train_batch import ExpertRouting

EPS_HIGH_SCHEDULES = tuple(SCHEDULE_SHAPES)
_LOSS_DEFAULTS = PolicyLossConfig()


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
    """Grouped GEMM experts (GPU, `model.transformer_impl: transformer_engine` only)."""

    @model_validator(mode="after")
    def _check_topk(self) -> MoEConfig:
        if self.router_topk > self.num_experts:
            raise ValueError(
                f"router_topk={self.router_topk} exceeds num_experts={self.num_experts}"
            )
        return self


class ModelConfig(Section):
    """The policy: a Megatron-Core GPT model (dense or MoE).

    When `hf_checkpoint` holds a `config.json`, the architecture fields come from it
    (`hf_architecture.merge_architecture`): the run config may leave them out, and one set to
    another value than the checkpoint's is an error naming both. What a checkpoint cannot hold
    (`transformer_impl`, `params_dtype`, MoE training choices) stays here.
    """

    hf_checkpoint: str | None = None
    """Directory of an HF-format checkpoint (config.json + safetensors) the policy starts from:
    every rank loads its shards of it before training. `~` expands to the home directory."""
    random_init: Literal[SUPPORTED_MODEL_TYPES] | None = None  # type: ignore[valid-type]
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

    @model_validator(mode="before")
    @classmethod
    def _architecture_from_checkpoint(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("hf_checkpoint"):
            return data
        data = {**data, "hf_checkpoint": os.path.expanduser(str(data["hf_checkpoint"]))}
        config_json = Path(data["hf_checkpoint"]) / "config.json"
        if not config_json.is_file():
            return data  # written later (`random_init`) or missing (the trainer says so)
        return merge_architecture(data, model_fields_from_hf(config_json.parent), str(config_json))

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

    @model_validator(mode="after")
    def _check_layer_spec(self) -> ModelConfig:
        if self.moe is not None and self.moe.grouped_gemm and self.transformer_impl == "local":
            raise ValueError(
                "model.moe.grouped_gemm=true needs model.transformer_impl='transformer_engine': "
                "with 'local' Megatron-Core builds its deprecated GroupedMLP (every local expert "
                "in one transposed weight1 / weight2), which has no HF weight mapping"
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


class RolloutCorrectionConfig(Section):
    """Truncated importance sampling of the trainer/rollout mismatch
    (`megatron_dapo.algo.rollout_correction`); `none` keeps the paper's objective."""

    mode: Literal[CORRECTION_MODES] = "none"  # type: ignore[valid-type]
    threshold: float = Field(2.0, gt=0.0, allow_inf_nan=False)
    """C, the largest importance weight."""


class AlgorithmConfig(Section):
    """The RL objective: policy loss, advantages, clipping, aggregation, regularisers.

    Unset (or null) `advantage.estimator` and `loss_aggregation` follow the policy loss's paper
    recipe (`PAPER_RECIPES`); set, they must keep what defines the variant (e.g. `dr_grpo` is its
    advantage and aggregation) and are otherwise free, for ablations.
    """

    policy_loss: str = "dapo"
    """Registered policy loss: `dapo`, `grpo`, `gspo`, `dr_grpo` or `sapo`."""
    advantage: AdvantageConfig = AdvantageConfig()
    loss_aggregation: str = "token-mean"
    """Registered aggregation: `token-mean`, `seq-mean-token-mean`, `seq-mean-token-sum-norm`."""
    eps_low: float = _LOSS_DEFAULTS.eps_low
    eps_high: float = _LOSS_DEFAULTS.eps_high
    eps_high_end: float | None = None
    """If set, eps_high moves from `eps_high` to this value over `eps_high_schedule_steps`."""
    eps_high_schedule: Literal[EPS_HIGH_SCHEDULES] = "constant"  # type: ignore[valid-type]
    eps_high_schedule_steps: int = Field(0, ge=0)
    dual_clip_c: float | None = _LOSS_DEFAULTS.dual_clip_c
    """Dual-clip constant c > 1 capping the loss of negative-advantage tokens; None = off."""
    gspo_eps_low: float = _LOSS_DEFAULTS.gspo_eps_low
    gspo_eps_high: float = _LOSS_DEFAULTS.gspo_eps_high
    sapo_tau_pos: float = _LOSS_DEFAULTS.sapo_tau_pos
    sapo_tau_neg: float = _LOSS_DEFAULTS.sapo_tau_neg
    loss_norm_constant: int | None = Field(None, ge=1)
    """seq-mean-token-sum-norm divisor; None = rollout.max_response_length."""
    kl_coef: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    """Weight of the KL penalty to a reference policy (GRPO): > 0 builds a frozen copy of the
    initial policy (`model.hf_checkpoint`, same layout and dtype, forward only: its parameters
    once more per rank, no gradients or optimizer state), computes its log-probs in the
    forward-only pass before the step's first update and adds `kl_coef` x the aggregated KL to
    the loss. 0 = none (DAPO): no reference model is built."""
    kl_estimator: str = "low_var_kl"
    """Registered per-token KL estimator of the penalty: `k1`, `k3` or `low_var_kl` (k3 clamped
    to +-10, verl's default), see `megatron_dapo.algo.kl`."""
    entropy_coef: float = Field(0.0, ge=0.0)
    old_log_probs: Literal["recompute", "rollout"] = "recompute"
    """pi_old of the clipped ratio: `recompute` = a forward pass of the policy over the step's
    batch before its first update (verl, slime); `rollout` = the fleet's sampling log-probs."""
    rollout_correction: RolloutCorrectionConfig = RolloutCorrectionConfig()
    routing_replay: Literal["none", "rollout"] = "none"
    """MoE routing replay (R3): `rollout` = the fleet returns the experts its routers chose for
    every token (SGLang `--enable-return-routed-experts`, added to embedded servers; start
    cluster servers with it), the batch carries them, and the trainer's routers take those
    experts (Megatron-Core `RouterReplay`) in the pi_old pass and in training, so both
    policies compute every token with the same experts; the router's gate still gets
    gradients through the replayed experts' weights. Memory: model.num_layers x
    model.moe.router_topk bytes per token (uint8 ids; int16 above 256 experts, twice that) in
    the batch and in carried groups, e.g. 48 layers x top-8 = 384 B/token. `none` = each
    side routes by itself."""
    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()

    @model_validator(mode="before")
    @classmethod
    def _paper_recipe_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        recipe = PAPER_RECIPES.get(data.get("policy_loss", cls.model_fields["policy_loss"].default))
        if recipe is None:
            return data  # the policy_loss validator names the valid losses
        data = dict(data)
        if data.get("loss_aggregation") is None:
            data["loss_aggregation"] = recipe.loss_aggregation
        advantage = data.get("advantage") or {}
        if isinstance(advantage, dict) and advantage.get("estimator") is None:
            data["advantage"] = {**advantage, "estimator": recipe.advantage_estimator}
        return data

    @field_validator("policy_loss")
    @classmethod
    def _registered_policy_loss(cls, name: str) -> str:
        POLICY_LOSSES.get(name)  # ValueError listing the valid names
        return name

    @field_validator("loss_aggregation")
    @classmethod
    def _registered_aggregation(cls, name: str) -> str:
        LOSS_AGGREGATIONS.get(name)
        return name

    @field_validator(*LOSS_PARAMETER_RANGES, "eps_high_end")
    @classmethod
    def _loss_parameter_in_range(cls, value: float | None, info: ValidationInfo) -> float | None:
        name = "eps_high" if info.field_name == "eps_high_end" else str(info.field_name)
        if value is not None:
            LOSS_PARAMETER_RANGES[name].validate(str(info.field_name), value)
        return value

    @field_validator("kl_estimator")
    @classmethod
    def _registered_kl_estimator(cls, name: str) -> str:
        KL_ESTIMATORS.get(name)
        return name

    @model_validator(mode="after")
    def _check_recipe_and_schedule(self) -> AlgorithmConfig:
        recipe = PAPER_RECIPES[self.policy_loss]
        conflicts = recipe.conflicts(self.advantage.estimator, self.loss_aggregation)
        if conflicts:
            raise ValueError(
                f"policy_loss {self.policy_loss!r} is {recipe.paper}: advantage estimator "
                f"{recipe.advantage_estimator!r} with loss_aggregation "
                f"{recipe.loss_aggregation!r}, but got {'; '.join(conflicts)}. Leave them unset "
                "for the recipe, or pick the policy loss whose recipe you mean"
            )
        if self.rollout_correction.mode != "none" and self.old_log_probs != "recompute":
            raise ValueError(
                f"rollout_correction.mode={self.rollout_correction.mode!r} corrects the "
                "difference between recomputed and rollout log-probs: it needs "
                "old_log_probs='recompute'"
            )
        try:
            self.eps_high_schedule_of_run()
        except ValueError as err:
            raise ValueError(
                f"eps_high_schedule={self.eps_high_schedule!r} with eps_high_end="
                f"{self.eps_high_end}, eps_high_schedule_steps={self.eps_high_schedule_steps}: "
                f"{err}"
            ) from None
        return self

    def eps_high_schedule_of_run(self) -> EpsHighSchedule:
        """eps_high over the run's optimizer steps."""
        return EpsHighSchedule(
            start=self.eps_high,
            end=self.eps_high_end,
            num_steps=self.eps_high_schedule_steps,
            kind=self.eps_high_schedule,
        )

    def objective_at(self, optimizer_step: int) -> ObjectiveConfig:
        """The objective of optimizer step `optimizer_step` (>= 0), eps_high scheduled."""
        return ObjectiveConfig(
            policy_loss=self.policy_loss,
            loss_aggregation=self.loss_aggregation,
            loss=PolicyLossConfig(
                eps_low=self.eps_low,
                eps_high=self.eps_high_schedule_of_run().value_at(optimizer_step),
                dual_clip_c=self.dual_clip_c,
                gspo_eps_low=self.gspo_eps_low,
                gspo_eps_high=self.gspo_eps_high,
                sapo_tau_pos=self.sapo_tau_pos,
                sapo_tau_neg=self.sapo_tau_neg,
            ),
            entropy_coef=self.entropy_coef,
            rollout_correction=self.rollout_correction.mode,
            correction_threshold=self.rollout_correction.threshold,
            kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator,
        )


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


class RecomputeConfig(Section):
    """Activation recompute (Megatron-Core `recompute_granularity` / `_method` / `_num_layers`):
    trade a second forward pass for activation memory.

    `selective` recomputes the core attention of every layer (Megatron's default
    `recompute_modules`); `full` recomputes whole layers: with `method: uniform` the stage's
    layers in units of `num_layers` (checkpointing each unit's input), with `method: block` the
    first `num_layers` layers of each pipeline stage.
    """

    granularity: Literal["none", "selective", "full"] = "none"
    method: Literal["uniform", "block"] = "uniform"
    """Only for `full`."""
    num_layers: int = Field(1, ge=1)
    """Only for `full`: layers per unit (`uniform`) or recomputed layers per stage (`block`)."""


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
    recompute: RecomputeConfig = RecomputeConfig()
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
    """Print the summary line every this many steps (and the last); Prometheus and
    `metrics.jsonl` get every step."""


class CheckpointConfig(Section):
    """Megatron distributed checkpoints plus the pipeline's state."""

    dir: str = "checkpoints"
    save_interval: int = Field(0, ge=0)
    """Save every N rollout steps; 0 = only at the end."""
    keep_last: int = Field(2, ge=1)
    resume: Literal["auto", "never", "required"] = "auto"
    """`auto`: resume from the newest checkpoint in `dir` if there is one."""


class LaunchConfig(Section):
    """Where the trainer's ranks run: one node (`megatron-dapo train` starts them under
    torchrun) or several (started per node by `launch/torchrun.sh` or SLURM)."""

    nnodes: int = Field(1, ge=1)
    nproc_per_node: int = Field(1, ge=1)
    master_addr: str = "127.0.0.1"
    master_port: int = Field(29500, ge=1, le=65535)
    rollout_nodes: int = Field(0, ge=0)
    """SLURM: nodes reserved for the SGLang fleet (disaggregated mode)."""
    slurm_partition: str | None = None
    slurm_account: str | None = None
    slurm_time: str = "04:00:00"
    slurm_gpus: bool = False
    """SLURM: give every node of the job `nproc_per_node` GPUs (`--gpus-per-node`): one per
    trainer rank, as many for a rollout node's server; false for a CPU run."""
    network_interface: str | None = None
    """The network interface NCCL's and Gloo's sockets use (`NCCL_SOCKET_IFNAME`,
    `GLOO_SOCKET_IFNAME`), e.g. `eth0`; None = the libraries' own pick, which can be one the other
    nodes cannot reach."""
    nccl_ib_hca: str | None = None
    """`NCCL_IB_HCA`: the InfiniBand adapters NCCL uses (e.g. `mlx5_0,mlx5_1`); None = all."""

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


class SFTConfig(Section):
    """Supervised fine-tuning (`megatron-dapo sft`): next-token training of the policy of
    `model` (from `model.hf_checkpoint`, in the run's `parallelism` layout) on prompt/response
    pairs, loss on the response tokens only (token-mean over each optimizer step), writing an
    HF checkpoint that `train` starts from (`model.hf_checkpoint=<output_dir>`).

    Shared with the RL run: `model`, `parallelism`, `launch`, and from `training` the packing
    (`micro_batch_max_tokens`), `log_prob_chunk_size`, `recompute`, `seed` and
    `on_nonfinite`; the optimizer is `optimizer` unless `sft.optimizer` sets its own (a warm-up
    usually wants a larger learning rate than RL). Nothing of `rollout`, `algorithm`, `reward`
    or `data` is used; log-probs are at temperature 1.
    """

    data: SFTDataConfig
    output_dir: str
    """Where the HF checkpoint is written at the end (safetensors shards and index, with the
    config, generation and tokenizer files of `model.hf_checkpoint`), with the run's
    `metrics.jsonl`; it must not hold a checkpoint (`config.json`) yet. `~` expands to the
    home directory."""
    batch_size: int = Field(ge=1)
    """Pairs per optimizer step over all data-parallel ranks (verl's `data.train_batch_size`,
    NeMo-RL's `policy.train_global_batch_size`), packed into micro-batches of
    `training.micro_batch_max_tokens` tokens."""
    epochs: int = Field(1, ge=1)
    """Passes over the pairs; an epoch is `pairs // batch_size` optimizer steps."""
    steps: int | None = Field(None, ge=1)
    """If set, stop after this many optimizer steps when that comes before the end of
    `epochs` (NeMo-RL's `max_num_steps`)."""
    optimizer: OptimizerConfig | None = None
    """AdamW and its LR schedule for the warm-up; None = the run's `optimizer` section."""

    @field_validator("output_dir")
    @classmethod
    def _expand_home(cls, path: str) -> str:
        return os.path.expanduser(path)


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
    sft: SFTConfig | None = None
    """Supervised fine-tuning before RL (`megatron-dapo sft`); unused by `train`."""
    eval: EvalConfig = EvalConfig()
    """Held-out evaluation during training (`eval.interval`) and by `megatron-dapo eval`."""

    @model_validator(mode="before")
    @classmethod
    def _eval_length_defaults(cls, data: Any) -> Any:
        """Unset `eval.max_response_length` is the rollout's; an eval dataset's unset
        `max_prompt_length` is `data.max_prompt_length`."""
        if not isinstance(data, dict) or not isinstance(data.get("eval"), dict):
            return data

        def given(section: str, key: str, default: Any) -> Any:
            values = data.get(section)
            return values.get(key, default) if isinstance(values, dict) else default

        evaluation = dict(data["eval"])
        if evaluation.get("max_response_length") is None:
            default = RolloutConfig.model_fields["max_response_length"].default
            evaluation["max_response_length"] = given("rollout", "max_response_length", default)
        prompt_length = given(
            "data", "max_prompt_length", DataConfig.model_fields["max_prompt_length"].default
        )
        datasets = evaluation.get("datasets")
        if isinstance(datasets, list | tuple):
            evaluation["datasets"] = [
                {"max_prompt_length": prompt_length, **d} if isinstance(d, dict) else d
                for d in datasets
            ]
        return {**data, "eval": evaluation}

    @property
    def loss_norm_constant(self) -> float:
        """The seq-mean-token-sum-norm divisor (tokens): `algorithm.loss_norm_constant`, else
        `rollout.max_response_length`."""
        return float(self.algorithm.loss_norm_constant or self.rollout.max_response_length)

    def data_plane_config(self) -> DataPlaneConfig:
        """The sections the data plane runs on (it never sees the run config)."""
        return DataPlaneConfig(
            rollout=self.rollout,
            data=self.data,
            reward=self.reward,
            sampling=self.algorithm.dynamic_sampling,
            advantage=self.algorithm.advantage,
            groups_per_step=self.training.prompts_per_step,
            run_name=self.metrics.run_name,
            policy_dtype=self.model.params_dtype,
            trainer_local_ranks=self.launch.nproc_per_node,
            routing=self.expert_routing(),
            eval=self.eval,
        )

    def expert_routing(self) -> ExpertRouting | None:
        """The routing the fleet returns with `algorithm.routing_replay: rollout`, else None."""
        moe = self.model.moe
        if self.algorithm.routing_replay == "none" or moe is None:
            return None
        return ExpertRouting(self.model.num_layers, moe.router_topk, moe.num_experts)

    @property
    def data_parallel_size(self) -> int:
        """Dense data-parallel replicas (world / (TP x PP))."""
        return self.launch.world_size // self.parallelism.model_parallel_size

    def _check_length_budget(self) -> None:
        """A prompt of `data.max_prompt_length` and a response of `rollout.max_response_length`
        fit the model's context (as the fleet serves it) and one micro-batch."""
        prompt, response = self.data.max_prompt_length, self.rollout.max_response_length
        sample = (
            f"data.max_prompt_length={prompt} + rollout.max_response_length={response} = "
            f"{prompt + response} tokens"
        )
        context = self.model.max_position_embeddings
        needed = sample_token_budget(prompt, response)
        if needed > context:
            raise ValueError(
                f"a sample of {sample} needs {needed} tokens of the model's context (the server "
                f"keeps some), more than model.max_position_embeddings={context}: lower the "
                "lengths"
            )
        if prompt + response > self.training.micro_batch_max_tokens:
            raise ValueError(
                f"a sample of {sample} does not fit one micro-batch, "
                f"training.micro_batch_max_tokens={self.training.micro_batch_max_tokens}: "
                "raise it or lower the lengths"
            )

    def _check_eval_length(self) -> None:
        """Every eval dataset's longest prompt plus `eval.max_response_length` fits the
        model's context as the fleet serves it."""
        context = self.model.max_position_embeddings
        response = self.eval.response_length(self.rollout)
        for dataset in self.eval.datasets:
            needed = sample_token_budget(dataset.max_prompt_length, response)
            if needed > context:
                raise ValueError(
                    f"eval dataset {dataset.name!r}: a prompt of max_prompt_length="
                    f"{dataset.max_prompt_length} and a response of eval.max_response_length="
                    f"{response} need {needed} tokens of the model's context (the server keeps "
                    f"some), more than model.max_position_embeddings={context}: lower them"
                )

    def _check_sft_length(self) -> None:
        """A pair of `sft.data.max_length` tokens fits the model's context and one
        micro-batch."""
        assert self.sft is not None
        length = self.sft.data.max_length
        for name, limit in (
            ("model.max_position_embeddings", self.model.max_position_embeddings),
            ("training.micro_batch_max_tokens", self.training.micro_batch_max_tokens),
        ):
            if length > limit:
                raise ValueError(
                    f"sft.data.max_length={length} exceeds {name}={limit}: a pair that long "
                    "would not fit; lower it"
                )

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
        if self.algorithm.routing_replay != "none" and (
            model.moe is None or model.moe.load_balancing_type == "sinkhorn"
        ):
            raise ValueError(
                f"algorithm.routing_replay={self.algorithm.routing_replay!r} replays top-k "
                "routes: it needs an MoE model (model.moe) whose load_balancing_type is not "
                "sinkhorn"
            )
        if model.moe is not None and par.tensor > 1 and not par.sequence_parallel:
            raise ValueError(
                "Megatron-Core requires parallelism.sequence_parallel=true for MoE with tensor > 1"
            )
        if self.algorithm.kl_coef > 0 and model.hf_checkpoint is None:
            raise ValueError(
                f"algorithm.kl_coef={self.algorithm.kl_coef} needs model.hf_checkpoint: the "
                "reference policy is the checkpoint the run starts from (also after a resume)"
            )
        if model.num_layers % (par.pipeline * (par.virtual_pipeline or 1)):
            raise ValueError(
                f"model.num_layers={model.num_layers} must split evenly over parallelism.pipeline="
                f"{par.pipeline} x virtual_pipeline={par.virtual_pipeline or 1} stages"
            )
        recompute = self.training.recompute
        layers_per_stage = model.num_layers // par.pipeline
        if recompute.granularity == "full" and recompute.num_layers > layers_per_stage:
            raise ValueError(
                f"training.recompute.num_layers={recompute.num_layers} exceeds the "
                f"{layers_per_stage} layers of a pipeline stage (model.num_layers / "
                "parallelism.pipeline)"
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
        if self.rollout.temperature <= 0:
            raise ValueError(
                f"rollout.temperature={self.rollout.temperature} must be > 0: the policy trains "
                "on the log-probs of sampled tokens"
            )
        self._check_length_budget()
        self._check_eval_length()
        if self.sft is not None:
            self._check_sft_length()
        if self.rollout.placement == "colocated":  # every server shares trainer ranks' GPUs
            nproc = self.launch.nproc_per_node
            embedded_server_gpus(self.rollout, trainer_local_ranks=nproc, visible_gpus=nproc)
        overlong = self.reward.overlong
        if overlong.soft_punishment and overlong.cache_length > self.rollout.max_response_length:
            raise ValueError(
                f"reward.overlong.cache_length={overlong.cache_length} exceeds "
                f"rollout.max_response_length={self.rollout.max_response_length}"
            )
        return self
