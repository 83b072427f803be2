"""The length budget against real SGLang servers on CPU: embedded servers hold a full-length
sample, a server that cannot is refused at start-up, and a response the server would cut below
`max_new_tokens` is an error, never a silent `length` finish."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from pipeline.config import RolloutConfig
from pipeline.fleet import EmbeddedFleetOptions, RolloutFleet
from pipeline.rollout_client import RolloutClient
from pipeline.sglang_client import (
    ResponseCutShort,
    SamplingParams,
    ServerRequestError,
    SGLangServerClient,
)
from pipeline.sglang_server import CPU_KV_TOKENS, sample_token_budget
from pipeline.tokenizer import TinyModelConfig, write_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.server]


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a 16k-token context."""
    config = TinyModelConfig(max_position_embeddings=16384)
    return write_tiny_model(tmp_path_factory.mktemp("long") / "model", config)


def _on_fleet(model: Path, log_dir: Path, rollout: RolloutConfig, sample_tokens: int, body):
    options = EmbeddedFleetOptions(
        str(model), log_dir, dtype="float32", sample_tokens=sample_tokens
    )

    async def main():
        async with aiohttp.ClientSession() as session:
            servers = [SGLangServerClient(u, session, timeout_s=120.0) for u in fleet.worker_urls]
            return await body(RolloutClient(servers), servers[0])

    with RolloutFleet(rollout, options) as fleet:
        return asyncio.run(main())


def test_embedded_servers_hold_a_sample_longer_than_the_default_pool(long_context_model, tmp_path):
    sample = sample_token_budget(max_prompt_length=1024, max_response_length=CPU_KV_TOKENS)

    async def body(client: RolloutClient, server: SGLangServerClient):
        await client.check_request_capacity(sample)  # raises if the pool were the default
        prompt = list(range(4, 104)) * 3  # 300 tokens
        params = SamplingParams(max_new_tokens=40, ignore_eos=True)
        return await server.request_capacity(), await server.generate(prompt, params)

    capacity, generation = _on_fleet(
        long_context_model, tmp_path, RolloutConfig(num_servers=1), sample, body
    )
    assert capacity >= sample > CPU_KV_TOKENS
    assert (len(generation.output_ids), generation.finish_reason) == (40, "length")


def test_a_server_too_small_for_a_sample_is_refused_and_never_cuts_silently(
    long_context_model, tmp_path
):
    small = RolloutConfig(num_servers=1, server_args=("--max-total-tokens", "256"))
    prompt = list(range(4, 104)) * 2  # 200 tokens, + 100 new > the 256-token pool

    async def body(client: RolloutClient, server: SGLangServerClient):
        with pytest.raises(ServerRequestError, match=r"a sample needs 302 tokens") as refused:
            await client.check_request_capacity(sample_token_budget(200, 100))
        with pytest.raises(ResponseCutShort, match=r"prompt of 200 tokens, max_new_tokens 100"):
            await server.generate(prompt, SamplingParams(max_new_tokens=100, ignore_eos=True))
        return str(refused.value), await server.request_capacity()

    message, capacity = _on_fleet(long_context_model, tmp_path, small, 0, body)
    assert capacity <= 256 and f"({capacity} tokens)" in message
