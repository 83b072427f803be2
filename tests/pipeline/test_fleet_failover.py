"""Fleet processes and faults: stop by process group, fail fast; a SIGKILLed server's requests
are re-issued elsewhere and it misses weight updates; the fleet restarts it on its port and it is
re-admitted with the weights caught up; a frozen (SIGSTOP) server is cut by the request timeout and
re-admitted when it thaws; with every server down, requests wait for one to come back.

The server tests share the session's two-server fleet: one restart (~45-120 s on 2 busy cores)
is the only extra server start."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable

import aiohttp
import pytest
import torch

from pipeline.fleet import RolloutFleet
from pipeline.metrics import FleetMetrics
from pipeline.rollout_client import RevivalPolicy, RolloutClient
from pipeline.sglang_client import Generation, RetryPolicy, SamplingParams, SGLangServerClient
from pipeline.sglang_server import ManagedProcess, http_get


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stop_kills_the_whole_process_group(tmp_path):
    child_pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(child_pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(300)\n"
    )
    process = ManagedProcess("sleeper", [sys.executable, "-c", script], tmp_path / "log", None)
    process.start()
    process.wait_until(child_pid_file.exists, 30.0, "writing its child pid")
    time.sleep(0.2)
    child_pid = int(child_pid_file.read_text())
    assert _pid_alive(child_pid) and process.is_running()
    process.stop(grace_s=5.0)
    assert not process.is_running()
    deadline = time.monotonic() + 5.0
    while _pid_alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # the orphaned child is reaped by init
    assert not _pid_alive(child_pid)


def test_wait_fails_fast_with_the_log_of_a_crashed_process(tmp_path):
    argv = [sys.executable, "-c", "import sys; print('bad model path'); sys.exit(3)"]
    process = ManagedProcess("crasher", argv, tmp_path / "crash.log", None)
    process.start()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="(?s)exited with code 3.*bad model path"):
        process.wait_until(lambda: False, 60.0, "healthy")
    assert time.monotonic() - start < 30.0


@pytest.mark.slow
@pytest.mark.server
def test_sigkilled_server_requests_are_reissued_and_none_lost(
    tiny_models, sglang_fleet: RolloutFleet
):
    alive = [u for u in sglang_fleet.worker_urls if http_get(f"{u}/health")[0] == 200]
    if len(alive) < 2:
        pytest.skip("needs two live servers")
    victim_index = sglang_fleet.worker_urls.index(alive[1])
    victim = sglang_fleet.processes[victim_index]
    response_length = 1000  # ~seconds per request: the victim's are still running at the kill
    params = SamplingParams(max_new_tokens=response_length, ignore_eos=True)
    num_requests = 12
    metrics = FleetMetrics()

    async def main() -> list[Generation]:
        async with aiohttp.ClientSession() as session:
            workers = [
                SGLangServerClient(u, session, max_inflight=4, timeout_s=120.0, metrics=metrics)
                for u in alive
            ]
            client = RolloutClient(workers, metrics=metrics)
            tasks = [
                asyncio.create_task(client.generate([2, 10 + i, 3], params))
                for i in range(num_requests)
            ]
            while workers[1].inflight < 4 or workers[0].inflight < 4:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            assert workers[1].inflight == 4, "the victim's requests finished before the kill"
            victim.signal(signal.SIGKILL)
            return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert len(results) == num_requests
    assert all(g.finish_reason == "length" for g in results)
    assert all(len(g.output_ids) == response_length for g in results)
    assert Counter(g.server_url for g in results) == {alive[0]: num_requests}
    sample = fleet_sample(metrics)
    assert sample("dapo_fleet_server_failures_total", server=alive[1]) == 1
    assert sample("dapo_fleet_server_failures_total", server=alive[0]) is None
    assert sample("dapo_fleet_live_servers") == 1
    assert sample("dapo_fleet_reissued_requests_total") >= 4
    answered = sum(sample("dapo_fleet_requests_total", server=u) or 0.0 for u in alive)
    assert answered == num_requests, "a request was answered twice or not at all"
    print(f"re-issued {sample('dapo_fleet_reissued_requests_total'):.0f} of {num_requests}")


def fleet_sample(metrics: FleetMetrics) -> Callable[..., float | None]:
    """`sample(name, **labels)`: a sample of `metrics` for its run."""
    return lambda name, **labels: metrics.registry.get_sample_value(
        name, {"run": metrics.run, **labels}
    )


@pytest.mark.slow
@pytest.mark.server
def test_a_dead_embedded_server_is_restarted_and_readmitted_with_the_current_weights(
    tiny_models, sglang_fleet: RolloutFleet, reference_logprobs, caplog
):
    """Server 1 is dead (SIGKILL) while idle: a disk weight update skips it, the fleet restarts
    it on its port, and the client re-admits it with the update replayed: it then serves the
    new policy."""
    survivor_url, victim_url = sglang_fleet.worker_urls
    if http_get(f"{survivor_url}/health")[0] != 200:
        pytest.skip("needs server 0 alive")
    victim = sglang_fleet.processes[1]
    victim.signal(signal.SIGKILL)  # the failover test above may have killed it already
    metrics = FleetMetrics(run="revival")
    revival = RevivalPolicy(first_delay_s=0.5, max_delay_s=2.0, give_up_after_s=300.0)
    prompt = [2, 11, 3]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)

    async def main() -> tuple[list[Generation], float]:
        async with aiohttp.ClientSession() as session:
            client = sglang_fleet.client(session, metrics, revival)
            await client.update_weights_from_disk(str(tiny_models.other), weight_version=1)
            assert [w.url for w in client.live_workers] == [survivor_url]
            assert client.weight_version == 1
            failed = time.monotonic()
            while victim_url not in [w.url for w in client.live_workers]:
                assert time.monotonic() - failed < 300.0, "the dead server was not re-used"
                await asyncio.sleep(0.2)
            readmit_s = time.monotonic() - failed
            try:
                return await asyncio.gather(
                    *(client.generate(prompt, params) for _ in range(8))
                ), readmit_s
            finally:
                await client.update_weights_from_disk(str(tiny_models.base), weight_version=2)
                await client.close()

    with caplog.at_level(logging.WARNING):
        generations, readmit_s = asyncio.run(main())
    assert victim.is_running()
    by_server = Counter(g.server_url for g in generations)
    assert by_server[victim_url] >= 2 and by_server[survivor_url] >= 2
    assert {g.server_weight_version for g in generations} == {"1"}
    revived = next(g for g in generations if g.server_url == victim_url)
    expected = reference_logprobs(tiny_models.other, prompt, revived.output_ids)
    got = torch.tensor(revived.output_logprobs, dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
    sample = fleet_sample(metrics)
    assert sample("dapo_fleet_server_failures_total", server=victim_url) == 1
    assert sample("dapo_fleet_server_revivals_total", server=victim_url) == 1
    assert sample("dapo_fleet_live_servers") == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"sglang-1 ({victim_url}) exited: restarted") for m in messages)
    assert any(m.startswith(f"rollout server {victim_url} is back after") for m in messages)
    print(f"failure to re-admission (restart included): {readmit_s:.1f} s")


TIMEOUT_S = 3.0
SHORT = SamplingParams(max_new_tokens=8, ignore_eos=True)


def impatient_client(
    session: aiohttp.ClientSession, urls: list[str], metrics: FleetMetrics
) -> RolloutClient:
    """A client giving up on a request after 3 s and one retry, re-probing every 0.5-1 s."""
    retry = RetryPolicy(max_retries=1, backoff_s=0.2)
    workers = [SGLangServerClient(u, session, 4, TIMEOUT_S, retry, metrics=metrics) for u in urls]
    revival = RevivalPolicy(first_delay_s=0.5, max_delay_s=1.0, give_up_after_s=120.0)
    return RolloutClient(workers, metrics=metrics, revival=revival)


@pytest.mark.slow
@pytest.mark.server
def test_a_frozen_server_times_out_and_is_readmitted_once_it_answers_again(
    sglang_fleet: RolloutFleet,
):
    """SIGSTOP freezes server 1 (connections accepted, never answered): its requests time
    out, are retried once, then re-issued on server 0; after SIGCONT it is re-admitted."""
    urls = sglang_fleet.worker_urls
    if any(http_get(f"{u}/health")[0] != 200 for u in urls):
        pytest.skip("needs both servers alive")
    frozen = sglang_fleet.processes[1]
    metrics = FleetMetrics(run="frozen")

    async def generate_on_both(client: RolloutClient) -> list[Generation]:
        return await asyncio.gather(*(client.generate([2, 12, 3], SHORT) for _ in range(4)))

    async def main() -> tuple[list[Generation], list[Generation], float, float]:
        async with aiohttp.ClientSession() as session:
            client = impatient_client(session, urls, metrics)
            frozen.signal(signal.SIGSTOP)
            try:
                start = time.monotonic()
                during = await generate_on_both(client)
                failover_s = time.monotonic() - start
                assert [w.url for w in client.live_workers] == [urls[0]]
            finally:
                frozen.signal(signal.SIGCONT)
            thawed = time.monotonic()
            while len(client.live_workers) < 2:
                assert time.monotonic() - thawed < 60.0, "the thawed server was not re-admitted"
                await asyncio.sleep(0.1)
            readmit_s = time.monotonic() - thawed
            after = await generate_on_both(client)
            await client.close()
            return during, after, failover_s, readmit_s

    during, after, failover_s, readmit_s = asyncio.run(main())
    assert {g.server_url for g in during} == {urls[0]}
    assert {g.server_url for g in after} == set(urls)
    # Two requests went to the frozen server: each timed out twice (one retry), then moved.
    assert 2 * TIMEOUT_S <= failover_s < 2 * TIMEOUT_S + 10.0
    sample = fleet_sample(metrics)
    assert sample("dapo_fleet_retries_total", server=urls[1]) == 2
    assert sample("dapo_fleet_reissued_requests_total") == 2
    assert sample("dapo_fleet_server_failures_total", server=urls[1]) == 1
    assert sample("dapo_fleet_server_revivals_total", server=urls[1]) == 1
    print(f"frozen: failover after {failover_s:.1f} s, re-admitted {readmit_s:.1f} s after thaw")


@pytest.mark.slow
@pytest.mark.server
def test_with_every_server_frozen_requests_wait_until_one_comes_back(sglang_fleet: RolloutFleet):
    urls = sglang_fleet.worker_urls
    if any(http_get(f"{u}/health")[0] != 200 for u in urls):
        pytest.skip("needs both servers alive")
    metrics = FleetMetrics(run="all-frozen")

    async def main() -> list[Generation]:
        async with aiohttp.ClientSession() as session:
            client = impatient_client(session, urls, metrics)
            for process in sglang_fleet.processes:
                process.signal(signal.SIGSTOP)
            try:
                tasks = [asyncio.create_task(client.generate([2, 13, 3], SHORT)) for _ in range(2)]
                start = time.monotonic()
                while client.live_workers:
                    assert time.monotonic() - start < 60.0, "frozen servers were not dropped"
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)
                assert not any(t.done() for t in tasks), "requests wait for a server to return"
            finally:
                for process in sglang_fleet.processes:
                    process.signal(signal.SIGCONT)
            generations = await asyncio.wait_for(asyncio.gather(*tasks), 60.0)
            await client.close()
            return generations

    generations = asyncio.run(main())
    assert [len(g.output_ids) for g in generations] == [8, 8]
    sample = fleet_sample(metrics)
    for url in urls:
        assert sample("dapo_fleet_server_failures_total", server=url) == 1
        assert sample("dapo_fleet_server_revivals_total", server=url) == 1
