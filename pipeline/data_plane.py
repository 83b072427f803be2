"""The data plane of a run, as the trainer's rank 0 drives it.

    plane = DataPlane(run_config.data_plane_config(), model_path, run_dir, registry,
                      sync_store, num_stages)
    batch, stats = plane.next_batch(policy_version, prefetch_next=True)
                                                        # generate, score, filter, advantages
    plane.before_training()                             # colocated: the servers free the GPUs
    plane.finish_prefetch()                             # overlap: the next step's groups are in
    pending = plane.start_weight_sync(version)          # the stage senders stream meanwhile
    pending.result()                                    # the fleet serves `version`
    report = plane.evaluate(version)                    # eval: the held-out sets on `version`
    plane.close()                                       # servers stopped by PID

It runs on an asyncio loop in a daemon thread and offers blocking calls. It owns the fleet, the
HTTP session, the prompt source, the reward scorer, the dynamic-sampling queue and the
weight-sync strategy (`pipeline.weight_sync.WeightSync`, the only code that changes the fleet's
weight version), the evaluator of the held-out sets (`pipeline.evaluation`, with `eval.interval`
set), and with `rollout.placement=colocated` the servers' memory hand-over
around training (`pipeline.colocation`). It is handed `DataPlaneConfig`, the sections it
needs, never the run configuration.

Overlap (`rollout.overlaps_generation`, i.e. `max_staleness >= 1` and not colocated): after
step k's batch the queue starts gathering step k + 1's groups (`start_prefetch`) while the
trainer trains step k, with the fleet still at version k. The trainer waits for that prefetch
(`finish_prefetch`) before the weight sync of version k + 1, so every prefetched sample is of
version k (one behind the policy that trains on it, within the staleness bound) and no weight
update lands mid-prefetch: which requests a pause would catch depends on timing, and exact
resume needs the same samples on every run. Step time is then max(generate, train) + sync.
(`RolloutClient.weight_update` would be safe mid-generation too: it drains, never retracts,
so a sample's version is the one that generated all of its tokens.) With
`algorithm.old_log_probs: recompute` the lag is corrected as configured: pi_old is version
k + 1's policy, and the truncated importance weight pi_old / pi_rollout
(`algorithm.rollout_correction`) spans the version behind along with the kernels' mismatch,
which the step's `mismatch KL` measures. `fleet_busy_seconds` is the fleet's generating time,
from which the trainer reports the fleet's idle share.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from pydantic import Field

from pipeline.advantages import AdvantageConfig
from pipeline.config import (
    DataConfig,
    DynamicSamplingConfig,
    EvalConfig,
    RewardConfig,
    RolloutConfig,
    Section,
)
from pipeline.stop_tokens import resolve_stop_token_ids
from pipeline.train_batch import ExpertRouting

if TYPE_CHECKING:  # the run config imports this module: keep its import light
    import torch.distributed as dist
    from prometheus_client import CollectorRegistry

    from pipeline.dynamic_sampling import StepStats
    from pipeline.evaluation import EvalReport, Evaluator
    from pipeline.train_batch import TrainBatch

T = TypeVar("T")


class DataPlaneConfig(Section):
    """What the data plane runs on: its own sections of the run configuration."""

    rollout: RolloutConfig
    data: DataConfig
    reward: RewardConfig
    sampling: DynamicSamplingConfig
    advantage: AdvantageConfig
    groups_per_step: int
    """Groups (prompts) in the training batch of one step."""
    run_name: str
    """The `run` label of the queue and fleet series."""
    policy_dtype: str
    """The policy's parameter dtype (`model.params_dtype`): embedded servers compute in it."""
    trainer_local_ranks: int = Field(1, ge=1)
    """Trainer ranks on the data plane's node (`launch.nproc_per_node`), on GPUs 0..R-1:
    embedded servers are placed by them (`rollout.placement`)."""
    routing: ExpertRouting | None = None
    """MoE routing replay (`algorithm.routing_replay: rollout`): the fleet returns every
    token's routed experts, which the batches carry; None = no routes."""
    eval: EvalConfig = EvalConfig()
    """Held-out evaluation; its datasets are loaded only with `eval.interval` set."""


class DataPlane:
    """Rank 0's data plane on an asyncio loop in a daemon thread; see the module docstring."""

    def __init__(
        self,
        config: DataPlaneConfig,
        model_path: Path,
        run_dir: Path,
        registry: CollectorRegistry,
        sync_store: dist.Store,
        num_stages: int,
    ):
        """`sync_store`: where the trainer's stage senders publish their weight buckets (a
        `clone()` of the trainer's default store); `num_stages`: its pipeline stages."""
        from pipeline.fleet import EmbeddedFleetOptions, RolloutFleet
        from pipeline.sglang_server import sample_token_budget

        self.config = config
        # the longest request: every server must hold it (embedded ones are started so)
        self.sample_tokens = max(
            sample_token_budget(config.data.max_prompt_length, config.rollout.max_response_length),
            config.eval.sample_tokens(config.rollout) if config.eval.interval else 0,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        embedded = EmbeddedFleetOptions(
            model_path=str(model_path),
            log_dir=run_dir / "fleet",
            cpu_defaults=not torch.cuda.is_available(),  # GPU servers keep SGLang's defaults
            dtype=config.policy_dtype,
            sample_tokens=self.sample_tokens,
            trainer_local_ranks=config.trainer_local_ranks,
            visible_gpus=torch.cuda.device_count(),
        )
        self.fleet = RolloutFleet(config.rollout, embedded, config.routing)
        self.fleet.start()
        try:
            self._run(self._open(model_path, run_dir, registry, sync_store, num_stages))
        except BaseException:
            self.close()
            raise

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result()

    async def _open(
        self,
        model_path: Path,
        run_dir: Path,
        registry: CollectorRegistry,
        sync_store: dist.Store,
        num_stages: int,
    ) -> None:
        from transformers import AutoTokenizer

        from pipeline.colocation import FleetColocation
        from pipeline.dynamic_sampling import DynamicSamplingQueue
        from pipeline.evaluation import Evaluator
        from pipeline.metrics import EvalMetrics, FleetMetrics, QueueMetrics
        from pipeline.prompts import PromptSource
        from pipeline.rewards import get_reward_scorer
        from pipeline.weight_sync import WeightSync

        config = self.config
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._session = self.fleet.session()
        self.client = self.fleet.client(self._session, FleetMetrics(registry, run=config.run_name))
        self.colocation = (
            FleetColocation(self.client) if config.rollout.placement == "colocated" else None
        )
        await self.client.check_request_capacity(self.sample_tokens)
        self.scorer = get_reward_scorer(
            config.reward.function, config.reward.num_workers, config.reward.timeout_s
        )
        stop_token_ids = resolve_stop_token_ids(config.rollout.stop_token_ids, model_path)
        self.evaluator: Evaluator | None = None
        if config.eval.interval:
            self.evaluator = Evaluator.create(
                config.eval,
                config.rollout,
                config.reward.score_truncated,
                tokenizer,
                self.scorer,
                stop_token_ids,
                EvalMetrics(registry, run=config.run_name),
            )
        self.queue = DynamicSamplingQueue(
            prompts=PromptSource.from_config(config.data, tokenizer),
            engine=self.client,
            scorer=self.scorer,
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            advantage=config.advantage,
            num_groups=config.groups_per_step,
            rollout=config.rollout,
            sampling=config.sampling,
            overlong=config.reward.overlong,
            metrics=QueueMetrics(registry, run=config.run_name),
            stop_token_ids=stop_token_ids,
            score_truncated=config.reward.score_truncated,
            async_mode=config.rollout.overlaps_generation,
        )
        self.weight_sync = WeightSync(
            config.rollout.weight_sync, self.client, sync_store, num_stages, run_dir, model_path
        )

    def next_batch(
        self, policy_version: int, prefetch_next: bool = False
    ) -> tuple[TrainBatch, StepStats]:
        """(TrainBatch, StepStats) of the next step, generated by `policy_version` or at most
        `max_staleness` versions older (colocated: the servers first take back their KV cache).

        `prefetch_next`: with overlap, start gathering the batch of `policy_version + 1` at
        once (a run passes False for its last step).
        """
        if self.colocation is not None:
            self._run(self.colocation.before_generation())
        return self._run(self._next_batch(policy_version, prefetch_next))

    async def _next_batch(
        self, policy_version: int, prefetch_next: bool
    ) -> tuple[TrainBatch, StepStats]:
        batch = await self.queue.next_batch(policy_version)
        if prefetch_next and self.queue.async_mode:
            self.queue.start_prefetch(policy_version + 1)
        return batch

    def finish_prefetch(self) -> None:
        """Overlap: wait until the next step's groups are gathered (call before the weight
        sync, and before `state_dict`); no-op without a prefetch running."""
        self._run(self.queue.finish_prefetch())

    @property
    def fleet_busy_seconds(self) -> float:
        """Wall time the fleet has spent generating for the queue and evaluations so far
        (seconds)."""
        evaluating = self.evaluator.busy_seconds if self.evaluator is not None else 0.0
        return self.queue.busy_seconds + evaluating

    def evaluate(self, policy_version: int) -> EvalReport:
        """Evaluate the policy the fleet serves (`policy_version`, after its weight sync) on the
        held-out sets; call between steps, with no prefetch running (colocated: the servers
        first take back their KV cache). Touches neither the prompt stream nor the queue.

        Raises:
            RuntimeError: the run has no evaluation (`eval.interval` 0).
        """
        if self.evaluator is None:
            raise RuntimeError("DataPlane.evaluate needs eval.interval > 0 and eval.datasets")
        if self.colocation is not None:
            self._run(self.colocation.before_generation())
        return self._run(self.evaluator.evaluate(self.client, policy_version))

    def before_training(self) -> None:
        """Colocated placement: the servers release their KV cache and weights for the
        trainer, until the next weight sync; no-op otherwise."""
        if self.colocation is not None:
            self._run(self.colocation.before_training())

    def start_weight_sync(self, version: int) -> Future[None]:
        """Start loading weight `version` on the fleet from the stage senders' buckets
        (colocated: the servers first take back their weights' memory); returns at once, so
        this rank can stream its own stage meanwhile. `.result()` waits for the fleet to serve
        `version` (and raises what the sync raised)."""
        return asyncio.run_coroutine_threadsafe(self._sync_weights(version), self._loop)

    async def _sync_weights(self, version: int) -> None:
        if self.colocation is not None:
            await self.colocation.before_weight_sync()
        await self.weight_sync.sync(version)

    def state_dict(self) -> dict[str, Any]:
        """The queue's state (prompt position, carried groups, counters, a finished
        prefetch), between steps: after `finish_prefetch`."""
        return self.queue.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queue.load_state_dict(state)

    def close(self) -> None:
        """Stop the queue, the scorer's workers, the session and the servers (by PID)."""
        try:
            if hasattr(self, "queue"):
                self._run(self.queue.close())
            if hasattr(self, "client"):
                self._run(self.client.close())  # cancels re-probes of failed servers
            if hasattr(self, "weight_sync"):
                self._run(self.weight_sync.close())
            if hasattr(self, "_session"):
                self._run(self._session.close())
        finally:
            if hasattr(self, "scorer"):
                self.scorer.close()
            self.fleet.stop()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
