"""Generation through a real `sglang-router` in front of the test fleet's workers."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from pipeline.config import RolloutConfig
from pipeline.fleet import RolloutFleet
from pipeline.rollout_client import RolloutClient
from pipeline.sglang_client import SamplingParams, SGLangServerClient
from pipeline.sglang_server import start_router


def test_cluster_mode_connects_to_configured_urls_without_starting_anything():
    config = RolloutConfig(
        mode="cluster",
        server_urls=("http://10.0.0.1:30000", "http://10.0.0.2:30000/"),
        router_url="http://10.0.0.9:30000",
        max_inflight_per_server=7,
    )

    async def main(fleet: RolloutFleet):
        async with aiohttp.ClientSession() as session:
            return fleet.client(session)

    with RolloutFleet(config) as fleet:
        processes, client = fleet.processes, asyncio.run(main(fleet))
    assert processes == []
    assert [w.url for w in client.workers] == ["http://10.0.0.1:30000", "http://10.0.0.2:30000"]
    assert client.router is not None and client.router.url == "http://10.0.0.9:30000"
    assert all(w.max_inflight == 7 for w in client.workers)


@pytest.mark.slow
@pytest.mark.server
def test_generation_goes_through_the_router_and_aborts_go_to_workers(live_urls, tmp_path):
    router, router_url = start_router(live_urls, tmp_path / "router.log")
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)

    async def main():
        async with aiohttp.ClientSession() as session:
            workers = [SGLangServerClient(u, session) for u in live_urls]
            client = RolloutClient(workers, router=SGLangServerClient(router_url, session))
            results = await asyncio.gather(
                *(client.generate([2, 40, 41], params) for _ in range(6))
            )
            long = asyncio.create_task(
                client.generate([2, 40], SamplingParams(max_new_tokens=4000, ignore_eos=True))
            )
            for _ in range(60):  # until the router has forwarded it and the abort lands
                await asyncio.sleep(0.5)
                await client.abort_all()
                if long.done():
                    break
            return results, await asyncio.wait_for(long, 5.0)

    try:
        results, aborted = asyncio.run(main())
    finally:
        router.stop()
    assert all(r.server_url == router_url and len(r.output_ids) == 5 for r in results)
    assert aborted.finish_reason == "abort"
    assert not router.is_running()
