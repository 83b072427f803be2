"""Supervised fine-tuning steps of the policy inside Megatron-Core's schedules.

    trainer = SFTTrainer(run_config, total_steps)   # after parallel.initialize_parallel; loads
                                                    # this rank's shards of model.hf_checkpoint
    metrics = trainer.step(batch)                   # every rank passes the same TrainBatch
                                                    # (`pipeline.sft_data`): one optimizer step

The policy, its layout, packing, schedule, DDP, optimizer and LR schedule are the RL trainer's
(`megatron_dapo.mcore.trainer`); only the loss differs: on the last stage each micro-batch's
log-probs of its targets come from the vocab-parallel logits at temperature 1 (`logprobs`,
never gathering the vocabulary) and `megatron_dapo.algo.sft.sft_loss` gives its share of the
step's mean negative log-likelihood per response token. MoE routers route by themselves (no
routing replay: no fleet chose the experts); their load-balancing loss trains as in RL.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from megatron_dapo.algo.aggregation import LossNormalizers
from megatron_dapo.algo.sft import sft_loss
from megatron_dapo.config.schema import RunConfig
from megatron_dapo.mcore.logprobs import vocab_parallel_log_probs
from megatron_dapo.mcore.micro_batches import MicroBatch
from megatron_dapo.mcore.policy_step import initial_policy_chunks
from megatron_dapo.mcore.trainer import MegatronTrainer
from pipeline.train_batch import TrainBatch


@dataclass(frozen=True)
class SFTStepMetrics:
    """What one supervised optimizer step did; identical on every rank.

    Attributes:
        loss: mean negative log-likelihood per response token of the batch (nats), before the
            update: the value whose gradient was applied.
        grad_norm: global gradient L2 norm before clipping (nan if the step was skipped).
        lr: learning rate of this step.
        num_loss_tokens: response tokens of the batch (the token-mean normaliser).
        num_tokens: prompt and response tokens of the batch (what the model ran on).
        num_microbatches: micro-batches per DP rank.
        padding_fraction: padding tokens / packed row slots.
        update_successful: False if the optimizer skipped the step (non-finite gradients).
        moe_aux_loss: load-balancing loss (without its coefficient), mean over MoE layers and
            micro-batches; None for dense models or without an aux loss.
    """

    loss: float
    grad_norm: float
    lr: float
    num_loss_tokens: int
    num_tokens: int
    num_microbatches: int
    padding_fraction: float
    update_successful: bool
    moe_aux_loss: float | None


class SFTTrainer(MegatronTrainer):
    """The policy of `config` trained by next-token prediction on response tokens.

    Args:
        config: the run; `sft` must be set (its optimizer, else `optimizer`).
        total_steps: optimizer steps of the whole warm-up (the LR schedule's horizon).
    """

    def __init__(self, config: RunConfig, total_steps: int):
        if config.sft is None:
            raise ValueError("SFTTrainer needs the run config's sft section")
        no_replay = config.algorithm.model_copy(update={"routing_replay": "none"})
        config = config.model_copy(update={"algorithm": no_replay})
        chunks = initial_policy_chunks(config, config.training.recompute)
        super().__init__(config, chunks, config.sft.optimizer or config.optimizer, total_steps)

    def step(self, batch: TrainBatch) -> SFTStepMetrics:
        """One optimizer step on all of `batch` (its loss mask: the response tokens)."""
        mini_batch = self._pack(batch)
        plan = mini_batch.plan
        normalizers = self._global_normalizers(mini_batch.micro_batches)
        loss = partial(self._loss, normalizers)
        stats = self._forward_backward(mini_batch, loss, num_stats=1)
        update_successful, grad_norm = self._apply_gradients(float(stats[0]))
        return SFTStepMetrics(
            loss=float(stats[0]),
            grad_norm=grad_norm,
            lr=self.optimizer.param_groups[0]["lr"],
            num_loss_tokens=normalizers.num_tokens,
            num_tokens=batch.num_tokens,
            num_microbatches=plan.num_microbatches,
            padding_fraction=mini_batch.padding_fraction,
            update_successful=update_successful,
            moe_aux_loss=self._take_aux_loss(plan.num_microbatches),
        )

    def _loss(
        self, normalizers: LossNormalizers, micro_batch: MicroBatch, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch's share of the step's loss and, as its one statistic, that share
        (float64 `[1]`); logits `[1, T, V / TP]`."""
        log_probs = vocab_parallel_log_probs(
            logits,
            micro_batch.targets,
            tp_group=self._tp_group,
            chunk_size=self.config.training.log_prob_chunk_size,
        )
        share = sft_loss(log_probs, micro_batch.loss_mask, micro_batch.sequence_ids, normalizers)
        return share, share.detach().to(torch.float64).reshape(1)
