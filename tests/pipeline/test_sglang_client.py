"""The SGLang client against real CPU servers of a tiny random-weight model.

Sampling log-probs (and the prefill log-probs of a given sequence) are checked against an
independent forward pass of the same weights in `transformers`; weight updates (disk, gloo
broadcast, tensors) are checked by the log-probs then matching the other policy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.rollout_client import RolloutClient
from pipeline.sglang_client import Generation, SamplingParams, SGLangServerClient, sample_rids
from pipeline.sglang_server import free_port
from pipeline.weight_sync import WeightSender, WeightSync, pack_buckets

pytestmark = [pytest.mark.slow, pytest.mark.server]

T = TypeVar("T")
MESSAGES = [{"role": "user", "content": "What is 12 + 30? Answer briefly."}]


def run_with_client(urls: list[str], body: Callable[[RolloutClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with aiohttp.ClientSession() as session:
            workers = [
                SGLangServerClient(u, session, max_inflight=8, timeout_s=120.0) for u in urls
            ]
            return await body(RolloutClient(workers))

    return asyncio.run(main())


def prompt_ids(model_dir: Path) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return list(
        tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    )


@pytest.fixture
def assert_matches_policy(reference_logprobs):
    """Asserts a response's sampling log-probs are those of the model at `model_dir`."""

    def check(model_dir: Path, prompt: list[int], generation: Generation) -> None:
        expected = reference_logprobs(model_dir, prompt, generation.output_ids)
        got = torch.tensor(generation.output_logprobs, dtype=torch.float64)
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)

    return check


def test_generate_logprobs_match_transformers_and_finish_reasons(
    tiny_models, live_urls, assert_matches_policy
):
    prompt = prompt_ids(tiny_models.base)
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0)

    async def body(client: RolloutClient) -> list[Generation]:
        for worker in client.workers:
            assert await worker.health_generate()
            await worker.flush_cache()
        return await asyncio.gather(
            *(client.generate(prompt, sampled) for _ in range(4)),
            client.generate(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True)),
            client.generate(
                prompt, SamplingParams(max_new_tokens=6, stop_token_ids=tuple(range(104)))
            ),
        )

    *samples, truncated, stopped = run_with_client(live_urls, body)
    for generation in samples:
        assert 1 <= len(generation.output_ids) <= 16
        assert len(generation.output_logprobs) == len(generation.output_ids)
        assert generation.weight_version == 0
        assert_matches_policy(tiny_models.base, prompt, generation)
    assert len({g.output_ids for g in samples}) > 1, "temperature 1 should give distinct samples"
    assert (truncated.finish_reason, len(truncated.output_ids)) == ("length", 6)
    assert (stopped.finish_reason, len(stopped.output_ids)) == ("stop", 1)


def test_a_group_is_one_request_whose_samples_equal_single_requests(
    tiny_models, live_urls, assert_matches_policy
):
    """One `/generate` of G samples: sampled ones are distinct, each with the policy's
    log-probs; greedy ones equal the single requests of the same parameters (ids, log-probs,
    finish reason), each sample keeping its own stop tokens and length."""
    prompt = prompt_ids(tiny_models.base)
    greedy = [
        SamplingParams(max_new_tokens=8, temperature=0.0),
        SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True),
        SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=tuple(range(104))),
        SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True),
    ]

    async def body(client: RolloutClient):
        server = client.workers[0]
        sampled = await client.generate_group(prompt, [SamplingParams(max_new_tokens=16)] * 4)
        group = await server.generate_group(prompt, greedy)
        requests = server.metrics.registry.get_sample_value(
            "dapo_fleet_requests_total", {"run": "default", "server": server.url}
        )
        singles = [await server.generate(prompt, params) for params in greedy]
        return sampled, group, singles, requests

    sampled, group, singles, requests = run_with_client(live_urls[:1], body)
    assert requests == 2, "each group is one request"
    assert len(sampled) == 4 and len({g.output_ids for g in sampled}) > 1
    for generation in sampled:
        assert generation.weight_version == 0
        assert_matches_policy(tiny_models.base, prompt, generation)
    for batched, single in zip(group, singles, strict=True):
        assert (batched.output_ids, batched.finish_reason) == (
            single.output_ids,
            single.finish_reason,
        )
        torch.testing.assert_close(
            torch.tensor(batched.output_logprobs), torch.tensor(single.output_logprobs)
        )
    assert [(g.finish_reason, len(g.output_ids)) for g in group[1:]] == [
        ("length", 6),
        ("stop", 1),
        ("length", 3),
    ]


def test_sequence_logprobs_match_transformers(tiny_models, live_urls, reference_logprobs):
    prompt = prompt_ids(tiny_models.base)
    response = AutoTokenizer.from_pretrained(tiny_models.base).encode("12 + 30 = 42.")

    async def body(client: RolloutClient) -> tuple[float, ...]:
        return await client.workers[0].sequence_logprobs(prompt + response)

    scores = run_with_client(live_urls, body)
    assert len(scores) == len(prompt) + len(response) - 1
    expected = reference_logprobs(tiny_models.base, prompt, response)
    got = torch.tensor(scores[len(prompt) - 1 :], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)


def test_abort_ends_a_running_request(tiny_models, live_urls):
    prompt = prompt_ids(tiny_models.base)
    long = SamplingParams(max_new_tokens=4000, ignore_eos=True)

    async def body(client: RolloutClient) -> Generation:
        server = client.workers[0]
        task = asyncio.create_task(server.generate(prompt, long, rid="abort-me"))
        await asyncio.sleep(1.0)
        for _ in range(60):  # repeated: an abort that beats the request to the server is a no-op
            await server.abort(sample_rids("abort-me", 1)[0])
            await asyncio.wait({task}, timeout=0.5)
            if task.done():
                break
        return await asyncio.wait_for(task, timeout=5.0)

    generation = run_with_client(live_urls, body)
    assert generation.finish_reason == "abort"
    assert 0 < len(generation.output_ids) < 4000


def greedy(client: RolloutClient, prompt: list[int]) -> Awaitable[list[Generation]]:
    """One greedy response per live worker (each server is checked)."""
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    return asyncio.gather(*(w.generate(prompt, params) for w in client.live_workers))


def test_update_weights_from_disk_changes_outputs(tiny_models, live_urls, assert_matches_policy):
    prompt = prompt_ids(tiny_models.base)

    async def body(client: RolloutClient) -> tuple[list[Generation], ...]:
        before = await greedy(client, prompt)
        await client.update_weights_from_disk(str(tiny_models.other), weight_version=1)
        after = await greedy(client, prompt)
        await client.update_weights_from_disk(str(tiny_models.base), weight_version=2)
        return before, after, await greedy(client, prompt)

    before, after, restored = run_with_client(live_urls, body)
    for old, new, back in zip(before, after, restored, strict=True):
        assert_matches_policy(tiny_models.base, prompt, old)
        assert_matches_policy(tiny_models.other, prompt, new)
        assert new.output_logprobs != old.output_logprobs
        assert new.server_weight_version == "1"
        assert back.output_ids == old.output_ids and back.server_weight_version == "2"


def named_parameters(model_dir: Path) -> list[tuple[str, torch.Tensor]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return [(name, p.detach().clone()) for name, p in model.state_dict().items()]


@pytest.mark.parametrize("mode", ["distributed", "tensor"])
def test_streamed_weight_sync_loads_each_version(
    mode, tiny_models, live_urls, assert_matches_policy, tmp_path
):
    """A one-stage trainer stand-in streams a policy in 4 KiB buckets (`WeightSender` in a
    thread, the store a local `TCPStore`) while `WeightSync` loads them on both servers (the
    distributed update group: 1 + 2 ranks)."""
    prompt = prompt_ids(tiny_models.base)
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)

    async def body(client: RolloutClient) -> tuple[list[Generation], list[Generation]]:
        sync = WeightSync(mode, client, store.clone(), 1, tmp_path, tiny_models.base)
        sender = WeightSender(mode, store, stage=0, run_dir=tmp_path)
        results = []
        for version, model in ((5, tiny_models.other), (6, tiny_models.base)):
            buckets = pack_buckets(named_parameters(model), 4096)
            await asyncio.gather(
                sync.sync(version), asyncio.to_thread(sender.send, version, buckets)
            )
            assert client.weight_version == version
            results.append(await greedy(client, prompt))
        await sync.close()
        return results[0], results[1]

    pushed, restored = run_with_client(live_urls, body)
    for new, back in zip(pushed, restored, strict=True):
        assert_matches_policy(tiny_models.other, prompt, new)
        assert_matches_policy(tiny_models.base, prompt, back)
        assert (new.server_weight_version, back.server_weight_version) == ("5", "6")
