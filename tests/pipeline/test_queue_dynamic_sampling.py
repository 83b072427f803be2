"""The dynamic-sampling queue with a scripted in-process engine: exact statistics.

The scripted engine answers prompt row r (its prompt is the single token r) with scripted
response texts (one character per token); a response is correct iff it starts with "yes".
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import pickle
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import aiohttp
import pytest
import torch
from aiohttp import web

from pipeline.advantages import AdvantageConfig
from pipeline.config import DynamicSamplingConfig, OverlongConfig, RolloutConfig
from pipeline.dynamic_sampling import (
    DynamicSamplingQueue,
    GenerationRoundsExceeded,
    RewardFunctionFailing,
)
from pipeline.metrics import QueueMetrics
from pipeline.oversampling import MARGIN_SIGMAS, KeepRateEstimator
from pipeline.prompts import PromptRow, PromptSource
from pipeline.rewards import ProcessPoolScorer
from pipeline.rewards.base import FunctionScorer, RewardResult, RewardScorer
from pipeline.rollout_client import RolloutClient
from pipeline.sglang_client import Generation, SamplingParams, SGLangServerClient

# Import path of the sibling helper module, whether or not tests/ is a package.
HELPERS_MODULE = f"{__name__.rpartition('.')[0]}.reward_helpers".lstrip(".")
helpers = importlib.import_module(HELPERS_MODULE)

G = 4
MIXED = ("yes", "no", "no", "no")
RIGHT = ("yes",) * G
WRONG = ("no",) * G
LOGPROB = -0.5


class RowTokenizer:
    """A prompt of space-separated integers -> those tokens (row r's prompt is `r`, or `r`
    repeated for an over-long prompt)."""

    def apply_chat_template(self, conversation, **kwargs) -> list[int]:
        return self.encode(conversation[0]["content"])

    def encode(self, text: str, **kwargs) -> list[int]:
        return [int(token) for token in text.split()]


class ScriptedEngine:
    """Answers row r with `script[r]` (MIXED by default); rows in `gated` never finish."""

    def __init__(
        self, script: dict[int, Sequence[str]], gated: Sequence[int] = (), routed: bool = False
    ) -> None:
        self.script = script
        self.gated = set(gated)
        self.routed = routed
        self.weight_version = 0
        self.calls: Counter[int] = Counter()
        self.cancelled = 0

    async def generate_group(
        self, input_ids: Sequence[int], params: Sequence[SamplingParams]
    ) -> list[Generation]:
        """The group's samples, one `generate` each."""
        return list(await asyncio.gather(*(self.generate(input_ids, p) for p in params)))

    async def generate(self, input_ids: Sequence[int], params: SamplingParams) -> Generation:
        row = input_ids[0]
        index = self.calls[row]
        self.calls[row] += 1
        version = self.weight_version
        if row in self.gated:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        await asyncio.sleep(0)
        text = self.script.get(row, MIXED)[index % G][: params.max_new_tokens]
        return Generation(
            output_ids=tuple(ord(c) for c in text),
            output_logprobs=(LOGPROB,) * len(text),
            finish_reason="length" if len(text) == params.max_new_tokens else "stop",
            server_weight_version=str(version),
            server_url="scripted",
            weight_version=version,
            routed_experts=scripted_routes([*input_ids, *map(ord, text)][:-1])
            if self.routed
            else None,
        )


def scripted_routes(tokens: Sequence[int]) -> torch.Tensor:
    """`[len(tokens), 2, 2]` uint8 routes of 4 experts: token t to (t % 4, (t + 1) % 4) at
    layer 0, the reverse at layer 1."""
    first = torch.tensor(tokens) % 4
    pair = torch.stack([first, (first + 1) % 4], dim=1)
    return torch.stack([pair, pair.flip(1)], dim=1).to(torch.uint8)


def queue_sample(queue: DynamicSamplingQueue, name: str, **labels: str) -> float | None:
    """A sample of the queue's metrics for its run."""
    return queue.metrics.registry.get_sample_value(name, {"run": "test-run", **labels})


def yes_reward(response: str, ground_truth: str) -> RewardResult:
    return RewardResult.from_correctness(response.startswith("yes"), response[:3])


def make_queue(
    engine: ScriptedEngine,
    num_groups: int = 2,
    oversample: float = 1.0,
    max_rounds: int = 10,
    enabled: bool = True,
    max_staleness: int = 0,
    async_mode: bool = False,
    overlong: OverlongConfig | None = None,
    max_response_length: int = 64,
    adapt: bool = False,
    scorer: RewardScorer | None = None,
    overlong_rows: Sequence[int] = (),
    deterministic: bool = False,
    score_truncated: str = "wrong",
) -> DynamicSamplingQueue:
    """A queue over rows 0..99 (answer "yes"); rows in `overlong_rows` have 11 > 10 tokens."""
    rows = [
        PromptRow(
            [{"role": "user", "content": " ".join([str(r)] * (11 if r in overlong_rows else 1))}],
            "yes",
        )
        for r in range(100)
    ]
    return DynamicSamplingQueue(
        prompts=PromptSource(rows, RowTokenizer(), max_prompt_length=10, shuffle=False),
        engine=engine,
        scorer=scorer or FunctionScorer(yes_reward),
        decode=lambda ids: "".join(map(chr, ids)),
        advantage=AdvantageConfig(),
        num_groups=num_groups,
        rollout=RolloutConfig(
            n_samples_per_prompt=G,
            max_response_length=max_response_length,
            max_staleness=max_staleness,
            deterministic=deterministic,
        ),
        sampling=DynamicSamplingConfig(
            enabled=enabled,
            max_generation_rounds=max_rounds,
            oversample_factor=oversample,
            adapt_to_keep_rate=adapt,
        ),
        overlong=overlong or OverlongConfig(soft_punishment=False),
        async_mode=async_mode,
        score_truncated=score_truncated,
        metrics=QueueMetrics(run="test-run"),
    )


def test_groups_with_zero_or_full_accuracy_are_dropped_and_rounds_counted():
    engine = ScriptedEngine({0: WRONG, 1: RIGHT})
    queue = make_queue(engine)
    batch, stats = asyncio.run(queue.next_batch(policy_version=0))

    assert (stats.generation_rounds, stats.generated_groups, stats.kept) == (2, 4, 2)
    assert (stats.dropped_all_wrong, stats.dropped_all_correct, stats.aborted) == (1, 1, 0)
    assert stats.generated_samples == 4 * G and stats.carried_out == 0
    assert sorted({m["row_index"] for m in batch.metadata}) == [2, 3]
    assert batch.num_samples == 2 * G
    assert batch.group_ids.tolist() == [0] * G + [1] * G

    scores = torch.tensor([[1.0 if t == "yes" else -1.0 for t in MIXED]] * 2)
    expected = (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True)
    torch.testing.assert_close(batch.rewards, scores.reshape(-1))
    torch.testing.assert_close(batch.advantages, expected.reshape(-1), atol=1e-5, rtol=0)
    responses = batch.response_lengths()
    assert responses.tolist() == [len(t) for t in MIXED] * 2
    assert batch.loss_mask.sum() == responses.sum()
    assert torch.all(batch.rollout_log_probs[batch.loss_mask] == LOGPROB)
    assert torch.all(batch.rollout_log_probs[~batch.loss_mask] == 0.0)

    assert queue_sample(queue, "dapo_queue_dropped_groups_total", reason="all_wrong") == 1
    assert queue_sample(queue, "dapo_queue_dropped_groups_total", reason="all_correct") == 1
    assert queue_sample(queue, "dapo_queue_kept_groups_total") == 2
    assert queue_sample(queue, "dapo_queue_generation_rounds_sum") == 2


def test_soft_overlong_punishment_and_overlong_filter():
    long_right, mid_right = "yes" + "." * 5, "yes..."
    engine = ScriptedEngine({0: (long_right, mid_right, "no", "no")})
    overlong = OverlongConfig(soft_punishment=True, cache_length=4, filter_truncated=True)
    queue = make_queue(
        engine, num_groups=1, overlong=overlong, max_response_length=8, score_truncated="as_is"
    )
    batch, _ = asyncio.run(queue.next_batch(0))

    lengths = torch.tensor([8.0, 6.0, 2.0, 2.0])
    penalty = torch.clamp(((8 - 4) - lengths) / 4, -1.0, 0.0)  # DAPO Eq. 13
    torch.testing.assert_close(batch.rewards, torch.tensor([1.0, 1.0, -1.0, -1.0]) + penalty)
    assert [m["finish_reason"] for m in batch.metadata] == ["length", "stop", "stop", "stop"]
    per_sample_trained = [bool(batch.loss_mask[batch.sample_ids() == i].any()) for i in range(4)]
    assert per_sample_trained == [False, True, True, True]


@pytest.mark.parametrize("score_truncated", ["wrong", "as_is"])
def test_a_truncated_answer_is_wrong_unless_scored_as_is(score_truncated: str) -> None:
    # row 0 at a 4-token limit: "yes." was cut (it may have gone on "yes. No, ..."); "yes" ended
    calls = []

    def counted(response: str, ground_truth: str) -> RewardResult:
        calls.append(response)
        return yes_reward(response, ground_truth)

    engine = ScriptedEngine({0: ("yes.", "yes", "no", "no")})
    queue = make_queue(
        engine,
        num_groups=1,
        max_response_length=4,
        score_truncated=score_truncated,
        scorer=FunctionScorer(counted),
    )
    batch, stats = asyncio.run(queue.next_batch(0))
    assert [m["finish_reason"] for m in batch.metadata] == ["length", "stop", "stop", "stop"]
    correct = [m["correct"] for m in batch.metadata]
    if score_truncated == "as_is":
        assert correct == [True, True, False, False] and len(calls) == 4
    else:  # scored wrong before the group filter, without a reward call
        assert correct == [False, True, False, False] and len(calls) == 3
        assert batch.rewards.tolist() == [-1.0, 1.0, -1.0, -1.0]
    assert stats.correct_samples == sum(correct)


def test_surplus_groups_are_carried_leftovers_aborted_and_stale_ones_dropped():
    engine = ScriptedEngine({}, gated=[3])
    queue = make_queue(engine, num_groups=2, oversample=2.0)

    async def steps():
        first = await queue.next_batch(0)
        second = await queue.next_batch(0)
        engine.weight_version = 1
        third = await queue.next_batch(1)
        return first, second, third

    (batch1, s1), (batch2, s2), (batch3, s3) = asyncio.run(steps())
    # Step 1 draws rows 0-3: 0-2 are kept (one carried over), row 3 is still generating.
    assert (s1.kept, s1.aborted, s1.carried_out) == (3, 1, 1)
    assert engine.cancelled == G, "the leftover group's requests must be cancelled"
    rows1 = {m["row_index"] for m in batch1.metadata}
    assert len(rows1) == 2 and rows1 < {0, 1, 2}
    # Step 2 reuses the carried group and draws rows 4-5 for the one missing group.
    assert (s2.carried_in, s2.generation_rounds, s2.kept, s2.carried_out) == (1, 1, 2, 1)
    rows2 = {m["row_index"] for m in batch2.metadata}
    assert len(rows2) == 2 and {0, 1, 2} - rows1 < rows2 and rows2 < {0, 1, 2, 4, 5}
    # Step 3 is one policy version later: with max_staleness=0 the carried group is stale.
    assert (s3.dropped_stale, s3.carried_in) == (1, 0)
    assert batch3.weight_versions.tolist() == [1] * (2 * G)
    assert set(batch1.group_ids.tolist()).isdisjoint(batch2.group_ids.tolist())


def test_prompts_per_round_adapt_to_the_observed_keep_rate():
    engine = ScriptedEngine({0: WRONG, 1: RIGHT, 2: WRONG}, gated=range(6, 100))
    queue = make_queue(engine, num_groups=2, adapt=True)
    _, stats = asyncio.run(queue.next_batch(0))
    # Round 1: 2 prompts, none kept -> keep rate p = (0 + 1) / (2 + 1) -> round 2 may draw
    # ceil((2 + 1.28 * sqrt(2 * (1 - p))) / p) = 11 prompts but issues the ceil(2 / p) = 6
    # expected to fill the batch (rows 2-7); rows 3-5 are kept, the gated 6-7 aborted.
    assert stats.generation_rounds == 2
    assert sorted(engine.calls) == list(range(8))
    assert (stats.kept, stats.aborted, stats.dropped_all_wrong) == (3, 2, 2)


def high_keep_rate_queue(engine: ScriptedEngine, num_groups: int) -> DynamicSamplingQueue:
    queue = make_queue(engine, num_groups=num_groups, adapt=True)
    queue._keep_rate.load_state_dict({"generated": 999.0, "kept": 900.0 - 1.0})
    assert queue._keep_rate.keep_rate == pytest.approx(0.9)
    return queue


def test_a_round_issues_the_groups_expected_to_fill_it_not_its_margin():
    # p = 0.9, 9 groups missing: the round may draw ceil((9 + 1.28 sqrt(0.9)) / 0.9) = 12
    # prompts, but issues ceil(9 / 0.9) = 10; the margin's 2 are not generated (they were
    # aborted in flight, or carried, when the first 10 filled the batch). Row 0 never
    # finishes, so rows 1-9 fill the batch whatever order groups finish in (a dropped row
    # finishing first would rightly draw one more from the budget).
    engine = ScriptedEngine({}, gated=[0])
    queue = high_keep_rate_queue(engine, num_groups=9)
    assert queue._keep_rate.prompts_for(9) == 12
    _, stats = asyncio.run(queue.next_batch(0))
    assert sorted(engine.calls) == list(range(10))
    assert (stats.generation_rounds, stats.kept, stats.aborted, stats.carried_out) == (1, 9, 1, 0)


def test_a_dropped_group_is_replaced_from_the_round_budget_at_once():
    # Rows 0 and 1 are dropped: at most 8 of the 10 issued are kept, and the round's budget
    # (12) replaces them at once (how many depends on when the drops come: ceil(missing / p)
    # groups are kept generating), so the batch fills in one round without a 2nd.
    engine = ScriptedEngine({0: WRONG, 1: WRONG})
    queue = high_keep_rate_queue(engine, num_groups=9)
    _, stats = asyncio.run(queue.next_batch(0))
    assert sorted(engine.calls) in (list(range(11)), list(range(12)))
    assert (stats.generation_rounds, stats.dropped_all_wrong) == (1, 2)
    assert stats.kept - stats.carried_out == 9  # a group finished beside the 9th is carried


def mixed_at_rate(p: float, rows: range) -> dict[int, Sequence[str]]:
    """Rows mixed at the exact rate `p` (row r iff floor((r + 1) p) > floor(r p)), else wrong."""
    return {r: MIXED if int((r + 1) * p) > int(r * p) else WRONG for r in rows}


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_round_size_is_the_keep_rate_plus_a_binomial_margin_not_a_fixed_factor(p: float):
    estimator = KeepRateEstimator(DynamicSamplingConfig(oversample_factor=1.2))
    for script in mixed_at_rate(p, range(1000)).values():
        estimator.observe(kept=script is MIXED)
    p_hat = estimator.keep_rate
    assert p_hat == pytest.approx(p, abs=0.01)
    size = estimator.prompts_for(32)
    assert size == math.ceil((32 + MARGIN_SIGMAS * math.sqrt(32 * (1 - p_hat))) / p_hat)
    # The expected surplus is the margin (~1.8 kept groups at p = 0.9, 6.9 at 0.1), where the
    # old `oversample_factor / p` asked for 20% more whatever p (45 prompts at p = 0.9).
    surplus = size * p - 32
    assert surplus <= MARGIN_SIGMAS * math.sqrt(32 * (1 - p)) + p + 0.5
    # ... and at low keep rates it asks at least as many as before (rounds do not grow).
    if p <= 0.1:
        assert size >= math.ceil(32 * 1.2 / p_hat)


def test_the_keep_rate_estimate_follows_a_drift_and_resumes_exactly():
    engine = ScriptedEngine(mixed_at_rate(0.1, range(100)))
    queue = make_queue(engine, num_groups=2, adapt=True, max_rounds=100)
    for _ in range(5):
        asyncio.run(queue.next_batch(0))

    def keep_rate(q: DynamicSamplingQueue) -> float:
        return KeepRateEstimator(q.sampling, **q.state_dict()["keep_rate"]).keep_rate

    assert keep_rate(queue) < 0.2
    engine.script = dict.fromkeys(range(100), MIXED)  # the policy got better: all rows mixed
    asyncio.run(queue.next_batch(0))
    low = keep_rate(queue)
    for _ in range(10):
        asyncio.run(queue.next_batch(0))
    # Lifetime counts would still say ~0.2 (about 120 groups at 0.1, 25 at 1.0).
    assert keep_rate(queue) > 0.5 > low, "the decayed counts forget the old keep rate"

    state = pickle.loads(pickle.dumps(queue.state_dict()))
    resumed = make_queue(ScriptedEngine(engine.script), num_groups=2, adapt=True)
    resumed.load_state_dict(state)
    drawn = [sum(q.engine.calls.values()) for q in (queue, resumed)]
    for q in (queue, resumed):
        for _ in range(3):
            asyncio.run(q.next_batch(0))
    after = [sum(q.engine.calls.values()) for q in (queue, resumed)]
    assert after[0] - drawn[0] == after[1] - drawn[1] > 0
    assert queue.state_dict()["keep_rate"] == resumed.state_dict()["keep_rate"]


def test_state_dict_resumes_the_prompt_position_and_carried_groups():
    original = make_queue(ScriptedEngine({}, gated=[3]), num_groups=2, oversample=2.0)
    asyncio.run(original.next_batch(0))
    state = pickle.loads(pickle.dumps(original.state_dict()))
    (carried,) = [g.prompt.row_index for g in state["carried"]]
    resumed = make_queue(ScriptedEngine({}), num_groups=2, oversample=2.0)
    resumed.load_state_dict(state)

    def next_step(queue: DynamicSamplingQueue):
        engine = queue.engine
        called_before = set(engine.calls)
        batch, stats = asyncio.run(queue.next_batch(0))
        rows = {m["row_index"] for m in batch.metadata}
        drawn = set(engine.calls) - called_before
        return carried in rows, set(batch.group_ids.tolist()), drawn, stats.carried_in

    assert next_step(resumed) == next_step(original) == (True, {2, 3}, {4, 5}, 1)


def test_routes_are_packed_with_their_tokens_and_carried_groups_keep_them():
    queue = make_queue(ScriptedEngine({}, gated=[3], routed=True), num_groups=2, oversample=2.0)
    batch, _ = asyncio.run(queue.next_batch(0))
    last = batch.sample_offsets[1:] - 1
    fleet_routed = torch.ones(batch.num_tokens, dtype=torch.bool)
    fleet_routed[last] = False
    expected = scripted_routes(batch.tokens.tolist())
    assert torch.equal(batch.routed_experts[fleet_routed], expected[fleet_routed])
    assert batch.routed_experts[last].tolist() == [[[0, 1], [0, 1]]] * batch.num_samples
    (carried,) = pickle.loads(pickle.dumps(queue.state_dict()))["carried"]
    assert all(g.routed_experts is not None for g in carried.generations)
    plain, _ = asyncio.run(make_queue(ScriptedEngine({})).next_batch(0))
    assert plain.routed_experts is None


def test_too_many_generation_rounds_raise_a_clear_error():
    engine = ScriptedEngine({r: WRONG for r in range(100)})
    queue = make_queue(engine, num_groups=2, max_rounds=3)
    with pytest.raises(GenerationRoundsExceeded, match="in 3 generation rounds.*6 as all wrong"):
        asyncio.run(queue.next_batch(0))
    assert sum(engine.calls.values()) == 3 * 2 * G


def test_disabled_dynamic_sampling_keeps_every_group_in_one_round():
    engine = ScriptedEngine({0: RIGHT, 1: WRONG})
    queue = make_queue(engine, enabled=False)
    batch, stats = asyncio.run(queue.next_batch(0))
    assert (stats.generation_rounds, stats.kept, stats.dropped_all_correct) == (1, 2, 0)
    assert torch.all(batch.advantages == 0.0), "constant groups carry no advantage"


def test_async_mode_overlaps_generation_with_training_within_staleness():
    with pytest.raises(ValueError, match="max_staleness >= 1"):
        make_queue(ScriptedEngine({}), async_mode=True, max_staleness=0)
    engine = ScriptedEngine({})
    queue = make_queue(engine, async_mode=True, max_staleness=1)

    async def steps():
        first = await queue.next_batch(0)
        busy = queue.busy_seconds
        queue.start_prefetch(1)
        await asyncio.sleep(0.05)  # "training" step 0 while the next groups generate
        generated_while_training = sum(engine.calls.values())
        await queue.finish_prefetch()
        assert queue.busy_seconds > busy
        engine.weight_version = 1  # weight sync after the training step
        second = await queue.next_batch(1)
        await queue.close()
        return first, second, generated_while_training

    (_, s1), (batch2, s2), overlapped = asyncio.run(steps())
    assert overlapped == s1.generated_samples + 2 * G
    assert batch2.weight_versions.tolist() == [0] * (2 * G)
    assert (s2.generation_rounds, s2.dropped_stale) == (1, 0)
    assert queue_sample(queue, "dapo_queue_staleness_sum") == 2 * G


def test_a_finished_prefetch_is_checkpointed_and_resumes_exactly():
    """Step 1's groups were prefetched (rows 4..7: row 5 aborted, one kept group beyond the
    batch); a queue restored there packs the same batch with the same counts as the original,
    without generating again."""
    script = {0: WRONG, 2: RIGHT}
    original = make_queue(
        ScriptedEngine(script, gated=[5]), async_mode=True, max_staleness=1, oversample=2.0
    )

    async def prefetch() -> dict:
        await original.next_batch(0)  # rows 0..3: 1 and 3 kept
        original.start_prefetch(1)
        with pytest.raises(RuntimeError, match="during a prefetch"):
            original.state_dict()
        await original.finish_prefetch()
        return pickle.loads(pickle.dumps(original.state_dict()))

    state = asyncio.run(prefetch())
    resumed = make_queue(ScriptedEngine(script), async_mode=True, max_staleness=1)
    resumed.load_state_dict(state)
    drawn = sum(resumed.engine.calls.values())
    results = []
    for queue in (original, resumed):
        queue.engine.weight_version = 1
        batch, stats = asyncio.run(queue.next_batch(1))
        timeless = replace(stats, generation_seconds=0.0, reward_seconds=0.0)
        results.append((batch.metadata, batch.weight_versions.tolist(), timeless))
    assert results[0] == results[1]
    assert sum(resumed.engine.calls.values()) == drawn, "the prefetched groups were not redone"
    _, versions, stats = results[0]
    assert versions == [0] * (2 * G)
    assert (stats.generation_rounds, stats.aborted, stats.carried_out) == (1, 1, 1)


def test_overlong_prompts_are_skipped_and_counted_per_step():
    queue = make_queue(ScriptedEngine({}), overlong_rows=(1, 3))
    batch, first = asyncio.run(queue.next_batch(0))
    assert sorted({m["row_index"] for m in batch.metadata}) == [0, 2]
    _, second = asyncio.run(queue.next_batch(1))
    assert (first.skipped_prompts, second.skipped_prompts) == (1, 1)
    assert queue_sample(queue, "dapo_queue_skipped_prompts_total") == 2


@pytest.mark.slow
def test_reward_timeouts_and_errors_are_counted_and_scored_as_wrong(caplog):
    hang, fail, wrong_type = helpers.HANG, helpers.RAISE, helpers.NOT_A_RESULT
    engine = ScriptedEngine({0: ("yes", hang, fail, wrong_type)})
    scripted = f"{HELPERS_MODULE}:scripted_reward"
    with ProcessPoolScorer(scripted, num_workers=2, timeout_s=2.0) as scorer:
        queue = make_queue(engine, scorer=scorer)
        with caplog.at_level(logging.WARNING, logger="pipeline.scoring"):
            batch, stats = asyncio.run(queue.next_batch(0))
    assert (stats.reward_timeouts, stats.reward_errors, stats.kept) == (1, 2, 2)
    assert batch.rewards[:G].tolist() == [1.0, -1.0, -1.0, -1.0]
    assert queue_sample(queue, "dapo_reward_timeouts_total") == 1
    assert queue_sample(queue, "dapo_reward_errors_total") == 2
    assert "prompt row 0: of 4 responses, 1 reward calls timed out and 2 failed" in caplog.text
    assert "ValueError: scripted failure" in caplog.text


def test_a_reward_function_failing_on_every_response_stops_the_step():
    def broken_reward(response: str, ground_truth: str) -> RewardResult:
        return {"score": 1.0}[response]  # KeyError: a reward written for another format

    engine = ScriptedEngine({})
    queue = make_queue(engine, scorer=FunctionScorer(broken_reward))
    message = r"all 8 responses of this step \(0 timed out after reward.timeout_s, 8 raised; "
    with pytest.raises(RewardFunctionFailing, match=message + r"last error: KeyError: 'yes'"):
        asyncio.run(queue.next_batch(0))
    assert sum(engine.calls.values()) == 2 * G, "stopped after the first round"


class SeedRecorder(ScriptedEngine):
    """Records the sampling seed of every request by (row, call index of that row)."""

    def __init__(self, script: dict[int, Sequence[str]]) -> None:
        super().__init__(script)
        self.seeds: dict[tuple[int, int], int] = {}

    async def generate(self, input_ids: Sequence[int], params: SamplingParams) -> Generation:
        self.seeds[(input_ids[0], self.calls[input_ids[0]])] = params.sampling_seed
        return await super().generate(input_ids, params)


def _seeds_of_two_batches(deterministic: bool, resume: bool = False) -> dict:
    engine = SeedRecorder({1: RIGHT, 3: WRONG})
    queue = make_queue(engine, num_groups=3, deterministic=deterministic)
    asyncio.run(queue.next_batch(0))
    if resume:  # a restarted queue, loaded from the first one's state
        state = pickle.loads(pickle.dumps(queue.state_dict()))
        queue = make_queue(engine, num_groups=3, deterministic=deterministic)
        queue.load_state_dict(state)
    asyncio.run(queue.next_batch(0))
    return engine.seeds


def test_every_response_gets_its_own_sampling_seed() -> None:
    for deterministic in (False, True):
        seeds = _seeds_of_two_batches(deterministic)
        assert len(set(seeds.values())) == len(seeds) > 2 * 3 * G
        assert all(0 <= seed < 2**63 for seed in seeds.values())


def test_deterministic_seeds_repeat_across_runs_and_resumes() -> None:
    reference = _seeds_of_two_batches(deterministic=True)
    assert _seeds_of_two_batches(deterministic=True) == reference
    assert _seeds_of_two_batches(deterministic=True, resume=True) == reference
    assert _seeds_of_two_batches(deterministic=False) != _seeds_of_two_batches(deterministic=False)


def test_the_queue_sends_each_group_to_the_fleet_as_one_request():
    """Through the HTTP clients to a stand-in server: one `/generate` per group, holding the
    prompt G times with G distinct seeds; sample i's answer (MIXED[i]) lands in order."""
    posts: list[dict] = []

    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        posts.append(body)
        answers = []
        for text, rid in zip(MIXED, body["rid"], strict=True):
            ids = [ord(c) for c in text]
            meta = {
                "id": rid,
                "finish_reason": {"type": "stop"},
                "output_token_logprobs": [[LOGPROB, t, None] for t in ids],
            }
            answers.append({"output_ids": ids, "meta_info": meta})
        return web.json_response(answers)

    async def main():
        app = web.Application()
        app.router.add_post("/generate", generate)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            async with aiohttp.ClientSession() as session:
                client = RolloutClient([SGLangServerClient(url, session)])
                return await make_queue(client, num_groups=3).next_batch(0)
        finally:
            await runner.cleanup()

    batch, stats = asyncio.run(main())
    assert len(posts) == stats.generated_groups + stats.aborted >= 3
    for body in posts:
        assert len(body["input_ids"]) == G and len(set(map(tuple, body["input_ids"]))) == 1
        assert len({p["sampling_seed"] for p in body["sampling_params"]}) == G
    assert [m["correct"] for m in batch.metadata] == [text == "yes" for text in MIXED] * 3
