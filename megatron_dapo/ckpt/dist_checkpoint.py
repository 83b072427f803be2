"""Megatron distributed checkpoints (`dist_checkpointing`) of a `PolicyTrainer`.

One checkpoint directory holds the model chunks and the optimizer state as sharded tensors
(torch_dist format, resharded on load: it may be loaded with another DP size, TP/PP/EP layout
included where Megatron-Core supports it), plus the LR scheduler state and the optimizer-step
counter as common state. The distributed optimizer is saved in its `fully_reshardable` format
(Megatron-Core 0.16.1's default format fails for it on load). That format gathers the stage's
whole Adam state on every DP rank while saving (SmolLM2-135M with DP2: +3.9 GiB per rank, 13.5
GiB used on the machine during the save). Its `dp_reshardable` format copies nothing (+0.5 GiB)
but is unusable with expert parallelism in Megatron-Core 0.16.1: the EP2 e2e exact-resume test
diverges with it (step 2 loss -0.0174 resumed vs -0.0132 uninterrupted), though the two EP ranks'
expert optimizers name their shards apart (`data_parallel_group_idx` 0 and 1) and the layout
parity tests resume EP2 within tolerance; the cause is not found yet.

Entry scripts that save must guard their code with `if __name__ == "__main__":`: the torch_dist
writer starts processes with the `spawn` method, which re-imports the main module. One of them,
the `multiprocessing` manager serving the writer's result queue, lives as long as the rank; it is
started here so that it dies with the rank (`pipeline.parent_death`) instead of living on as an
orphan of ~0.5 GiB (the main module's imports) when the rank is SIGKILLed.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.managers import SyncManager
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_dapo.config.schema import RunConfig
from megatron_dapo.mcore.parallel import model_device
from megatron_dapo.mcore.policy_step import PolicyTrainer

_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}

_writer_queue_manager: SyncManager | None = None
"""The manager process behind the torch_dist writer's result queue, once the rank has saved."""


def check_checkpointable(config: RunConfig) -> None:
    """Refuse layouts whose checkpoints do not resume exactly (found by the parity tests).

    Raises:
        NotImplementedError: tied embeddings with virtual pipeline stages: the saved optimizer
            copy of the shared embedding is not the trained one (megatron-core 0.16.1, the
            model weights themselves are saved correctly), so a resumed run diverges.
    """
    if config.model.tie_embeddings and config.parallelism.virtual_pipeline:
        raise NotImplementedError(
            "checkpoints of tied embeddings with parallelism.virtual_pipeline do not resume "
            "exactly; set model.tie_embeddings=false or drop virtual_pipeline"
        )


def _model_key(index: int, num_chunks: int) -> str:
    return "model" if num_chunks == 1 else f"model{index}"


def _sharded_state_dict(trainer: PolicyTrainer, is_loading: bool) -> dict:
    modules = trainer.models
    state = {
        _model_key(i, len(modules)): module.sharded_state_dict() for i, module in enumerate(modules)
    }
    model_state = state if len(modules) > 1 else state["model"]
    state["optimizer"] = trainer.optimizer.sharded_state_dict(
        model_state, is_loading=is_loading, metadata=_OPTIMIZER_METADATA
    )
    state["scheduler"] = trainer.scheduler.state_dict()
    state["optimizer_steps"] = trainer.optimizer_steps
    return state


def save_checkpoint(trainer: PolicyTrainer, directory: str | Path) -> None:
    """Write model, optimizer, scheduler and step counter to the new directory `directory`.

    Collective: every rank calls it. Raises FileExistsError if `directory` already exists.
    """
    from megatron.core import dist_checkpointing

    check_checkpointable(trainer.config)
    directory = Path(directory)
    failed = torch.zeros(1, device=model_device())
    if dist.get_rank() == 0:
        try:
            directory.mkdir(parents=True)
        except FileExistsError:
            failed += 1
    dist.all_reduce(failed)
    if failed.item():
        raise FileExistsError(f"checkpoint directory {directory} already exists")
    _start_writer_queue_dying_with_this_rank()
    dist_checkpointing.save(_sharded_state_dict(trainer, is_loading=False), str(directory))


def _start_writer_queue_dying_with_this_rank() -> None:
    """Give Megatron-Core's torch_dist writer its result queue (`filesystem_async._results_queue`,
    which it would otherwise create on the first save) from a manager process that gets SIGKILL
    when this rank exits. Idempotent."""
    global _writer_queue_manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from pipeline.parent_death import exit_with_parent

    if _writer_queue_manager is not None:
        return
    _writer_queue_manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    _writer_queue_manager.start(initializer=exit_with_parent)
    filesystem_async._results_queue = _writer_queue_manager.Queue()


def load_checkpoint(trainer: PolicyTrainer, directory: str | Path) -> None:
    """Restore a checkpoint written by `save_checkpoint` (any DP size) into `trainer`.

    Collective: every rank calls it.
    """
    from megatron.core import dist_checkpointing

    check_checkpointable(trainer.config)
    _initialize_distributed_optimizer_state(trainer.optimizer)
    loaded = dist_checkpointing.load(_sharded_state_dict(trainer, is_loading=True), str(directory))
    modules = trainer.models
    for index, module in enumerate(modules):
        module.load_state_dict(loaded[_model_key(index, len(modules))])
    with torch.no_grad():  # fp32 + distributed optimizer: main params are views of the model's
        trainer.optimizer.load_state_dict(loaded["optimizer"])
    unalias_adam_steps(trainer.optimizer)
    trainer.scheduler.load_state_dict(loaded["scheduler"])
    trainer.optimizer_steps = loaded["optimizer_steps"]


def _initialize_distributed_optimizer_state(optimizer) -> None:
    """Create the Adam state of a distributed optimizer that has not stepped yet.

    Megatron-Core 0.16.1's `DistributedOptimizer.sharded_state_dict(is_loading=True)` reads the
    torch-Adam `step` before it creates placeholder states (AssertionError on a fresh optimizer
    without Apex/TE). Its own placeholder step is taken here first; the load overwrites it.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer) and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def unalias_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam `step` tensor (in place, same values).

    Megatron-Core 0.16.1's `DistributedOptimizer.load_state_dict` without Apex/TE assigns ONE
    `step` tensor to every parameter's torch-Adam state; the foreach Adam update then increments
    it once per parameter, so after a resume the bias correction uses a wrong step count.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in inner.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
