"""The fleet's limits (threads, connections, in-flight samples) and generation through a real
`sglang-router` in front of the test fleet's workers."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest

from pipeline.config import RolloutConfig
from pipeline.fleet import (
    CONTROL_CONNECTIONS,
    CPU_THREADS_BIND_ENV,
    RolloutFleet,
    server_thread_env,
)
from pipeline.rollout_client import RevivalPolicy, RolloutClient
from pipeline.sglang_client import SamplingParams, ServerUnavailable, SGLangServerClient
from pipeline.sglang_server import start_router


def test_cluster_mode_connects_to_configured_urls_without_starting_anything():
    config = RolloutConfig(
        mode="cluster",
        server_urls=("http://10.0.0.1:30000", "http://10.0.0.2:30000/"),
        router_url="http://10.0.0.9:30000",
        max_inflight_per_server=7,
    )

    async def main(fleet: RolloutFleet):
        async with fleet.session() as session:
            client = fleet.client(session, revival=RevivalPolicy(give_up_after_s=0))
            router_slots = [client.router.slots.capacity]
            client._mark_dead(client.workers[0], ServerUnavailable("gone"))
            router_slots.append(client.router.slots.capacity)
            return client, router_slots, session.connector

    with RolloutFleet(config) as fleet:
        processes, (client, router_slots, connector) = fleet.processes, asyncio.run(main(fleet))
    assert processes == []
    assert [w.url for w in client.workers] == ["http://10.0.0.1:30000", "http://10.0.0.2:30000"]
    assert client.router is not None and client.router.url == "http://10.0.0.9:30000"
    assert all(w.max_inflight == 7 and w.batched for w in client.workers)
    assert not client.router.batched, "the router takes one prompt per request"
    assert router_slots == [14, 7], "behind the router: 7 samples per live worker"
    per_host = 14 + CONTROL_CONNECTIONS  # the router carries both workers' samples
    assert (connector.limit_per_host, connector.limit) == (per_host, 3 * per_host)


def test_connection_limits_scale_with_the_servers():
    urls = tuple(f"http://10.0.0.{i}:30000" for i in range(1, 9))
    config = RolloutConfig(mode="cluster", server_urls=urls, max_inflight_per_server=64)

    async def main(fleet: RolloutFleet):
        async with fleet.session() as session:
            return session.connector

    with RolloutFleet(config) as fleet:
        connector = asyncio.run(main(fleet))
    per_host = 64 + CONTROL_CONNECTIONS
    assert (connector.limit_per_host, connector.limit) == (per_host, 8 * per_host)


@pytest.mark.slow
@pytest.mark.server
def test_generation_goes_through_the_router_and_aborts_go_to_workers(live_urls, tmp_path):
    router, router_url = start_router(live_urls, tmp_path / "router.log")
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)

    async def main():
        async with aiohttp.ClientSession() as session:
            workers = [SGLangServerClient(u, session) for u in live_urls]
            router = SGLangServerClient(router_url, session, batched=False)
            client = RolloutClient(workers, router=router)
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


def test_embedded_servers_share_the_cores(monkeypatch):
    """By default the cores the trainer ranks leave are divided among the servers; a CPU server
    of TP 2 binds each rank to its own half of its share (SGLang allows no more ranks than
    NUMA nodes otherwise)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(10)))
    monkeypatch.delenv(CPU_THREADS_BIND_ENV, raising=False)
    two = RolloutConfig(num_servers=2)
    assert server_thread_env(two, 1, cpu=True, trainer_ranks=2) == {
        "OMP_NUM_THREADS": "4",
        "MKL_NUM_THREADS": "4",
    }
    tp2 = RolloutConfig(num_servers=2, server_args=("--tp", "2"))
    assert server_thread_env(tp2, 1, cpu=True, trainer_ranks=2) == {
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
        CPU_THREADS_BIND_ENV: "4,5|6,7",
    }
    assert CPU_THREADS_BIND_ENV not in server_thread_env(tp2, 1, cpu=False, trainer_ranks=2)
    crowded = server_thread_env(RolloutConfig(num_servers=2), 0, cpu=True, trainer_ranks=10)
    assert crowded["OMP_NUM_THREADS"] == "1", "at least one thread"
    pinned = RolloutConfig(num_servers=2, threads_per_server=3)
    assert server_thread_env(pinned, 0, cpu=True, trainer_ranks=2)["OMP_NUM_THREADS"] == "3"
