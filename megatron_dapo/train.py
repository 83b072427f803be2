"""`megatron-dapo train CONFIG [overrides]`: the DAPO loop, run on every rank of a torchrun job.

    start:   rank 0 writes the initial checkpoint if the run starts from scratch
             (`model.random_init`); every rank loads it into its Megatron-Core shards, then
             the newest complete run checkpoint if there is one (`checkpoint.resume`);
             rank 0 starts the data plane (SGLang fleet, prompts, rewards, dynamic-sampling
             queue) on an asyncio loop in a background thread and restores its state; the
             fleet serves the policy's version (re-synced when resumed or in cluster mode).
    step k:  rank 0   queue.next_batch(k) -> TrainBatch (generate, score, filter, advantages);
                      with overlap (`rollout.max_staleness >= 1`, not colocated) the fleet
                      then gathers step k + 1's groups with version k while the trainer trains
             all      receive the TrainBatch (broadcast from rank 0)
             rank 0   colocated placement: the servers release their KV cache and weights
                      (resumed for the weight sync and the next generation)
             all      PolicyTrainer.train: pi_old recomputed by a forward pass over the batch
                      (`algorithm.old_log_probs`), then one optimizer step per mini-batch
             rank 0   overlap: wait for step k + 1's groups (`DataPlane.finish_prefetch`)
             all      sync: each pipeline stage's sending rank streams its weights in HF
                      buckets (collective within the stage) while rank 0's data plane loads
                      them on the fleet as version k + 1 (`rollout.weight_sync`: shards on
                      disk, update groups, or tensors; `pipeline.weight_sync`); metrics
                      (with the trainer's and the fleet's idle time), progress and a summary
                      line
             rank 0   every `eval.interval` steps and after the last: the held-out sets on
                      the fleet, which now serves version k + 1 (`DataPlane.evaluate`), into
                      the step's record and line
             all      every `checkpoint.save_interval` steps: a run checkpoint
                      (`run_checkpoint`: Megatron distributed checkpoint, RNG, queue state
                      with the prefetched groups of the next step)
    end:     a run checkpoint; the fleet is stopped by PID.

Launched without torchrun on one node, the command re-executes itself under
`torchrun --standalone` with `launch.nproc_per_node` ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from megatron_dapo.config.schema import RunConfig
from pipeline.parent_death import exit_with_parent

T = TypeVar("T")


def relaunch_under_torchrun(config: RunConfig, argv: Sequence[str]) -> int:
    """Run `megatron-dapo argv...` (a command, its config and overrides) on
    `launch.nproc_per_node` local ranks under `torchrun --standalone`; its exit code."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={config.launch.nproc_per_node}",
        "-m",
        "megatron_dapo.cli",
        *argv,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(command, env=env, preexec_fn=exit_with_parent)


def needs_relaunch(config: RunConfig) -> bool:
    """True when this process is not a torchrun rank but the run wants several local ranks.

    Raises:
        RuntimeError: the run spans several nodes; those are started by `launch/torchrun.sh`
            on each node or by `launch/slurm/submit.sh`, not from one process.
    """
    if "RANK" in os.environ or config.launch.world_size == 1:
        return False
    if config.launch.nnodes > 1:
        raise RuntimeError(
            f"launch.nnodes={config.launch.nnodes}: start every node with launch/torchrun.sh "
            "(or submit launch/slurm/submit.sh); one process cannot start other nodes"
        )
    return True


def _broadcast_from_rank0(value: T | None) -> T:
    """`value` of global rank 0 on every rank (pickled over the default group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value  # type: ignore[return-value]
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]  # type: ignore[return-value]


def prepare_initial_checkpoint(config: RunConfig) -> Path:
    """The HF checkpoint the run starts from, written first by rank 0 if `random_init` says so."""
    from megatron_dapo.hf.initial_checkpoint import ensure_initial_checkpoint

    if not dist.is_initialized() or dist.get_rank() == 0:
        ensure_initial_checkpoint(config.model, config.training.seed)
    if dist.is_initialized():
        dist.barrier()
    return Path(config.model.hf_checkpoint)


def _resume(config: RunConfig, trainer: Any) -> Any:
    """The `ResumePoint` of the newest complete checkpoint (per `checkpoint.resume`), or None.

    Collective: rank 0 picks the directory, every rank loads its shards and RNG states.
    """
    from megatron_dapo.ckpt.run_checkpoint import latest_checkpoint, load_run_checkpoint

    mode = config.checkpoint.resume
    latest = None
    if mode != "never" and dist.get_rank() == 0:
        latest = latest_checkpoint(config.checkpoint.dir)
    latest = _broadcast_from_rank0(latest)
    if latest is None:
        if mode == "required":
            raise FileNotFoundError(
                f"checkpoint.resume=required but {config.checkpoint.dir} holds no complete "
                "checkpoint"
            )
        return None
    point = load_run_checkpoint(trainer, latest)
    if dist.get_rank() == 0:
        if point.step >= config.training.steps:
            print(
                f"{latest}: the run already did its {config.training.steps} steps; raise "
                "training.steps to continue it, or start afresh with checkpoint.resume=never "
                f"(or another checkpoint.dir than {config.checkpoint.dir})",
                flush=True,
            )
        else:
            print(f"resuming from {latest} (after step {point.step})", flush=True)
    return point


def run(config: RunConfig) -> None:
    """The training loop of one rank (under torchrun, or alone for a 1-rank layout)."""
    from prometheus_client import CollectorRegistry

    from megatron_dapo.ckpt.run_checkpoint import has_checkpoint, save_run_checkpoint
    from megatron_dapo.hf.convert import SyncRole, hf_model_type, stream_weights
    from megatron_dapo.mcore.cpu_patches import apply_cpu_patches
    from megatron_dapo.mcore.parallel import DistributedEnv, destroy_parallel, initialize_parallel
    from megatron_dapo.mcore.policy_step import PolicyTrainer
    from megatron_dapo.mcore.tensor_inspect import install_tensor_inspection
    from megatron_dapo.report.prometheus import TrainerMetricsExporter
    from megatron_dapo.report.step_report import StepReporter, run_summary, summarize_step
    from pipeline.data_plane import DataPlane
    from pipeline.weight_sync import WeightSender, sender_address

    # torch deprecates collectives that Megatron-Core calls: not actionable in a run log
    warnings.filterwarnings("ignore", message=r".* is deprecated", module=r"torch\.distributed")
    apply_cpu_patches()
    initialize_parallel(config.parallelism, DistributedEnv.from_environ(), config.training.seed)
    is_rank0 = dist.get_rank() == 0
    if is_rank0:
        print(run_summary(config), flush=True)
    run_dir = Path(config.checkpoint.dir).parent
    initial = prepare_initial_checkpoint(config)
    trainer = PolicyTrainer(config)
    models = trainer.models
    resume = _resume(config, trainer)
    first_step = resume.step if resume is not None else 0
    steps = config.training.steps
    if first_step >= steps:
        destroy_parallel()
        return
    data_plane = reporter = inspector = None

    rollout = config.rollout
    store = dist.distributed_c10d._get_default_store()
    role = SyncRole.of_rank()
    sender = None
    if role.sender:
        address = sender_address(rollout.weight_sync_address, rollout.mode == "embedded")
        sender = WeightSender(rollout.weight_sync, store, role.stage, run_dir, address)
    model_type, bucket_bytes = hf_model_type(initial), rollout.weight_sync_bucket_mb * 2**20

    def sync_weights(version: int) -> None:
        """Load the policy on the fleet as weight `version` (collective within each stage):
        the stage senders stream while rank 0's data plane loads (`pipeline.weight_sync`)."""
        pending = data_plane.start_weight_sync(version) if data_plane is not None else None
        stream_weights(models, model_type, bucket_bytes, sender, version)
        if pending is not None:
            pending.result()

    def save(step: int) -> None:
        state = data_plane.state_dict() if data_plane is not None else None
        save_run_checkpoint(
            trainer, config.checkpoint.dir, step, state, config.checkpoint.keep_last
        )

    try:
        inspector = install_tensor_inspection(config.debug, models, first_step)
        if is_rank0:
            registry = CollectorRegistry()
            exporter = TrainerMetricsExporter(config.metrics.run_name, registry)
            if config.metrics.prometheus:
                port = exporter.serve(config.metrics.bind_address, config.metrics.port)
                print(f"metrics: http://{config.metrics.bind_address}:{port}/metrics", flush=True)
            data_plane = DataPlane(
                config.data_plane_config(),
                initial,
                run_dir,
                registry,
                store.clone(),
                config.parallelism.pipeline,
            )
            if resume is not None:
                data_plane.load_state_dict(resume.pipeline_state)
            reporter = StepReporter(config, exporter, run_dir / "metrics.jsonl", first_step)
        if resume is not None or config.rollout.mode == "cluster":
            sync_weights(first_step)  # the fleet must serve exactly this policy
        for version in range(first_step, steps):
            started = time.perf_counter()
            batch = stats = None
            if data_plane is not None:
                busy = data_plane.fleet_busy_seconds
                batch, stats = data_plane.next_batch(version, prefetch_next=version + 1 < steps)
                data_plane.before_training()  # colocated: the servers free the GPUs
            generated = time.perf_counter()
            batch = _broadcast_from_rank0(batch)
            trained_batch = trainer.train(batch)  # pi_old recomputed, then the optimizer steps
            if inspector is not None:
                inspector.step()
            trained = time.perf_counter()
            if data_plane is not None:
                data_plane.finish_prefetch()  # overlap: step k + 1's groups all of version k
            prefetched = time.perf_counter()
            sync_weights(version + 1)
            synced = time.perf_counter()
            evaluation = None
            if data_plane is not None and config.eval.due(version + 1, steps):
                evaluation = data_plane.evaluate(version + 1)  # the policy just synced
            if reporter is not None:
                phases = {
                    "generate": generated - started,
                    "train": trained - generated,
                    "prefetch_wait": prefetched - trained,
                    "weight_sync": synced - prefetched,
                }
                if evaluation is not None:
                    phases["eval"] = time.perf_counter() - synced
                busy = data_plane.fleet_busy_seconds - busy
                metrics = summarize_step(version, batch, stats, trained_batch, phases, busy)
                reporter.report(metrics, stats, evaluation)
            interval = config.checkpoint.save_interval
            if interval and (version + 1) % interval == 0 and version + 1 < steps:
                save(version + 1)
        if not _broadcast_from_rank0(has_checkpoint(config.checkpoint.dir, steps)):
            save(steps)
    finally:
        if inspector is not None:
            inspector.close()
        if reporter is not None:
            reporter.close()
        if data_plane is not None:
            data_plane.close()
        destroy_parallel()
