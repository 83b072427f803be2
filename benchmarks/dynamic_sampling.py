"""Dynamic-sampling queue versus a synchronous re-generation loop, plus SGLang set-up costs.

Part 1 (simulated engine, stated in the output): for several acceptance rates (the fraction of
prompt groups with 0 < accuracy < 1) both strategies fill the same number of steps:

* queue: `pipeline.dynamic_sampling.DynamicSamplingQueue` (streams groups as they finish,
  over-samples, carries surplus kept groups to the next step, aborts the rest);
* sync loop (the verl DAPO recipe's approach): generate a whole batch of prompts, wait for
  all of it, filter, repeat until enough groups are kept, truncate the surplus away.

The simulated engine serves at most `--concurrency` requests at a time (a fleet's batch
capacity); a response takes `length * per_token_s` seconds, with lengths drawn from a
long-tailed (log-normal) distribution clipped to the maximum response length. Both sides use
the same prompts, correctness script and latency draws per (prompt, sample).

Part 2 (measured here): the size of SGLang and its CPU run-time dependencies in the
environment's site-packages, and, with `--server`, the start time of one embedded SGLang
server on CPU serving a tiny random-weight model.

Run: `PYTHONPATH=. python benchmarks/dynamic_sampling.py [--server]`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pipeline.advantages import AdvantageConfig
from pipeline.config import DynamicSamplingConfig, OverlongConfig, RolloutConfig
from pipeline.dynamic_sampling import DynamicSamplingQueue
from pipeline.group_filter import filter_groups
from pipeline.prompts import PromptRow, PromptSource
from pipeline.rewards.base import FunctionScorer, RewardResult
from pipeline.sglang_client import Generation, SamplingParams

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class LatencyModel:
    """Response length ~ LogNormal(log(median_tokens), sigma) clipped to [1, max_tokens]."""

    median_tokens: float = 300.0
    sigma: float = 0.8
    max_tokens: int = 2048
    per_token_s: float = 2e-4

    def length(self, rng: random.Random) -> int:
        draw = math.exp(rng.gauss(math.log(self.median_tokens), self.sigma))
        return max(1, min(self.max_tokens, int(draw)))


class SimulatedEngine:
    """A fleet of `concurrency` request slots; prompt row r is the token r.

    Row r's group is mixed (some correct) with probability `acceptance`, else all correct or
    all wrong with equal odds; every (row, sample) gets a fixed length draw.
    """

    def __init__(self, acceptance: float, concurrency: int, latency: LatencyModel, seed: int):
        self.acceptance = acceptance
        self.latency = latency
        self.seed = seed
        self.weight_version = 0
        self.slots = asyncio.Semaphore(concurrency)
        self.samples_started: dict[int, int] = {}
        self.generated = 0
        """Samples that began generating (took a slot), finished or aborted."""

    async def generate_group(
        self, input_ids: Sequence[int], params: Sequence[SamplingParams]
    ) -> list[Generation]:
        """The group's samples, one `generate` each."""
        return list(await asyncio.gather(*(self.generate(input_ids, p) for p in params)))

    def keepable(self, row: int, group_size: int, max_tokens: int) -> bool:
        """Whether row's group is mixed, a response cut at `max_tokens` counting as wrong."""
        kind = self._row_kind(row)
        cut = any(
            self.latency.length(random.Random((self.seed * 1_000_003 + row) * 64 + i)) >= max_tokens
            for i in range(group_size)
        )
        return kind == "mixed" or (kind == "right" and cut)

    def _row_kind(self, row: int) -> str:
        rng = random.Random(self.seed * 1_000_003 + row)
        if rng.random() < self.acceptance:
            return "mixed"
        return "right" if rng.random() < 0.5 else "wrong"

    async def generate(self, input_ids: Sequence[int], params: SamplingParams) -> Generation:
        row = input_ids[0]
        index = self.samples_started.get(row, 0)
        self.samples_started[row] = index + 1
        rng = random.Random((self.seed * 1_000_003 + row) * 64 + index)
        length = min(self.latency.length(rng), params.max_new_tokens)
        kind = self._row_kind(row)
        correct = kind == "right" or (kind == "mixed" and index % 2 == 0)
        async with self.slots:
            self.generated += 1  # counted once started: a sample aborted in flight counts whole
            await asyncio.sleep(length * self.latency.per_token_s)
        token = ord("y") if correct else ord("n")
        return Generation(
            output_ids=(token,) * length,
            output_logprobs=(-1.0,) * length,
            finish_reason="length" if length == params.max_new_tokens else "stop",
            server_weight_version=str(self.weight_version),
            server_url="simulated",
            weight_version=self.weight_version,
        )


def yes_reward(response: str, ground_truth: str) -> RewardResult:
    return RewardResult.from_correctness(response.startswith("y"), response[:1])


class RowTokenizer:
    def apply_chat_template(self, conversation, **kwargs) -> list[int]:
        return [int(conversation[0]["content"])]

    def encode(self, text: str, **kwargs) -> list[int]:
        return [int(text)]


def prompt_source(num_rows: int) -> PromptSource:
    rows = [PromptRow([{"role": "user", "content": str(r)}], "y") for r in range(num_rows)]
    return PromptSource(rows, RowTokenizer(), max_prompt_length=4, shuffle=False)


async def run_queue(
    engine: SimulatedEngine, prompts: PromptSource, args: argparse.Namespace
) -> tuple[float, int]:
    queue = DynamicSamplingQueue(
        prompts=prompts,
        engine=engine,
        scorer=FunctionScorer(yes_reward),
        decode=lambda ids: "".join(map(chr, ids[:1])),
        advantage=AdvantageConfig(estimator="dr_grpo"),
        num_groups=args.groups,
        rollout=RolloutConfig(
            n_samples_per_prompt=args.group_size, max_response_length=args.max_tokens
        ),
        sampling=DynamicSamplingConfig(
            max_generation_rounds=1000, oversample_factor=args.oversample
        ),
        overlong=OverlongConfig(soft_punishment=False),
    )
    rounds = 0
    for _ in range(args.steps):
        _, stats = await queue.next_batch(engine.weight_version)
        rounds += stats.generation_rounds
    return rounds / args.steps, engine.generated


async def run_sync_loop(
    engine: SimulatedEngine, prompts: PromptSource, args: argparse.Namespace
) -> tuple[float, int]:
    """verl recipe: whole batches of `groups` prompts, filter, repeat, truncate the surplus."""
    params = SamplingParams(max_new_tokens=args.max_tokens)
    rounds = 0
    for _ in range(args.steps):
        kept = 0
        while kept < args.groups:
            rounds += 1
            batch = prompts.next_prompts(args.groups)
            groups = await asyncio.gather(
                *(
                    asyncio.gather(
                        *(engine.generate(p.input_ids, params) for _ in range(args.group_size))
                    )
                    for p in batch
                )
            )
            # The queue's rule (reward.score_truncated "wrong"): a cut response is wrong.
            correct = [
                [g.output_ids[0] == ord("y") and g.finish_reason != "length" for g in group]
                for group in groups
            ]
            kept += filter_groups(correct).num_kept
    return rounds / args.steps, engine.generated


def compare(args: argparse.Namespace) -> None:
    latency = LatencyModel(max_tokens=args.max_tokens)
    print(
        f"Simulated engine: {args.concurrency} concurrent requests, response length "
        f"log-normal(median {latency.median_tokens:.0f}, sigma {latency.sigma}) clipped to "
        f"{args.max_tokens} tokens, {latency.per_token_s * 1e6:.0f} us/token; {args.steps} steps "
        f"of {args.groups} groups x G={args.group_size}; queue oversample {args.oversample}."
    )
    header = (
        "| acceptance | 1/p_keep | queue gen/kept | queue / (1/p) | sync gen/kept "
        "| queue rounds/step | sync rounds/step | queue wall s | sync wall s | speed-up |"
    )
    print(header)
    print("|" + "---|" * 10)
    kept_samples = args.steps * args.groups * args.group_size
    for acceptance in args.acceptance:
        results = []
        inverse_p = 0.0
        for runner in (run_queue, run_sync_loop):
            engine = SimulatedEngine(acceptance, args.concurrency, latency, args.seed)
            prompts = prompt_source(50_000)
            begin = time.perf_counter()
            rounds, generated = asyncio.run(runner(engine, prompts, args))
            results.append((generated / kept_samples, rounds, time.perf_counter() - begin))
            if runner is run_queue:
                rows = range(len(engine.samples_started))
                keepable = sum(engine.keepable(r, args.group_size, args.max_tokens) for r in rows)
                inverse_p = len(rows) / keepable
        (q_ratio, q_rounds, q_wall), (s_ratio, s_rounds, s_wall) = results
        print(
            f"| {acceptance:.2f} | {inverse_p:.2f} | {q_ratio:.2f} | {q_ratio / inverse_p:.2f} | "
            f"{s_ratio:.2f} | {q_rounds:.2f} | "
            f"{s_rounds:.2f} | {q_wall:.2f} | {s_wall:.2f} | {s_wall / q_wall:.2f}x |"
        )


def _dist_size(dist: metadata.Distribution) -> int:
    total = 0
    for file in dist.files or ():
        path = Path(dist.locate_file(file))
        if path.is_file():
            total += path.stat().st_size
    return total


def _closure(names: Sequence[str]) -> set[str]:
    """Distribution names of `names` and everything they require (unconditionally)."""
    seen: set[str] = set()
    todo = [n.lower().replace("_", "-") for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for requirement in dist.requires or ():
            if ";" in requirement and "extra ==" in requirement:
                continue
            todo.append(re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower())
    return seen


def install_size() -> None:
    names = []
    for req in ("sglang.txt", "sglang-nodeps.txt"):
        for line in (REPO / "requirements" / req).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                names.append(re.split(r"[\s<>=!~;\[]", line.strip(), maxsplit=1)[0])
    closure = _closure(names)
    sizes = {name: _dist_size(metadata.distribution(name)) for name in closure}
    torch_family = {n for n in closure if n == "torch" or n.startswith(("nvidia-", "cuda-"))}
    gib = 2**30
    print("\nSGLang install size (files of installed distributions, this environment):")
    print(f"- sglang itself: {sizes.get('sglang', 0) / gib:.2f} GiB")
    print(
        f"- SGLang CPU run-time set without torch/CUDA wheels ({len(closure - torch_family)} "
        f"distributions): {sum(sizes[n] for n in closure - torch_family) / gib:.2f} GiB"
    )
    print(
        f"- with torch and its CUDA wheels (shared with the trainer): "
        f"{sum(sizes.values()) / gib:.2f} GiB"
    )


def server_start_time() -> None:
    from pipeline.config import RolloutConfig
    from pipeline.fleet import EmbeddedFleetOptions, RolloutFleet
    from pipeline.tokenizer import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "model")
        options = EmbeddedFleetOptions(str(model), Path(tmp) / "logs")
        with RolloutFleet(RolloutConfig(num_servers=1), options) as fleet:
            print(f"\nSGLang server start (spawn to /health 200, CPU): {fleet.startup_s:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--acceptance", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.9])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--oversample", type=float, default=1.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server", action="store_true", help="also time an SGLang start")
    args = parser.parse_args()
    compare(args)
    install_size()
    if args.server:
        server_start_time()


if __name__ == "__main__":
    main()
