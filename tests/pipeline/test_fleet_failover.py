"""Fleet processes: stop by process group, fail fast, and failover when a server is SIGKILLed."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter

import aiohttp
import pytest

from pipeline.fleet import RolloutFleet
from pipeline.metrics import FleetMetrics
from pipeline.rollout_client import RolloutClient
from pipeline.sglang_client import Generation, SamplingParams, SGLangServerClient
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
    params = SamplingParams(max_new_tokens=300, ignore_eos=True)
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
            assert not any(t.done() for t in tasks), "requests finished before the kill"
            victim.signal(signal.SIGKILL)
            return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert len(results) == num_requests
    assert all(g.finish_reason == "length" and len(g.output_ids) == 300 for g in results)
    assert Counter(g.server_url for g in results) == {alive[0]: num_requests}
    sample = metrics.registry.get_sample_value
    assert sample("dapo_fleet_server_failures_total") == 1
    assert sample("dapo_fleet_reissued_requests_total") >= 4
    answered = sum(sample("dapo_fleet_requests_total", {"server": u}) or 0.0 for u in alive)
    assert answered == num_requests, "a request was answered twice or not at all"
