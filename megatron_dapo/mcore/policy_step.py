"""The policy's training on a rollout step's batch inside Megatron-Core's schedules.

    trainer = PolicyTrainer(run_config)            # after parallel.initialize_parallel; loads
                                                   # this rank's shards of model.hf_checkpoint
    result = trainer.train(train_batch)            # every rank passes the same TrainBatch:
                                                   # pi_old, then one optimizer step per
                                                   # mini-batch (`TrainResult`)

With `algorithm.old_log_probs: recompute` a forward-only pass of the schedule over every
mini-batch first gives pi_old of each micro-batch (on the last pipeline stage) and the
trainer/rollout mismatch, before the first update. With `algorithm.kl_coef > 0` the same
forward-only schedule runs the reference policy over every mini-batch too: a frozen copy of
the initial policy (`model.hf_checkpoint` loaded into chunks of the same layout and dtype, the
routers replaying the batch's routes like the policy's; no DDP, no optimizer, parameters that
do not require gradients), whose log-probs pi_ref every micro-batch then carries into the
loss's KL penalty. Both forward-only passes run the chunks in their default (training) mode
under `torch.no_grad`, so the reference computes bitwise what the policy computes with the
same weights: the KL of the first optimizer step is 0.

An optimizer step packs its mini-batch into micro-batches (`micro_batches`), split over DP
ranks; counts the GLOBAL loss normalisers (loss tokens and sequences, all-reduced over DP)
before running `get_forward_backward_func()` (1F1B over PP stages, interleaved with virtual
stages); on the last stage each micro-batch's per-token log-probs of the sampled tokens come
from the vocab-parallel logits (`logprobs`, never gathering the vocabulary), then the policy
objective (`megatron_dapo.algo.objective`, built once per optimizer step) gives that
micro-batch's exact share of the global loss and its statistics; Megatron DDP reduces the
gradients and Megatron's optimizer (AdamW, distributed optimizer if configured, global grad-norm
clipping) steps with the LR of `OptimizerParamScheduler` (linear warm-up from 0).

Packing: a micro-batch packs several samples (`micro_batches`); Transformer Engine attends
within each through THD packed-sequence parameters, the local spec through a block-diagonal
causal mask built on the device at forward time. With bf16/fp16 parameters the last stage hands
the logits over in the model's dtype (`Float16Module(fp32_output=False)`): the chunked
vocab-parallel log-prob/entropy upcasts one chunk at a time and returns float32.

Loss scaling (megatron-core 0.16.1, `calculate_per_token_loss=False`): the schedule divides the
returned loss by the local number of micro-batches M (`forward_step_calc_loss`) and DDP scales
gradients by 1/DP before summing them over DP ranks (`gradient_scaling_factor`, dense and expert
parameters alike). The loss function therefore returns `share * M * DP`, so the gradient is the
sum over all micro-batches of d(share)/d(theta) = d(global loss)/d(theta), however the batch
is split. The MoE load-balancing loss keeps Megatron's meaning: its mean over micro-batches.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_dapo.algo.aggregation import LossNormalizers, count_loss_normalizers
from megatron_dapo.algo.objective import ObjectiveConfig, ObjectiveStats, policy_objective
from megatron_dapo.algo.rollout_correction import RolloutMismatch, rollout_mismatch
from megatron_dapo.config.schema import RecomputeConfig, RunConfig
from megatron_dapo.hf.convert import load_hf_checkpoint
from megatron_dapo.mcore.logprobs import (
    vocab_parallel_log_probs,
    vocab_parallel_log_probs_and_entropy,
)
from megatron_dapo.mcore.micro_batches import (
    MicroBatch,
    MicroBatchPlan,
    build_micro_batch,
    plan_micro_batches,
)
from megatron_dapo.mcore.model import NO_RECOMPUTE, build_model_chunks
from megatron_dapo.mcore.parallel import model_device
from megatron_dapo.mcore.routing_replay import RoutingReplay
from pipeline.train_batch import TrainBatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerStepMetrics:
    """What one optimizer step did; identical on every rank.

    Attributes:
        loss: global policy loss (advantage units), the value whose gradient was applied.
        clip_fraction_low, clip_fraction_high, dual_clip_fraction: fractions of loss tokens.
        entropy: mean policy entropy per loss token (nats).
        approx_kl: mean k3 estimate of KL(pi_old || pi_theta) per loss token (nats).
        grad_norm: global gradient L2 norm before clipping.
        lr: learning rate of this step.
        num_loss_tokens: loss tokens of the mini-batch (the token-mean normaliser).
        num_microbatches: micro-batches per DP rank.
        padding_fraction: padding tokens / packed row slots.
        update_successful: False if the optimizer skipped the step (non-finite gradients).
        moe_aux_loss: load-balancing loss (without its coefficient), mean over MoE layers and
            micro-batches; None for dense models or without an aux loss.
        expert_load: tokens routed to each expert (top-k assignments) per MoE layer
            `[layer][expert]`, summed over the step (padding tokens included); None for dense
            models.
        reference_kl: mean estimate (`algorithm.kl_estimator`) of KL(pi_theta || pi_ref) per
            loss token (nats), the penalty's KL before its coefficient; None without a
            reference policy (`algorithm.kl_coef` 0).
    """

    loss: float
    clip_fraction_low: float
    clip_fraction_high: float
    dual_clip_fraction: float
    entropy: float
    approx_kl: float
    grad_norm: float
    lr: float
    num_loss_tokens: int
    num_microbatches: int
    padding_fraction: float
    update_successful: bool
    moe_aux_loss: float | None
    expert_load: list[list[int]] | None
    reference_kl: float | None = None


@dataclass(frozen=True)
class PackedMiniBatch:
    """One mini-batch packed for this rank.

    Attributes:
        plan: the packing plan, the same on every rank.
        micro_batches: this data-parallel rank's micro-batches, in schedule order.
        padding_fraction: padding tokens / packed row slots of the whole mini-batch.
    """

    plan: MicroBatchPlan
    micro_batches: tuple[MicroBatch, ...]
    padding_fraction: float


@dataclass(frozen=True)
class TrainResult:
    """What `PolicyTrainer.train` did with one rollout step's batch; the same on every rank.

    Attributes:
        optimizer_steps: one entry per mini-batch.
        mismatch: trainer/rollout mismatch of the batch's loss tokens; None when pi_old is the
            rollout's (`algorithm.old_log_probs: rollout`).
        old_log_prob_seconds: wall time of the forward-only passes before the first update
            (pi_old recomputed, reference log-probs); None when neither runs.
    """

    optimizer_steps: list[OptimizerStepMetrics]
    mismatch: RolloutMismatch | None
    old_log_prob_seconds: float | None


class _ExpertLoadCounter:
    """Counts routed tokens per (MoE layer, expert) with forward hooks on the routers, in
    training passes only (not the forward-only pass that recomputes pi_old)."""

    def __init__(
        self,
        chunks: list[torch.nn.Module],
        num_layers: int,
        num_experts: int,
        device: torch.device,
    ):
        from megatron.core.transformer.moe.router import TopKRouter

        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._count)

    def _count(self, router: torch.nn.Module, inputs: tuple, outputs: tuple) -> None:
        if not torch.is_grad_enabled():
            return  # a forward pass that does not train
        routing_map = outputs[1]  # [tokens, experts] bool
        self.counts[router.layer_number - 1] += routing_map.sum(0)

    def take(self) -> torch.Tensor:
        """The counts since the last call, summed over every rank (each token routes once)."""
        counts, self.counts = self.counts, torch.zeros_like(self.counts)
        dist.all_reduce(counts)
        return counts.cpu()


class PolicyTrainer:
    """Megatron-Core policy, optimizer and LR schedule of one run; `step` trains on a batch."""

    def __init__(self, config: RunConfig):
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel as DDP
        from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.config = config
        par = config.parallelism
        self._routing = config.expert_routing()
        # the checkpoint is loaded before the optimizer copies the parameters
        chunks = initial_policy_chunks(config, config.training.recompute)
        self.transformer_config = chunks[0].config
        self.reference = reference_policy_chunks(config) if config.algorithm.kl_coef > 0 else None
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=par.distributed_optimizer,
            check_for_nan_in_grad=False,
            average_in_collective=False,
        )
        self.chunks = [
            DDP(self.transformer_config, ddp_config, chunk, disable_bucketing=index > 0)
            for index, chunk in enumerate(chunks)
        ]
        self.transformer_config.no_sync_func = (
            [chunk.no_sync for chunk in self.chunks]
            if len(self.chunks) > 1
            else self.chunks[0].no_sync
        )
        self.transformer_config.finalize_model_grads_func = finalize_model_grads
        opt = config.optimizer
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=opt.lr,
                min_lr=opt.min_lr,
                weight_decay=opt.weight_decay,
                adam_beta1=opt.adam_beta1,
                adam_beta2=opt.adam_beta2,
                adam_eps=opt.adam_eps,
                clip_grad=opt.clip_grad,
                bf16=self.transformer_config.bf16,
                fp16=self.transformer_config.fp16,
                params_dtype=self.transformer_config.params_dtype,
                use_distributed_optimizer=par.distributed_optimizer,
            ),
            self.chunks,
        )
        total_steps = optimizer_steps_per_run(config)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if opt.lr_warmup_steps else opt.lr,
            max_lr=opt.lr,
            min_lr=opt.min_lr,
            lr_warmup_steps=opt.lr_warmup_steps,
            lr_decay_steps=max(total_steps, opt.lr_warmup_steps + 1),
            lr_decay_style=opt.lr_decay_style,
            start_wd=opt.weight_decay,
            end_wd=opt.weight_decay,
            wd_incr_steps=max(total_steps, 1),
            wd_incr_style="constant",
        )
        self.optimizer_steps = 0
        self._tp_group = parallel_state.get_tensor_model_parallel_group()
        self._dp_group = parallel_state.get_data_parallel_group()
        self._pp_group = parallel_state.get_pipeline_model_parallel_group()
        self._dp_rank = parallel_state.get_data_parallel_rank()
        self._dp_size = parallel_state.get_data_parallel_world_size()
        self._device = model_device()
        moe = config.model.moe
        self._expert_load = (
            _ExpertLoadCounter(self.chunks, config.model.num_layers, moe.num_experts, self._device)
            if moe is not None
            else None
        )
        self._routing_replay = (
            RoutingReplay(
                self.chunks + (self.reference or []), self.transformer_config.sequence_parallel
            )
            if self._routing is not None
            else None
        )
        self._log_prob_passes: dict[str, list[torch.nn.Module]] = {}
        """The forward-only passes before the first update: the `MicroBatch` log-prob field
        each one fills, and the chunks it runs."""
        if config.algorithm.old_log_probs == "recompute":
            self._log_prob_passes["old_log_probs"] = self.chunks
        if self.reference is not None:
            self._log_prob_passes["ref_log_probs"] = self.reference
        self._last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)

    @property
    def models(self) -> list[torch.nn.Module]:
        """This rank's `GPTModel` chunks without their DDP / Float16Module wrappers."""
        from megatron.core.distributed import DistributedDataParallel
        from megatron.core.transformer.module import Float16Module
        from megatron.core.utils import unwrap_model

        return unwrap_model(self.chunks, (DistributedDataParallel, Float16Module))

    def train(self, batch: TrainBatch) -> TrainResult:
        """One rollout step's batch (the same on every rank): pi_old recomputed
        (`algorithm.old_log_probs: recompute`) and the reference log-probs computed
        (`algorithm.kl_coef > 0`) for the whole batch first, then one optimizer step per
        mini-batch of `training.mini_batch_size` samples, in batch order."""
        size = self.config.training.mini_batch_size
        if batch.num_samples % size:
            raise ValueError(
                f"{batch.num_samples} samples do not split into mini-batches of {size}"
            )
        mini_batches = [
            self._pack(batch.select(torch.arange(start, start + size)))
            for start in range(0, batch.num_samples, size)
        ]
        return self._train(mini_batches)

    def step(self, batch: TrainBatch) -> OptimizerStepMetrics:
        """One optimizer step on all of `batch` (pi_old and pi_ref first if configured)."""
        return self._train([self._pack(batch)]).optimizer_steps[0]

    def _train(self, mini_batches: list[PackedMiniBatch]) -> TrainResult:
        started = time.perf_counter()
        mismatch = seconds = None
        if self._log_prob_passes:
            mini_batches = [self._with_log_probs(mini_batch) for mini_batch in mini_batches]
            if "old_log_probs" in self._log_prob_passes:
                mismatch = self._rollout_mismatch(mini_batches)
            seconds = time.perf_counter() - started
        steps = [self._optimize(mini_batch) for mini_batch in mini_batches]
        return TrainResult(steps, mismatch, seconds)

    def _pack(self, batch: TrainBatch) -> PackedMiniBatch:
        """`batch` packed into this DP rank's micro-batches (the same plan on every rank)."""
        if self._routing is not None:
            self._routing.check(batch.routed_experts)
        par, training = self.config.parallelism, self.config.training
        sequence_parallel = self.transformer_config.sequence_parallel
        plan = plan_micro_batches(
            batch,
            training.micro_batch_max_tokens,
            self._dp_size,
            pad_multiple=par.tensor if sequence_parallel else 1,
            common_length=par.pipeline > 1,
            per_rank_multiple=par.pipeline if par.virtual_pipeline else 1,
        )
        micro_batches = tuple(
            build_micro_batch(batch, samples, plan.row_length, plan.pad_multiple)
            for samples in plan.bins[self._dp_rank]
        )
        return PackedMiniBatch(plan, micro_batches, plan.padding_fraction(batch))

    def _run_schedule(
        self,
        forward_step: Callable,
        mini_batch: PackedMiniBatch,
        forward_only: bool,
        chunks: list[torch.nn.Module] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Megatron-Core's forward(-backward) schedule of `chunks` (default: the policy's) over
        the mini-batch's micro-batches; the loss functions' dicts, in micro-batch order, on the
        last pipeline stage (else [])."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        chunks = chunks or self.chunks
        micro_batches = mini_batch.micro_batches
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro_batches) for _ in chunks],
            model=chunks,
            num_microbatches=mini_batch.plan.num_microbatches,
            seq_length=mini_batch.plan.row_length or max(mb.length for mb in micro_batches),
            micro_batch_size=1,
            forward_only=forward_only,
        )
        if self._routing_replay is not None:
            self._routing_replay.clear()
        return outputs

    @torch.no_grad()
    def _with_log_probs(self, mini_batch: PackedMiniBatch) -> PackedMiniBatch:
        """`mini_batch` with the log-probs of each forward-only pass (`_log_prob_passes`: pi_old
        from the current policy, pi_ref from the reference policy) in its micro-batches, on the
        last pipeline stage; other stages keep theirs, which they never use."""
        for field, chunks in self._log_prob_passes.items():
            outputs = self._run_schedule(self._forward_log_probs, mini_batch, True, chunks)
            if not outputs:  # not the last pipeline stage
                continue
            micro_batches = tuple(
                dataclasses.replace(mb, **{field: out["log_probs"]})
                for mb, out in zip(mini_batch.micro_batches, outputs, strict=True)
            )
            mini_batch = dataclasses.replace(mini_batch, micro_batches=micro_batches)
        return mini_batch

    def _rollout_mismatch(self, mini_batches: list[PackedMiniBatch]) -> RolloutMismatch:
        """The trainer/rollout mismatch of the recomputed pi_old over the whole batch, reduced
        over every rank."""
        correction = self.config.algorithm.rollout_correction
        mismatch = None
        if self._last_stage:  # the only stage that recomputed pi_old
            for mb in (mb for mini_batch in mini_batches for mb in mini_batch.micro_batches):
                part = rollout_mismatch(
                    mb.old_log_probs,
                    mb.rollout_log_probs,
                    mb.loss_mask,
                    mb.sequence_ids,
                    correction.mode,
                    correction.threshold,
                )
                mismatch = part if mismatch is None else mismatch + part
        return self._reduce_mismatch(mismatch)

    def _reduce_mismatch(self, mismatch: RolloutMismatch | None) -> RolloutMismatch:
        """The mismatch of every rank's micro-batches (only the last stage measured any)."""
        if mismatch is None:
            zero = torch.zeros((), dtype=torch.float64)
            mismatch = RolloutMismatch(zero, zero, zero, zero, zero)
        sums = mismatch.sums().to(self._device)  # measured on the host copies of pi_old
        largest = mismatch.max_abs_diff.reshape(1).to(self._device, copy=True)
        for group in (self._pp_group, self._dp_group):
            dist.all_reduce(sums, group=group)
            dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
        return RolloutMismatch.from_reduced(sums, largest[0])

    def _optimize(self, mini_batch: PackedMiniBatch) -> OptimizerStepMetrics:
        """One optimizer step on a packed mini-batch; see the module doc."""
        plan, micro_batches = mini_batch.plan, mini_batch.micro_batches
        normalizers = self._global_normalizers(micro_batches)
        objective = self.config.algorithm.objective_at(self.optimizer_steps)
        scale = plan.num_microbatches * self._dp_size
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.scheduler.step(1)
        forward_step = partial(self._forward_step, normalizers, objective, scale)
        outputs = self._run_schedule(forward_step, mini_batch, forward_only=False)
        stats = self._reduce_stats(outputs)
        loss = float(stats.loss)
        if self._is_finite(loss):
            update_successful, grad_norm, _ = self.optimizer.step()
        else:
            update_successful, grad_norm = False, float("nan")
            self._skip_nonfinite_step(loss)
        self.optimizer_steps += 1
        return OptimizerStepMetrics(
            loss=loss,
            clip_fraction_low=stats.clip_fraction_low(),
            clip_fraction_high=stats.clip_fraction_high(),
            dual_clip_fraction=stats.dual_clip_fraction(),
            entropy=stats.mean_entropy(),
            approx_kl=stats.mean_approx_kl(),
            grad_norm=float(grad_norm) if grad_norm is not None else 0.0,
            lr=self.optimizer.param_groups[0]["lr"],
            num_loss_tokens=normalizers.num_tokens,
            num_microbatches=plan.num_microbatches,
            padding_fraction=mini_batch.padding_fraction,
            update_successful=bool(update_successful),
            moe_aux_loss=self._take_aux_loss(plan.num_microbatches),
            expert_load=self._expert_load.take().tolist() if self._expert_load else None,
            reference_kl=stats.mean_reference_kl() if self.reference is not None else None,
        )

    def _is_finite(self, loss: float) -> bool:
        """Whether the global loss and every rank's gradients are finite (collective)."""
        grads = [
            param.main_grad if hasattr(param, "main_grad") else param.grad
            for chunk in self.chunks
            for param in chunk.parameters()
        ]
        finite = torch.stack([torch.isfinite(g).all() for g in grads if g is not None]).all()
        flag = (finite & math.isfinite(loss)).float().reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _skip_nonfinite_step(self, loss: float) -> None:
        """Drop this step's gradients, or raise when `training.on_nonfinite` is `stop`."""
        message = (
            f"optimizer step {self.optimizer_steps + 1}: non-finite loss ({loss}) or gradients"
        )
        if self.config.training.on_nonfinite == "stop":
            raise FloatingPointError(f"{message} (training.on_nonfinite=stop)")
        logger.warning("%s: skipped, parameters unchanged (training.on_nonfinite=skip)", message)
        self.optimizer.zero_grad()

    def _global_normalizers(self, micro_batches: list[MicroBatch]) -> LossNormalizers:
        local = count_loss_normalizers(
            [mb.loss_mask for mb in micro_batches], [mb.sequence_ids for mb in micro_batches]
        )
        counts = torch.tensor(
            [local.num_tokens, local.num_sequences], dtype=torch.int64, device=self._device
        )
        dist.all_reduce(counts, group=self._dp_group)
        return LossNormalizers(int(counts[0]), int(counts[1]), self.config.loss_norm_constant)

    def _next_on_device(self, data_iterator) -> MicroBatch:
        micro_batch = next(data_iterator)
        return dataclasses.replace(
            micro_batch,
            **{
                f.name: getattr(micro_batch, f.name).to(self._device)
                for f in dataclasses.fields(micro_batch)
                if isinstance(getattr(micro_batch, f.name), torch.Tensor)
            },
        )

    def _forward(self, micro_batch: MicroBatch, model: torch.nn.Module) -> torch.Tensor:
        """Last stage: logits `[1, T, V / TP]` in the model's dtype; else the hidden states.
        With routing replay the MoE routers take the micro-batch's routes."""
        kwargs = {} if self.config.model.params_dtype == "float32" else {"fp32_output": False}
        if self.config.model.transformer_impl == "transformer_engine":
            kwargs["packed_seq_params"] = micro_batch.packed_seq_params()
            mask = None
        else:
            mask = micro_batch.attention_mask()
        replay = self._routing_replay
        if replay is not None:
            replay.before_forward(model, micro_batch.routed_experts)
        output = model(micro_batch.tokens, micro_batch.position_ids, mask, **kwargs)
        if replay is not None:
            replay.after_forward(model, output)
        return output

    def _forward_step(
        self,
        normalizers: LossNormalizers,
        objective: ObjectiveConfig,
        scale: int,
        data_iterator,
        model: torch.nn.Module,
    ):
        micro_batch = self._next_on_device(data_iterator)
        loss = partial(self._loss, micro_batch, normalizers, objective, scale)
        return self._forward(micro_batch, model), loss

    def _forward_log_probs(self, data_iterator, model: torch.nn.Module):
        """Forward-only step: the loss function hands back the targets' log-probs `[1, T]`."""
        micro_batch = self._next_on_device(data_iterator)

        def log_probs(logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            values = vocab_parallel_log_probs(
                logits,
                micro_batch.targets,
                tp_group=self._tp_group,
                chunk_size=self.config.training.log_prob_chunk_size,
                temperature=self.config.rollout.temperature,
            )
            masked = torch.where(micro_batch.loss_mask, values, 0.0)
            return logits.new_zeros(()), {"log_probs": masked.cpu()}

        return self._forward(micro_batch, model), log_probs

    def _loss(
        self,
        micro_batch: MicroBatch,
        normalizers: LossNormalizers,
        objective: ObjectiveConfig,
        scale: int,
        logits: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scaled share of the global loss of one micro-batch; logits `[1, T, V / TP]`."""
        log_probs, entropy = vocab_parallel_log_probs_and_entropy(
            logits,
            micro_batch.targets,
            tp_group=self._tp_group,
            chunk_size=self.config.training.log_prob_chunk_size,
            temperature=self.config.rollout.temperature,
        )
        share, stats = policy_objective(
            log_probs,
            entropy,
            micro_batch.old_log_probs,
            micro_batch.advantages,
            micro_batch.loss_mask,
            micro_batch.sequence_ids,
            normalizers,
            objective,
            rollout_log_probs=micro_batch.rollout_log_probs,
            ref_log_probs=micro_batch.ref_log_probs,
        )
        return share * scale, {"stats": stats.as_tensor().detach()}

    def _reduce_stats(self, outputs: list[dict[str, torch.Tensor]]) -> ObjectiveStats:
        """Sum the micro-batch statistics of the last stage and share them with every rank."""
        total = torch.zeros(
            len(dataclasses.fields(ObjectiveStats)), dtype=torch.float64, device=self._device
        )
        for output in outputs:
            total += output["stats"]
        dist.all_reduce(total, group=self._pp_group)  # only the last stage has non-zeros
        dist.all_reduce(total, group=self._dp_group)
        return ObjectiveStats.from_tensor(total.cpu())

    def _take_aux_loss(self, num_microbatches: int) -> float | None:
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker,
            get_moe_layer_wise_logging_tracker,
            reduce_aux_losses_tracker_across_ranks,
        )

        tracker = get_moe_layer_wise_logging_tracker()
        if "load_balancing_loss" not in tracker:
            return None
        reduce_aux_losses_tracker_across_ranks(["load_balancing_loss"])
        per_layer = tracker["load_balancing_loss"]["values"] / num_microbatches
        clear_aux_losses_tracker()
        return float(per_layer.mean())


def initial_policy_chunks(
    config: RunConfig, recompute: RecomputeConfig = NO_RECOMPUTE
) -> list[torch.nn.Module]:
    """This rank's chunks of the policy as the run starts: `model.hf_checkpoint` loaded if
    set, wrapped in `Float16Module` for 16-bit `model.params_dtype`; MoE routers can replay
    routes when the run replays them (`algorithm.routing_replay`)."""
    from megatron.core.transformer.module import Float16Module

    chunks = build_model_chunks(
        config.model, config.parallelism, recompute, config.expert_routing() is not None
    )
    if config.model.hf_checkpoint is not None:
        load_hf_checkpoint(chunks, config.model.hf_checkpoint)
    if config.model.params_dtype == "float32":
        return chunks
    return [Float16Module(chunk.config, chunk) for chunk in chunks]


def reference_policy_chunks(config: RunConfig) -> list[torch.nn.Module]:
    """The frozen reference policy of a run with `algorithm.kl_coef > 0`: this rank's chunks
    of `model.hf_checkpoint` in the policy's layout and dtype, whose parameters do not require
    gradients (no recompute: there is no backward pass). Memory: this rank's parameters once
    more, x bytes of `model.params_dtype`; no gradient buffers, no optimizer state."""
    chunks = initial_policy_chunks(config)
    for chunk in chunks:
        chunk.requires_grad_(False)
    frozen = sum(p.numel() * p.element_size() for chunk in chunks for p in chunk.parameters())
    logger.info("reference policy: %.1f MiB of frozen parameters on this rank", frozen / 2**20)
    return chunks


def optimizer_steps_per_run(config: RunConfig) -> int:
    """Optimizer steps of the whole run: rollout steps x mini-batches per rollout step."""
    responses = config.training.prompts_per_step * config.rollout.n_samples_per_prompt
    return config.training.steps * (responses // config.training.mini_batch_size)
