"""`megatron-dapo train CONFIG [overrides]`: the DAPO loop, run on every rank of a torchrun job.

    start:   rank 0 writes the initial checkpoint if the run starts from scratch
             (`model.random_init`); every rank loads it into its Megatron-Core shards;
             rank 0 starts the data plane (SGLang fleet, prompts, rewards, dynamic-sampling
             queue) on an asyncio loop in a background thread; the fleet serves version 0.
    step k:  rank 0   queue.next_batch(k) -> TrainBatch (generate, score, filter, advantages)
             all      receive the TrainBatch (broadcast from rank 0)
             all      PolicyTrainer.train: one optimizer step per mini-batch
             all      export the new weights as an HF checkpoint (collective, rank 0 writes)
             rank 0   fleet loads them as version k + 1; metrics, progress and a summary line
    end:     a Megatron distributed checkpoint; the fleet is stopped by PID.

Launched without torchrun (`launch.launcher: local`), the command re-executes itself under
`torchrun --standalone` with `launch.nproc_per_node` ranks.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from megatron_dapo.config import RunConfig

T = TypeVar("T")

_WEIGHT_VERSIONS_KEPT = 2


def relaunch_under_torchrun(config: RunConfig, argv: Sequence[str]) -> int:
    """Run `megatron-dapo train argv...` on `launch.nproc_per_node` local ranks; exit code."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={config.launch.nproc_per_node}",
        "-m",
        "megatron_dapo.cli",
        "train",
        *argv,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(command, env=env)


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


class DataPlane:
    """Rank 0's data plane on an asyncio loop in a daemon thread; blocking calls for the trainer.

    Owns the fleet (servers stopped by PID on `close`), the HTTP session, the prompt source,
    the reward scorer and the dynamic-sampling queue.
    """

    def __init__(self, config: RunConfig, model_path: Path, run_dir: Path, registry: Any):
        from pipeline.fleet import EmbeddedFleetOptions, RolloutFleet

        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        embedded = EmbeddedFleetOptions(model_path=str(model_path), log_dir=run_dir / "fleet")
        self.fleet = RolloutFleet(config.rollout, embedded)
        self.fleet.start()
        try:
            self._run(self._open(model_path, registry))
        except BaseException:
            self.close()
            raise

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result()

    async def _open(self, model_path: Path, registry: Any) -> None:
        import aiohttp
        from transformers import AutoTokenizer

        from megatron_dapo.advantages import AdvantageConfig, get_advantage_estimator
        from pipeline.dynamic_sampling import DynamicSamplingQueue
        from pipeline.metrics import FleetMetrics, QueueMetrics
        from pipeline.prompts import PromptSource
        from pipeline.rewards import get_reward_scorer

        config = self.config
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        estimator = get_advantage_estimator(config.algorithm.advantage_estimator)
        self._session = aiohttp.ClientSession()
        self.client = self.fleet.client(self._session, FleetMetrics(registry))
        self.scorer = get_reward_scorer(
            config.reward.function, config.reward.num_workers, config.reward.timeout_s
        )
        self.queue = DynamicSamplingQueue(
            prompts=PromptSource.from_config(config.data, tokenizer),
            engine=self.client,
            scorer=self.scorer,
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            advantage_fn=lambda rewards: estimator(rewards, AdvantageConfig()),
            num_groups=config.training.prompts_per_step,
            rollout=config.rollout,
            sampling=config.algorithm.dynamic_sampling,
            overlong=config.reward.overlong,
            metrics=QueueMetrics(registry),
        )

    def next_batch(self, policy_version: int):
        """(TrainBatch, StepStats) of the next step, generated by `policy_version` or fresher."""
        return self._run(self.queue.next_batch(policy_version))

    def update_weights(self, path: Path, version: int) -> None:
        """Every server loads the HF checkpoint at `path` as `version` (generation paused)."""
        self._run(self.client.update_weights_from_disk(str(path), version))

    def close(self) -> None:
        """Stop the queue, the scorer's workers, the session and the servers (by PID)."""
        try:
            if hasattr(self, "queue"):
                self._run(self.queue.close())
            if hasattr(self, "_session"):
                self._run(self._session.close())
        finally:
            if hasattr(self, "scorer"):
                self.scorer.close()
            self.fleet.stop()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


def _broadcast_from_rank0(value: T | None) -> T:
    """`value` of global rank 0 on every rank (pickled over the default group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value  # type: ignore[return-value]
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]  # type: ignore[return-value]


def _prepare_initial_checkpoint(config: RunConfig) -> Path:
    """The HF checkpoint the run starts from, written first by rank 0 if `random_init` says so."""
    from megatron_dapo.initial_checkpoint import write_random_checkpoint

    model = config.model
    if model.hf_checkpoint is None:
        raise ValueError("model.hf_checkpoint must name the HF checkpoint the policy starts from")
    path = Path(model.hf_checkpoint)
    is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if is_rank0 and not (path / "config.json").is_file():
        if model.random_init is None:
            raise FileNotFoundError(
                f"model.hf_checkpoint={path} has no config.json (set model.random_init to "
                "start from a random policy)"
            )
        write_random_checkpoint(model, path, config.training.seed)
    if dist.is_initialized():
        dist.barrier()
    return path


def run(config: RunConfig) -> None:
    """The training loop of one rank (under torchrun, or alone for a 1-rank layout)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module
    from megatron.core.utils import unwrap_model
    from prometheus_client import CollectorRegistry

    from megatron_dapo.checkpoint import save_checkpoint
    from megatron_dapo.cpu_patches import apply_cpu_patches
    from megatron_dapo.hf_convert import export_hf_checkpoint
    from megatron_dapo.metrics import TrainerMetricsExporter
    from megatron_dapo.parallel import DistributedEnv, destroy_parallel, initialize_parallel
    from megatron_dapo.policy_step import PolicyTrainer
    from megatron_dapo.step_report import StepReporter, summarize_step

    # Megatron-Core warns about every optional GPU library it does not find (Apex, TE, ...) and
    # torch about deprecated collectives Megatron calls; neither is actionable in a run log.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    apply_cpu_patches()
    initialize_parallel(config.parallelism, DistributedEnv.from_environ(), config.training.seed)
    is_rank0 = dist.get_rank() == 0
    run_dir = Path(config.checkpoint.dir).parent
    initial = _prepare_initial_checkpoint(config)
    trainer = PolicyTrainer(config)
    models = unwrap_model(trainer.chunks, (DistributedDataParallel, Float16Module))
    data_plane = reporter = None
    try:
        if is_rank0:
            registry = CollectorRegistry()
            exporter = TrainerMetricsExporter(config.metrics.run_name, registry)
            if config.metrics.prometheus:
                port = exporter.serve(config.metrics.bind_address, config.metrics.port)
                print(f"metrics: http://{config.metrics.bind_address}:{port}/metrics", flush=True)
            data_plane = DataPlane(config, initial, run_dir, registry)
            reporter = StepReporter(config, exporter)
        for version in range(config.training.steps):
            started = time.perf_counter()
            batch, stats = data_plane.next_batch(version) if data_plane else (None, None)
            generated = time.perf_counter()
            batch = _broadcast_from_rank0(batch)
            steps = trainer.train(batch)
            trained = time.perf_counter()
            weights = run_dir / "weights" / f"v{version + 1}"
            export_hf_checkpoint(models, weights, initial)
            if data_plane is not None:
                data_plane.update_weights(weights, version + 1)
                stale = run_dir / "weights" / f"v{version + 1 - _WEIGHT_VERSIONS_KEPT}"
                shutil.rmtree(stale, ignore_errors=True)
            synced = time.perf_counter()
            if reporter is not None:
                phases = {
                    "generate": generated - started,
                    "train": trained - generated,
                    "weight_sync": synced - trained,
                }
                reporter.report(summarize_step(version, batch, stats, steps, phases), stats)
        save_checkpoint(trainer, Path(config.checkpoint.dir) / f"step{config.training.steps}")
    finally:
        if reporter is not None:
            reporter.close()
        if data_plane is not None:
            data_plane.close()
        destroy_parallel()
