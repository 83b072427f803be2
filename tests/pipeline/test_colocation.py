"""Colocated placement (`pipeline.colocation`): the servers' GPUs and flags from a config with a
fake GPU count, the config rules, and the release/resume/update/generate sequence with the
weight version handed over, against a stand-in server that records calls and enforces SGLang's
rules, and against a real CPU SGLang server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pydantic
import pytest
import torch
from aiohttp import web

from megatron_dapo.config.loading import ConfigError, load_config
from pipeline.colocation import (
    KV_CACHE,
    WEIGHTS,
    FleetColocation,
    embedded_server_args,
    embedded_server_gpus,
    server_memory_fraction,
)
from pipeline.config import RolloutConfig
from pipeline.fleet import EmbeddedFleetOptions, RolloutFleet
from pipeline.rollout_client import RevivalPolicy, RolloutClient
from pipeline.sglang_client import SamplingParams, ServerUnavailable, SGLangServerClient

COLOCATED = RolloutConfig(placement="colocated", colocated_memory_fraction=0.3)

# --- placement: pure functions of the config and the node's GPUs ------------------------------


def test_separate_servers_get_the_gpus_after_the_trainer_ranks() -> None:
    rollout = RolloutConfig(num_servers=2)
    assert embedded_server_gpus(rollout, trainer_local_ranks=4, visible_gpus=8) == [(4,), (5,)]
    assert embedded_server_args(rollout, trainer_local_ranks=4, visible_gpus=8) == [
        ("--base-gpu-id", "4"),
        ("--base-gpu-id", "5"),
    ]
    tp2 = RolloutConfig(num_servers=2, server_args=("--tp", "2"))
    assert embedded_server_gpus(tp2, trainer_local_ranks=4, visible_gpus=8) == [(4, 5), (6, 7)]


def test_separate_servers_beyond_the_node_are_an_error() -> None:
    rollout = RolloutConfig(num_servers=2, server_args=("--tp-size=2",))
    with pytest.raises(ValueError, match=r"need 4 GPUs beside the trainer's 6, but the node has 8"):
        embedded_server_gpus(rollout, trainer_local_ranks=6, visible_gpus=8)


def test_colocated_servers_share_the_trainer_ranks_gpus_with_a_memory_fraction() -> None:
    rollout = COLOCATED.model_copy(update={"num_servers": 2, "server_args": ("--tp", "2")})
    assert embedded_server_gpus(rollout, trainer_local_ranks=4, visible_gpus=4) == [(0, 1), (2, 3)]
    shared = ("--mem-fraction-static", "0.3", "--enable-memory-saver")
    assert embedded_server_args(rollout, trainer_local_ranks=4, visible_gpus=4) == [
        ("--base-gpu-id", "0", *shared),
        ("--base-gpu-id", "2", *shared),
    ]
    assert server_memory_fraction(rollout) == 0.3


def test_colocated_servers_without_trainer_ranks_to_share_are_an_error() -> None:
    rollout = COLOCATED.model_copy(update={"num_servers": 3})
    with pytest.raises(ValueError, match=r"need 3 GPUs shared with trainer ranks, but the trainer"):
        embedded_server_gpus(rollout, trainer_local_ranks=2, visible_gpus=8)


def test_cpu_servers_get_no_gpu_flags() -> None:
    for rollout in (RolloutConfig(num_servers=2), COLOCATED.model_copy(update={"num_servers": 2})):
        assert embedded_server_args(rollout, trainer_local_ranks=1, visible_gpus=0) == [(), ()]


def test_separate_memory_fraction_is_the_server_flag_or_sglangs_default() -> None:
    assert server_memory_fraction(RolloutConfig()) is None
    flagged = RolloutConfig(
        mode="cluster", server_urls=("http://a",), server_args=("--mem-fraction-static", "0.2")
    )
    assert server_memory_fraction(flagged) == 0.2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"mode": "cluster", "server_urls": ("http://a",)},
            "colocated needs rollout.mode=embedded",
        ),
        ({"weight_sync": "distributed"}, "NCCL refuses two ranks of one group on one GPU"),
        (
            {"server_args": ("--mem-fraction-static", "0.5")},
            "colocated servers take rollout.colocated_memory_fraction",
        ),
    ],
)
def test_impossible_colocated_configs_are_rejected(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        RolloutConfig(placement="colocated", **fields)


def test_embedded_servers_take_no_gpu_flags_from_server_args() -> None:
    with pytest.raises(pydantic.ValidationError, match="get their GPUs from rollout.placement"):
        RolloutConfig(server_args=("--base-gpu-id", "3"))
    RolloutConfig(placement="colocated", weight_sync="disk")  # disk sync is allowed
    RolloutConfig(placement="colocated", weight_sync="tensor")


def test_colocated_servers_generate_and_train_in_turn_whatever_the_staleness() -> None:
    # they hold no memory while the trainer trains: nothing to overlap generation with
    assert RolloutConfig(max_staleness=1).overlaps_generation
    assert not RolloutConfig(max_staleness=1, placement="colocated").overlaps_generation
    assert not RolloutConfig(max_staleness=0).overlaps_generation


def test_a_run_config_places_colocated_servers_on_its_trainer_ranks() -> None:
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo-cpu.yaml"  # 2 local ranks
    config = load_config(demo, ["rollout.placement=colocated", "rollout.num_servers=2"])
    assert config.data_plane_config().trainer_local_ranks == 2
    with pytest.raises(ConfigError, match="need 3 GPUs shared with trainer ranks"):
        load_config(demo, ["rollout.placement=colocated", "rollout.num_servers=3"])


# --- the call sequence, against a stand-in that enforces SGLang's rules ----------------------


class ColocatedStandIn:
    """Records the calls of one SGLang server and refuses what SGLang refuses (or what would
    be garbage on a GPU): a release while requests run, a resume of a tag not released,
    generation with memory released, a weight update into released weights."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.released: set[str] = set()
        self.running = 0
        self.version = "default"

    def _refuse(self, problem: str) -> web.Response:
        self.calls.append(("REFUSED", problem))
        return web.json_response({"error": problem}, status=400)

    async def generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("generate", self.version))
        if self.released:
            return self._refuse(f"generate with {sorted(self.released)} released")
        self.running += 1
        try:
            await asyncio.sleep(0.05)
        finally:
            self.running -= 1
        meta = {
            "finish_reason": {"type": "length", "length": 1},
            "output_token_logprobs": [[-0.5, 7, None]],
            "weight_version": self.version,
        }
        return web.json_response(
            [{"output_ids": [7], "meta_info": {**meta, "id": rid}} for rid in body["rid"]]
        )

    async def release(self, request: web.Request) -> web.Response:
        tags = (await request.json())["tags"]
        self.calls.append(("release", tuple(tags)))
        if self.running:
            return self._refuse("release while requests run")
        self.released |= set(tags)
        return web.json_response(None)

    async def resume(self, request: web.Request) -> web.Response:
        tags = (await request.json())["tags"]
        self.calls.append(("resume", tuple(tags)))
        if not set(tags) <= self.released:
            return self._refuse(f"resume of {tags}, released {sorted(self.released)}")
        self.released -= set(tags)
        return web.json_response(None)

    async def update_from_disk(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("update_weights_from_disk", body["weight_version"]))
        if WEIGHTS in self.released:
            return self._refuse("weight update into released weights")
        self.version = body["weight_version"]
        return web.json_response({"success": True})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/release_memory_occupation", self.release)
        app.router.add_post("/resume_memory_occupation", self.resume)
        app.router.add_post("/update_weights_from_disk", self.update_from_disk)
        app.router.add_get("/health", self.health)
        return app


Body = Callable[[RolloutClient, FleetColocation], Awaitable[Any]]


async def _with_stand_ins(servers: list[ColocatedStandIn], body: Body) -> Any:
    """Run `body` on a client and colocation over `servers`, served on free local ports."""
    runners = []
    try:
        urls = []
        for server in servers:
            runner = web.AppRunner(server.app())
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            urls.append(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}")
        async with aiohttp.ClientSession() as session:
            workers = [SGLangServerClient(url, session, timeout_s=30.0) for url in urls]
            client = RolloutClient(workers, revival=RevivalPolicy(give_up_after_s=0))
            return await body(client, FleetColocation(client))
    finally:
        for runner in runners:
            await runner.cleanup()


async def _step(client: RolloutClient, colocation: FleetColocation, version: int) -> list[int]:
    """One colocated step as the data plane drives it: generate, release, (train), resume the
    weights, sync as `version + 1`, resume the KV cache. Returns the generating versions."""
    await colocation.before_generation()
    params = SamplingParams(max_new_tokens=1)
    generations = await asyncio.gather(*(client.generate([1, 2], params) for _ in range(4)))
    await colocation.before_training()
    await colocation.before_weight_sync()
    await client.update_weights_from_disk(f"/weights/v{version + 1}", version + 1)
    return [g.weight_version for g in generations]


def test_a_colocated_step_releases_trains_resumes_syncs_and_generates_in_order() -> None:
    servers = [ColocatedStandIn(), ColocatedStandIn()]

    async def body(client: RolloutClient, colocation: FleetColocation) -> list[list[int]]:
        versions = [await _step(client, colocation, step) for step in range(2)]
        await colocation.before_generation()
        generation = await client.generate([1, 2], SamplingParams(max_new_tokens=1))
        return [*versions, [generation.weight_version]]

    versions = asyncio.run(_with_stand_ins(servers, body))
    assert versions == [[0] * 4, [1] * 4, [2]]
    both = (KV_CACHE, WEIGHTS)
    for server in servers:
        calls = [call for call in server.calls if call[0] != "generate"]
        assert calls == [
            ("release", both),
            ("resume", (WEIGHTS,)),
            ("update_weights_from_disk", "1"),
            ("resume", (KV_CACHE,)),
            ("release", both),
            ("resume", (WEIGHTS,)),
            ("update_weights_from_disk", "2"),
            ("resume", (KV_CACHE,)),
        ]
    assert sum(len(s.calls) for s in servers) == 2 * 8 + 9


def test_release_waits_for_running_generations() -> None:
    server = ColocatedStandIn()

    async def body(client: RolloutClient, colocation: FleetColocation) -> None:
        params = SamplingParams(max_new_tokens=1)
        running = [asyncio.create_task(client.generate([1], params)) for _ in range(3)]
        await asyncio.sleep(0.01)
        await colocation.before_training()
        await asyncio.gather(*running)

    asyncio.run(_with_stand_ins([server], body))
    assert [name for name, _ in server.calls] == ["generate"] * 3 + ["release"]


def test_generating_before_the_weights_are_synced_is_an_error() -> None:
    server = ColocatedStandIn()

    async def body(client: RolloutClient, colocation: FleetColocation) -> None:
        await colocation.before_training()
        with pytest.raises(RuntimeError, match="weights released for training and not synced"):
            await colocation.before_generation()
        await colocation.before_training()  # released already: nothing released twice

    asyncio.run(_with_stand_ins([server], body))
    assert server.calls == [("release", (KV_CACHE, WEIGHTS))]


def test_a_step_without_release_resumes_nothing() -> None:
    """A resumed run syncs before its first generation: nothing was released, so nothing is
    resumed (SGLang refuses to resume a tag it did not release)."""
    server = ColocatedStandIn()

    async def body(client: RolloutClient, colocation: FleetColocation) -> None:
        await colocation.before_weight_sync()
        await client.update_weights_from_disk("/weights/v3", 3)
        await colocation.before_generation()

    asyncio.run(_with_stand_ins([server], body))
    assert server.calls == [("update_weights_from_disk", "3")]


# --- a real SGLang server on CPU -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.server
def test_a_real_server_releases_resumes_and_serves_the_synced_weights(
    tiny_models, tmp_path: Path, reference_logprobs
) -> None:
    """One embedded colocated CPU server (SGLang's no-op memory saver: the calls, not the
    freeing, are tested): after generate, release, resume weights, a disk update to the other
    policy as version 1 and resume KV cache, it serves the other policy's log-probs. A second
    resume kills the server, which is why the colocation tracks what each server released."""
    rollout = COLOCATED.model_copy(update={"request_timeout_s": 120.0, "max_retries": 0})
    options = EmbeddedFleetOptions(str(tiny_models.base), tmp_path, start_timeout_s=400.0)
    prompt = [2, 11, 3]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)

    async def main(fleet: RolloutFleet) -> tuple[Any, Any]:
        async with aiohttp.ClientSession() as session:
            client = fleet.client(session)
            colocation = FleetColocation(client)
            before = await client.generate(prompt, params)
            await colocation.before_training()
            await colocation.before_weight_sync()
            await client.update_weights_from_disk(str(tiny_models.other), 1)
            await colocation.before_generation()
            after = await client.generate(prompt, params)
            await client.close()
            with pytest.raises(ServerUnavailable):  # the scheduler dies (KeyError: 'kv_cache')
                await client.workers[0].resume_memory_occupation([KV_CACHE])
            return before, after

    with RolloutFleet(rollout, options) as fleet:
        before, after = asyncio.run(main(fleet))
    assert (before.weight_version, after.weight_version) == (0, 1)
    assert after.server_weight_version == "1"
    expected = reference_logprobs(tiny_models.other, prompt, after.output_ids)
    got = torch.tensor(after.output_logprobs, dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
