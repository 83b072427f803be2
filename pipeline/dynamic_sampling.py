"""The dynamic-sampling queue (DAPO, arXiv 2503.14476, Sec. 3.2): fills training batches with
prompt groups whose accuracy is strictly between 0 and 1.

One step (`next_batch`) needs `num_groups` kept groups of G responses each:

1. Carried groups (kept earlier but beyond an earlier batch) are reused if fresh enough:
   `policy_version - weight_version <= max_staleness`, else dropped and counted as stale.
2. Generation rounds: each round draws `ceil((missing + z * sqrt(missing * (1 - p))) / p)`
   prompts, `p` the keep rate estimated online from the past steps' groups and `z` a margin
   for the binomial spread of the kept count (`pipeline.oversampling`: the estimator, its
   prior and decay, and the fixed-factor modes) at most, keeping `ceil(missing / p)` groups
   generating and issuing more from that budget as dropped groups call for them (all at once
   in deterministic mode), generates their groups concurrently, scores
   each finished group (`pipeline.scoring`: correctness and shaped rewards, reward failures)
   and keeps it unless all G responses are correct or all wrong. When the batch is full,
   groups whose responses are all in are still scored and, if kept, carried to the next step;
   groups still generating are cancelled (their requests aborted on the servers) and counted.
   More than `max_generation_rounds` rounds in one step raise `GenerationRoundsExceeded`.
   Responses whose reward call timed out or failed are counted per step (`StepStats`,
   `QueueMetrics`); when every response scored in a step failed so (checked after each round),
   the reward function is broken and `RewardFunctionFailing` is raised.
3. The batch is packed into a `TrainBatch` (`pipeline.batch_packing`: advantages, overlong
   filtering, routed experts), its groups numbered on from the last batch's.

Async mode (overlap): `start_prefetch(k + 1)` runs step k + 1's eviction and rounds while the
trainer trains step k, so those samples come from weights one version older: async mode needs
`max_staleness >= 1`. `finish_prefetch()` waits for them (the data plane calls it before the
weight sync, so every prefetched sample carries version k and the run stays reproducible);
`next_batch(k + 1)` then packs the prefetched groups, topping them up if some were dropped.
Between `finish_prefetch` and `next_batch` the finished prefetch is part of `state_dict` (its
groups are in the carried ones, its `StepStats` belong to the next step), so a checkpoint
taken there resumes exactly. With dynamic sampling disabled every generated group is kept (one
round).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pipeline.advantages import AdvantageConfig
from pipeline.batch_packing import pack_batch
from pipeline.config import DynamicSamplingConfig, OverlongConfig, RolloutConfig
from pipeline.group_filter import filter_groups
from pipeline.metrics import QueueMetrics
from pipeline.oversampling import KeepRateEstimator
from pipeline.prompts import Prompt, PromptSource
from pipeline.rewards.base import RewardScorer
from pipeline.rollout_client import RolloutEngine
from pipeline.sampling_seeds import response_seed
from pipeline.scoring import ScoredGroup, judge, scored_group
from pipeline.sglang_client import Generation, SamplingParams
from pipeline.train_batch import TrainBatch

ABORT_FINISH_REASON = "abort"


class GenerationRoundsExceeded(RuntimeError):
    """A step needed more generation rounds than `max_generation_rounds`."""


class RewardFunctionFailing(RuntimeError):
    """The reward function failed (raised or timed out) on every response scored in a step."""


@dataclass
class StepStats:
    """What one step of the queue did (counts of groups unless stated)."""

    generation_rounds: int = 0
    generated_groups: int = 0
    generated_samples: int = 0
    correct_samples: int = 0
    """Generated responses judged correct (all scored groups, kept or not)."""
    generated_tokens: int = 0
    kept: int = 0
    dropped_all_correct: int = 0
    dropped_all_wrong: int = 0
    dropped_stale: int = 0
    aborted: int = 0
    reward_timeouts: int = 0
    """Responses whose reward call passed `reward.timeout_s` (scored as wrong)."""
    reward_errors: int = 0
    """Responses whose reward function raised or returned a wrong type (scored as wrong)."""
    skipped_prompts: int = 0
    """Prompts skipped as longer than `data.max_prompt_length`."""
    carried_in: int = 0
    carried_out: int = 0
    generation_seconds: float = 0.0
    """Wall time spent in generation rounds."""
    reward_seconds: float = 0.0
    """Wall time of the reward calls, summed over groups (they run while others generate)."""

    @property
    def accuracy(self) -> float:
        """Fraction of the step's generated (and scored) responses that were correct."""
        return self.correct_samples / self.generated_samples if self.generated_samples else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0

    def merge(self, other: StepStats) -> None:
        """Add `other`'s counts into this one (carried counts excepted)."""
        for name in (
            "generation_rounds",
            "generated_groups",
            "generated_samples",
            "correct_samples",
            "generated_tokens",
            "kept",
            "dropped_all_correct",
            "dropped_all_wrong",
            "aborted",
            "reward_timeouts",
            "reward_errors",
            "skipped_prompts",
            "generation_seconds",
            "reward_seconds",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class DynamicSamplingQueue:
    """Produces `TrainBatch`es of `num_groups` prompt groups; see the module docstring.

    Args:
        prompts: the prompt stream.
        engine: generates responses (the fleet's `RolloutClient`, or a scripted engine).
        scorer: judges responses (`pipeline.scoring.judge`).
        decode: response token ids -> text for the scorer.
        advantage: the advantage estimator and its options.
        num_groups: groups (prompts) per batch.
        rollout: group size, sampling parameters, max_response_length and max_staleness.
        sampling: dynamic sampling switches.
        overlong: soft punishment and overlong filtering.
        async_mode: allow `start_prefetch` (needs `rollout.max_staleness >= 1`).
        metrics: queue metrics (a private registry when not given).
        stop_token_ids: token ids that end a response.
        score_truncated: how a response truncated at the length limit is scored (`wrong` or
            `as_is`, see `pipeline.scoring.judge_responses`).
    """

    prompts: PromptSource
    engine: RolloutEngine
    scorer: RewardScorer
    decode: Callable[[Sequence[int]], str]
    advantage: AdvantageConfig
    num_groups: int
    rollout: RolloutConfig
    sampling: DynamicSamplingConfig
    overlong: OverlongConfig
    async_mode: bool = False
    metrics: QueueMetrics = field(default_factory=QueueMetrics)
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a response (resolved from `rollout.stop_token_ids` or the
    checkpoint by the data plane)."""
    score_truncated: Literal["as_is", "wrong"] = "wrong"
    """`reward.score_truncated`: how a response cut at the length limit is scored."""
    _ready: deque[ScoredGroup] = field(default_factory=deque, init=False)
    """Kept groups waiting for a batch (checkpoints of earlier versions pickled them as
    `pipeline.dynamic_sampling.ScoredGroup`: this module's import of the name still loads them)."""
    _prefetch: asyncio.Task[StepStats] | None = field(default=None, init=False)
    """The running prefetch (async mode)."""
    _prefetched: StepStats | None = field(default=None, init=False)
    """What a finished prefetch did, for the next step's stats (its groups are in `_ready`)."""
    _busy_seconds: float = field(default=0.0, init=False)
    """Wall time the queue has spent in generation rounds, over the queue's life."""
    _fill_began: float | None = field(default=None, init=False)
    """When the running generation rounds began (`time.monotonic`); None = none running."""
    _next_group_id: int = field(default=0, init=False)
    _issued_groups: int = field(default=0, init=False)
    """Groups ever sent for generation; a group's index seeds its responses (deterministic)."""
    _keep_rate: KeepRateEstimator = field(init=False)
    """The keep-rate estimate that sizes each round."""
    _last_reward_error: str | None = field(default=None, init=False)
    params: SamplingParams = field(init=False)
    """Sampling parameters of every request, from `rollout`."""

    def __post_init__(self) -> None:
        if self.num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {self.num_groups}")
        if self.async_mode and self.rollout.max_staleness < 1:
            raise ValueError(
                "async mode overlaps generation with training, so samples are one version "
                "old: it needs rollout.max_staleness >= 1"
            )
        if self.sampling.enabled and self.rollout.n_samples_per_prompt < 2:
            raise ValueError("dynamic sampling needs rollout.n_samples_per_prompt >= 2")
        self.params = SamplingParams(
            max_new_tokens=self.rollout.max_response_length,
            temperature=self.rollout.temperature,
            top_p=self.rollout.top_p,
            top_k=self.rollout.top_k,
            stop_token_ids=self.stop_token_ids,
            stop=self.rollout.stop,
            ignore_eos=self.rollout.ignore_eos,
        )
        self._keep_rate = KeepRateEstimator(self.sampling)

    @property
    def depth(self) -> int:
        """Kept groups waiting for a batch."""
        return len(self._ready)

    async def next_batch(self, policy_version: int) -> tuple[TrainBatch, StepStats]:
        """The batch for the policy at `policy_version`, and what it took to make it.

        Raises:
            GenerationRoundsExceeded: more than `max_generation_rounds` rounds were needed.
        """
        await self.finish_prefetch()
        prefetched, self._prefetched = self._prefetched, None
        stats = await self._gather(policy_version, prefetched)
        groups = [self._ready.popleft() for _ in range(self.num_groups)]
        stats.carried_out = len(self._ready)
        self._keep_rate.end_step()
        self._record(stats, groups, policy_version)
        return self._pack(groups), stats

    def start_prefetch(self, policy_version: int) -> None:
        """Async mode: start gathering the groups of the batch for `policy_version` now (call
        after `next_batch(policy_version - 1)`, while the fleet still serves that version)."""
        if not self.async_mode:
            raise RuntimeError("start_prefetch needs async_mode=True")
        if self._prefetch is not None or self._prefetched is not None:
            raise RuntimeError("start_prefetch before the previous prefetch was taken")
        self._prefetch = asyncio.create_task(self._gather(policy_version))

    async def finish_prefetch(self) -> None:
        """Wait for a running prefetch to end; no-op without one.

        Raises what the prefetch raised (e.g. `GenerationRoundsExceeded`).
        """
        if self._prefetch is not None:
            task = self._prefetch
            await asyncio.wait({task})
            self._prefetch = None
            self._prefetched = task.result()

    @property
    def busy_seconds(self) -> float:
        """Wall time spent in generation rounds so far (the fleet's busy time), including the
        rounds running now."""
        running = time.monotonic() - self._fill_began if self._fill_began is not None else 0.0
        return self._busy_seconds + running

    async def close(self) -> None:
        """Cancel a running prefetch (its requests are aborted)."""
        if self._prefetch is not None:
            await _cancel({self._prefetch})
            self._prefetch = None

    def state_dict(self) -> dict[str, Any]:
        """What a restart needs: the prompt position, the carried groups (picklable objects;
        save with `torch.save` / `pickle`), the group-id counter, the keep-rate estimate and
        the stats of a finished prefetch.

        Raises RuntimeError while a prefetch is running (`finish_prefetch` first).
        """
        if self._prefetch is not None:
            raise RuntimeError("DynamicSamplingQueue.state_dict during a prefetch")
        return {
            "prefetched": self._prefetched,
            "prompts": self.prompts.state_dict(),
            "carried": list(self._ready),
            "next_group_id": self._next_group_id,
            "issued_groups": self._issued_groups,
            "keep_rate": self._keep_rate.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self._ready = deque(state["carried"])
        self._next_group_id = state["next_group_id"]
        self._issued_groups = state["issued_groups"]
        self._keep_rate.load_state_dict(state["keep_rate"])
        self._prefetched = state.get("prefetched")

    def _evict_stale(self, policy_version: int) -> int:
        fresh = [
            g
            for g in self._ready
            if policy_version - g.weight_version <= self.rollout.max_staleness
        ]
        stale = len(self._ready) - len(fresh)
        self._ready = deque(fresh)
        return stale

    async def _gather(self, policy_version: int, earlier: StepStats | None = None) -> StepStats:
        """Drop the groups too stale for `policy_version` and run rounds until a batch is
        ready; `earlier`: the stats of the prefetch this continues (updated and returned)."""
        stats = earlier if earlier is not None else StepStats()
        dropped_stale = self._evict_stale(policy_version)
        if earlier is None:
            stats.carried_in = len(self._ready)
        stats.merge(await self._fill(self.num_groups, stats.generation_rounds))
        stats.dropped_stale += dropped_stale
        return stats

    async def _fill(self, target: int, rounds_done: int) -> StepStats:
        """Run generation rounds until `target` groups are ready."""
        stats = StepStats()
        begin = self._fill_began = time.monotonic()
        try:
            while len(self._ready) < target:
                if rounds_done + stats.generation_rounds >= self.sampling.max_generation_rounds:
                    raise GenerationRoundsExceeded(self._rounds_message(target, stats))
                stats.generation_rounds += 1
                missing = target - len(self._ready)
                budget = self._keep_rate.prompts_for(missing)
                if self.rollout.deterministic:
                    await self._round_in_order(self._draw(budget, stats), stats)
                else:
                    await self._stream_round(budget, target, stats)
                failed = stats.reward_errors + stats.reward_timeouts
                if stats.generated_samples and failed == stats.generated_samples:
                    raise RewardFunctionFailing(
                        f"the reward function failed on all {failed} responses of this step "
                        f"({stats.reward_timeouts} timed out after reward.timeout_s, "
                        f"{stats.reward_errors} raised; last error: {self._last_reward_error})"
                    )
        finally:
            stats.generation_seconds = time.monotonic() - begin
            self._busy_seconds += stats.generation_seconds
            self._fill_began = None
        return stats

    def _rounds_message(self, target: int, stats: StepStats) -> str:
        return (
            f"dynamic sampling could not fill {target} groups in "
            f"{self.sampling.max_generation_rounds} generation rounds: {len(self._ready)} kept, "
            f"{stats.dropped_all_correct} dropped as all correct, {stats.dropped_all_wrong} as "
            f"all wrong ({stats.reward_timeouts} reward timeouts, {stats.reward_errors} reward "
            f"errors). The prompts are too easy or too hard for the policy; raise "
            f"dynamic_sampling.max_generation_rounds or lower min_keep_rate, or check the reward."
        )

    def _draw(self, count: int, stats: StepStats) -> list[Prompt]:
        """The next `count` prompts (over-length ones skipped and counted)."""
        skipped_before = self.prompts.num_skipped
        prompts = self.prompts.next_prompts(count)
        stats.skipped_prompts += self.prompts.num_skipped - skipped_before
        return prompts

    async def _stream_round(self, budget: int, target: int, stats: StepStats) -> None:
        """One round of at most `budget` prompts, issued as the in-flight groups need them.

        The round keeps `in_flight_for(missing)` groups generating (fewer than `budget` when
        the keep rate is high) and issues one more from the budget whenever a dropped group
        leaves too few; when `target` groups are ready, finished groups are still scored (and
        carried over if kept) and groups still generating are cancelled.
        """
        scoring: set[asyncio.Task[Any]] = set()
        pending: set[asyncio.Task[Any]] = set()
        issued = 0

        def top_up() -> None:
            nonlocal issued
            missing = target - len(self._ready)
            count = min(budget - issued, self._keep_rate.in_flight_for(missing) - len(pending))
            if count <= 0:
                return
            first = self._issued_groups
            self._issued_groups += count
            issued += count
            for offset, prompt in enumerate(self._draw(count, stats)):
                pending.add(asyncio.create_task(self._group(prompt, first + offset, scoring)))

        try:
            top_up()
            while pending and len(self._ready) < target:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    self._admit(task.result(), stats)
                if len(self._ready) < target:
                    top_up()
        except BaseException:
            await _cancel(pending)
            raise
        leftovers = {t for t in pending if t not in scoring and not t.done()}
        stats.aborted += len(leftovers)
        await _cancel(leftovers)
        for task in pending - leftovers:
            self._admit(await task, stats)

    async def _round_in_order(self, prompts: list[Prompt], stats: StepStats) -> None:
        """Deterministic mode: generate one group per prompt, every group to completion, and
        admit them in prompt order (surplus kept groups are carried over)."""
        scoring: set[asyncio.Task[Any]] = set()
        first = self._issued_groups
        self._issued_groups += len(prompts)
        tasks = [
            asyncio.create_task(self._group(prompt, first + offset, scoring))
            for offset, prompt in enumerate(prompts)
        ]
        try:
            groups = await asyncio.gather(*tasks)
        except BaseException:
            await _cancel(set(tasks))
            raise
        for group in groups:
            self._admit(group, stats)

    async def _group(
        self, prompt: Prompt, group_index: int, scoring: set[asyncio.Task[Any]]
    ) -> ScoredGroup | None:
        """G responses to `prompt` (the `group_index`-th group issued), scored; None if a
        response was aborted.

        Adds its own task to `scoring` once every response is in.
        """
        generations = await self.engine.generate_group(
            prompt.input_ids,
            [
                self._sample_params(group_index, sample)
                for sample in range(self.rollout.n_samples_per_prompt)
            ],
        )
        if any(g.finish_reason == ABORT_FINISH_REASON for g in generations):
            return None
        task = asyncio.current_task()
        assert task is not None
        scoring.add(task)
        return await self._score(prompt, generations)

    def _sample_params(self, group_index: int, sample_index: int) -> SamplingParams:
        """`params` with a sampling seed of the response's own: derived from
        (`rollout.sampling_seed`, group, sample) in deterministic mode, random otherwise.

        Every request carries a seed because a server started with
        `--enable-deterministic-inference` seeds seedless requests alike (42): the G responses
        of a group would all be the same. Servers without the flag ignore the seed.
        """
        if self.rollout.deterministic:
            seed = response_seed(self.rollout.sampling_seed, group_index, sample_index)
        else:
            seed = secrets.randbits(63)
        return replace(self.params, sampling_seed=seed)

    async def _score(self, prompt: Prompt, generations: Sequence[Generation]) -> ScoredGroup:
        judgement = await judge(prompt, generations, self.scorer, self.decode, self.score_truncated)
        if judgement.first_error is not None:
            self._last_reward_error = judgement.first_error
        return scored_group(
            prompt, generations, judgement, self.rollout.max_response_length, self.overlong
        )

    def _admit(self, group: ScoredGroup | None, stats: StepStats) -> None:
        if group is None:
            stats.aborted += 1
            return
        stats.generated_groups += 1
        stats.generated_samples += len(group.generations)
        stats.correct_samples += sum(group.correct)
        stats.generated_tokens += sum(len(g.output_ids) for g in group.generations)
        stats.reward_timeouts += group.reward_timeouts
        stats.reward_errors += group.reward_errors
        stats.reward_seconds += group.scoring_seconds
        if self.sampling.enabled:
            verdict = filter_groups([group.correct])
            stats.dropped_all_correct += verdict.num_all_correct
            stats.dropped_all_wrong += verdict.num_all_wrong
            self._keep_rate.observe(kept=bool(verdict.num_kept))
            if not verdict.num_kept:
                return
        stats.kept += 1
        self._ready.append(group)

    def _record(self, stats: StepStats, groups: list[ScoredGroup], policy_version: int) -> None:
        m = self.metrics
        m.kept_groups.inc(stats.kept)
        for reason, count in (
            ("all_correct", stats.dropped_all_correct),
            ("all_wrong", stats.dropped_all_wrong),
            ("stale", stats.dropped_stale),
            ("aborted", stats.aborted),
        ):
            m.dropped_groups.labels(reason).inc(count)
        m.generation_rounds.observe(stats.generation_rounds)
        m.generated_samples.inc(stats.generated_samples)
        m.skipped_prompts.inc(stats.skipped_prompts)
        m.reward_timeouts.inc(stats.reward_timeouts)
        m.reward_errors.inc(stats.reward_errors)
        m.queue_depth.set(len(self._ready))
        m.batch_version.set(policy_version)
        m.generation_tokens_per_s.set(stats.tokens_per_s)
        for group in groups:
            for generation in group.generations:
                m.staleness.observe(policy_version - generation.weight_version)

    def _pack(self, groups: list[ScoredGroup]) -> TrainBatch:
        first_group_id = self._next_group_id
        self._next_group_id += len(groups)
        return pack_batch(groups, self.advantage, first_group_id, self.overlong.filter_truncated)


async def _cancel(tasks: set[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
