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

An optimizer step (`megatron_dapo.mcore.trainer`: packing, global normalisers, the schedule,
loss scaling, DDP, Megatron's optimizer) gets on the last stage each micro-batch's per-token
log-probs of the sampled tokens from the vocab-parallel logits (`logprobs`, never gathering the
vocabulary); the policy objective (`megatron_dapo.algo.objective`, built once per optimizer step)
gives that micro-batch's exact share of the global loss and its statistics.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_dapo.algo.aggregation import LossNormalizers
from megatron_dapo.algo.objective import ObjectiveConfig, ObjectiveStats, policy_objective
from megatron_dapo.algo.rollout_correction import RolloutMismatch, rollout_mismatch
from megatron_dapo.config.schema import RecomputeConfig, RunConfig
from megatron_dapo.hf.convert import load_hf_checkpoint
from megatron_dapo.mcore.logprobs import (
    vocab_parallel_log_probs,
    vocab_parallel_log_probs_and_entropy,
)
from megatron_dapo.mcore.micro_batches import MicroBatch
from megatron_dapo.mcore.model import NO_RECOMPUTE, build_model_chunks
from megatron_dapo.mcore.routing_replay import RoutingReplay
from megatron_dapo.mcore.trainer import MegatronTrainer, PackedMiniBatch
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


class PolicyTrainer(MegatronTrainer):
    """Megatron-Core policy, optimizer and LR schedule of one run; `step` trains on a batch."""

    def __init__(self, config: RunConfig):
        self._routing = config.expert_routing()
        # the checkpoint is loaded before the optimizer copies the parameters
        chunks = initial_policy_chunks(config, config.training.recompute)
        self.reference = reference_policy_chunks(config) if config.algorithm.kl_coef > 0 else None
        super().__init__(config, chunks, config.optimizer, optimizer_steps_per_run(config))
        if self._routing is not None:
            self._routing_replay = RoutingReplay(
                self.chunks + (self.reference or []), self.transformer_config.sequence_parallel
            )
        self._log_prob_passes: dict[str, list[torch.nn.Module]] = {}
        """The forward-only passes before the first update: the `MicroBatch` log-prob field
        each one fills, and the chunks it runs."""
        if config.algorithm.old_log_probs == "recompute":
            self._log_prob_passes["old_log_probs"] = self.chunks
        if self.reference is not None:
            self._log_prob_passes["ref_log_probs"] = self.reference

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
        """`batch` packed into this DP rank's micro-batches, its routes checked first."""
        if self._routing is not None:
            self._routing.check(batch.routed_experts)
        return super()._pack(batch)

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
        plan = mini_batch.plan
        normalizers = self._global_normalizers(mini_batch.micro_batches)
        objective = self.config.algorithm.objective_at(self.optimizer_steps)
        loss = partial(self._loss, normalizers, objective)
        num_stats = len(dataclasses.fields(ObjectiveStats))
        stats = ObjectiveStats.from_tensor(self._forward_backward(mini_batch, loss, num_stats))
        update_successful, grad_norm = self._apply_gradients(float(stats.loss))
        return OptimizerStepMetrics(
            loss=float(stats.loss),
            clip_fraction_low=stats.clip_fraction_low(),
            clip_fraction_high=stats.clip_fraction_high(),
            dual_clip_fraction=stats.dual_clip_fraction(),
            entropy=stats.mean_entropy(),
            approx_kl=stats.mean_approx_kl(),
            grad_norm=grad_norm,
            lr=self.optimizer.param_groups[0]["lr"],
            num_loss_tokens=normalizers.num_tokens,
            num_microbatches=plan.num_microbatches,
            padding_fraction=mini_batch.padding_fraction,
            update_successful=update_successful,
            moe_aux_loss=self._take_aux_loss(plan.num_microbatches),
            expert_load=self._expert_load.take().tolist() if self._expert_load else None,
            reference_kl=stats.mean_reference_kl() if self.reference is not None else None,
        )

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
        normalizers: LossNormalizers,
        objective: ObjectiveConfig,
        micro_batch: MicroBatch,
        logits: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Share of the global loss of one micro-batch and its `ObjectiveStats` as a tensor;
        logits `[1, T, V / TP]`."""
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
        return share, stats.as_tensor().detach()


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
