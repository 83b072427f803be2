"""What every trainer of the policy shares: Megatron-Core chunks in DDP, Megatron's optimizer and
LR schedule, packing into micro-batches and the forward-backward schedule with global loss
normalisers.

    class MyTrainer(MegatronTrainer):            # PolicyTrainer (RL), SFTTrainer (supervised)
        def step(self, batch):
            mini_batch = self._pack(batch)
            normalizers = self._global_normalizers(mini_batch.micro_batches)
            stats = self._forward_backward(mini_batch, partial(my_loss, normalizers), width)
            update_successful, grad_norm = self._apply_gradients(float(stats[0]))

An optimizer step packs its mini-batch into micro-batches (`micro_batches`), split over DP
ranks; counts the GLOBAL loss normalisers (loss tokens and sequences, all-reduced over DP)
before running `get_forward_backward_func()` (1F1B over PP stages, interleaved with virtual
stages); on the last stage each micro-batch's loss function (the subclass's: logits `[1, T,
V / TP]` -> the micro-batch's exact share of the global loss and a vector of summable
statistics) runs on the vocab-parallel logits; Megatron DDP reduces the gradients and Megatron's
optimizer (AdamW, distributed optimizer if configured, global grad-norm clipping) steps with the
LR of `OptimizerParamScheduler` (linear warm-up from 0).

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
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_dapo.algo.aggregation import LossNormalizers, count_loss_normalizers
from megatron_dapo.config.schema import OptimizerConfig, RunConfig
from megatron_dapo.mcore.micro_batches import (
    MicroBatch,
    MicroBatchPlan,
    build_micro_batch,
    plan_micro_batches,
)
from megatron_dapo.mcore.parallel import model_device
from megatron_dapo.mcore.routing_replay import RoutingReplay
from pipeline.train_batch import TrainBatch

logger = logging.getLogger(__name__)

MicroBatchLoss = Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""A micro-batch's loss: (micro-batch on the device, last-stage logits `[1, T, V / TP]`) ->
(its 0-dim differentiable share of the global loss, a detached float64 `[K]` vector of
statistics that sum over micro-batches and ranks)."""


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


class MegatronTrainer:
    """This rank's policy chunks in Megatron DDP, its optimizer and LR schedule; the subclass
    defines what a step computes (see the module doc).

    Args:
        config: the run; `model`, `parallelism` and `training` (packing, recompute, non-finite
            policy) shape the trainer.
        chunks: this rank's model chunks as the run starts (`initial_policy_chunks`), loaded
            before the optimizer copies the parameters.
        optimizer: AdamW and its LR schedule.
        total_steps: optimizer steps of the whole run (the LR decay and weight-decay horizon).
    """

    def __init__(
        self,
        config: RunConfig,
        chunks: list[torch.nn.Module],
        optimizer: OptimizerConfig,
        total_steps: int,
    ):
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel as DDP
        from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.config = config
        par = config.parallelism
        self.transformer_config = chunks[0].config
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
        opt = optimizer
        self.optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(
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
        self._routing_replay: RoutingReplay | None = None
        """Set by a trainer whose batches carry the fleet's routes (`algorithm.routing_replay`)."""
        self._last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)

    @property
    def models(self) -> list[torch.nn.Module]:
        """This rank's `GPTModel` chunks without their DDP / Float16Module wrappers."""
        from megatron.core.distributed import DistributedDataParallel
        from megatron.core.transformer.module import Float16Module
        from megatron.core.utils import unwrap_model

        return unwrap_model(self.chunks, (DistributedDataParallel, Float16Module))

    def _pack(self, batch: TrainBatch) -> PackedMiniBatch:
        """`batch` packed into this DP rank's micro-batches (the same plan on every rank)."""
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

    def _forward_backward(
        self, mini_batch: PackedMiniBatch, loss: MicroBatchLoss, num_stats: int
    ) -> torch.Tensor:
        """Gradients of the global loss over the mini-batch (the sum of `loss`'s shares of every
        micro-batch on every rank) in the DDP buffers, with the LR schedule advanced by one
        step; returns the `[num_stats]` float64 statistics summed over every micro-batch and
        rank (host copy, the same on every rank). The optimizer has not stepped yet
        (`_apply_gradients`)."""
        scale = mini_batch.plan.num_microbatches * self._dp_size
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.scheduler.step(1)
        forward_step = partial(self._forward_step, loss, scale)
        outputs = self._run_schedule(forward_step, mini_batch, forward_only=False)
        return self._reduce_stats(outputs, num_stats)

    def _apply_gradients(self, loss: float) -> tuple[bool, float]:
        """The optimizer step on the gradients of `_forward_backward` whose global loss is
        `loss`, skipped (or raised, `training.on_nonfinite`) when the loss or any gradient is
        not finite; (update_successful, global grad norm before clipping; nan if skipped)."""
        if self._is_finite(loss):
            update_successful, grad_norm, _ = self.optimizer.step()
        else:
            update_successful, grad_norm = False, float("nan")
            self._skip_nonfinite_step(loss)
        self.optimizer_steps += 1
        return bool(update_successful), float(grad_norm) if grad_norm is not None else 0.0

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

    def _global_normalizers(self, micro_batches: tuple[MicroBatch, ...]) -> LossNormalizers:
        """Loss tokens and sequences of every DP rank's micro-batches (collective over DP)."""
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
        self, loss: MicroBatchLoss, scale: int, data_iterator, model: torch.nn.Module
    ) -> tuple[torch.Tensor, Callable]:
        micro_batch = self._next_on_device(data_iterator)
        return self._forward(micro_batch, model), partial(
            self._scaled_loss, loss, micro_batch, scale
        )

    @staticmethod
    def _scaled_loss(
        loss: MicroBatchLoss, micro_batch: MicroBatch, scale: int, logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's share of the global loss times `scale` (= M x DP, see the module
        doc) and its statistics, as the schedule expects them; logits `[1, T, V / TP]`."""
        share, stats = loss(micro_batch, logits)
        return share * scale, {"stats": stats}

    def _reduce_stats(self, outputs: list[dict[str, torch.Tensor]], num_stats: int) -> torch.Tensor:
        """Sum the micro-batch statistics `[num_stats]` of the last stage and share them with
        every rank (host copy)."""
        total = torch.zeros(num_stats, dtype=torch.float64, device=self._device)
        for output in outputs:
            total += output["stats"]
        dist.all_reduce(total, group=self._pp_group)  # only the last stage has non-zeros
        dist.all_reduce(total, group=self._dp_group)
        return total.cpu()

    def _take_aux_loss(self, num_microbatches: int) -> float | None:
        """The MoE load-balancing loss of the last step (mean over layers and micro-batches),
        collective; None for dense models or without an aux loss."""
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
