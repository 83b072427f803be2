"""Retries, back-pressure and error mapping of the server client, against a local aiohttp
server that scripts SGLang's `/generate` answers."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from pipeline.metrics import FleetMetrics
from pipeline.sglang_client import (
    RetryPolicy,
    SamplingParams,
    ServerRequestError,
    ServerUnavailable,
    SGLangServerClient,
)

PARAMS = SamplingParams(max_new_tokens=2)


class ScriptedServer:
    """Answers `/generate` with the scripted statuses first, then with a 2-token response."""

    def __init__(self, statuses: list[int], delay_s: float = 0.0) -> None:
        self.statuses = list(statuses)
        self.delay_s = delay_s
        self.calls = 0
        self.concurrent = 0
        self.max_concurrent = 0

    async def generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls += 1
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            await asyncio.sleep(self.delay_s)
            if self.statuses:
                return web.Response(status=self.statuses.pop(0), text="scripted failure")
            return web.json_response(
                [
                    {
                        "text": "ab",
                        "output_ids": [7, 8],
                        "meta_info": {
                            "finish_reason": {"type": "length", "length": 2},
                            "output_token_logprobs": [[-0.1, 7, None], [-0.2, 8, None]],
                            "weight_version": "default",
                            "id": rid,
                        },
                    }
                    for rid in body["rid"]
                ]
            )
        finally:
            self.concurrent -= 1

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)


async def serve(script: ScriptedServer, body, **client_kwargs):
    app = web.Application()
    app.router.add_post("/generate", script.generate)
    app.router.add_get("/health", script.health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            client = SGLangServerClient(f"http://127.0.0.1:{port}", session, **client_kwargs)
            return await body(client), client
    finally:
        await runner.cleanup()


def test_server_errors_are_retried_with_backoff_then_succeed():
    script = ScriptedServer([503, 500])
    metrics = FleetMetrics()
    retry = RetryPolicy(max_retries=3, backoff_s=0.1)

    async def body(client):
        start = asyncio.get_running_loop().time()
        generation = await client.generate([1, 2], PARAMS)
        return generation, asyncio.get_running_loop().time() - start

    (generation, elapsed), client = asyncio.run(serve(script, body, retry=retry, metrics=metrics))
    assert generation.output_ids == (7, 8) and generation.output_logprobs == (-0.1, -0.2)
    assert script.calls == 3
    assert elapsed >= 0.1 + 0.2, "backoff doubles: 0.1 s then 0.2 s"
    assert (
        metrics.registry.get_sample_value(
            "dapo_fleet_retries_total", {"run": "default", "server": client.url}
        )
        == 2
    )


def test_exhausted_retries_and_client_errors_raise():
    retry = RetryPolicy(max_retries=1, backoff_s=0.01)

    async def body(client):
        return await client.generate([1], PARAMS)

    with pytest.raises(ServerUnavailable, match="failed 2 times"):
        asyncio.run(serve(ScriptedServer([503, 503, 503]), body, retry=retry))
    with pytest.raises(ServerRequestError, match="400"):
        asyncio.run(serve(ScriptedServer([400]), body, retry=retry))


def test_inflight_requests_are_bounded_per_server():
    script = ScriptedServer([], delay_s=0.05)

    async def body(client):
        return await asyncio.gather(*(client.generate([i], PARAMS) for i in range(12)))

    results, _ = asyncio.run(serve(script, body, max_inflight=3))
    assert len(results) == 12 and script.max_concurrent == 3
