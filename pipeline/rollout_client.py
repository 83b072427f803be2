"""The rollout fleet seen as one generation engine: dispatch, failover, pause for weight sync.

`RolloutClient.generate` sends each request to the live server with the fewest requests
outstanding (each server client bounds its own in-flight requests, so callers queue here when
the fleet is saturated). When a server stops answering, its requests are re-issued on the
other servers: every `generate` call returns exactly one response, so no sample is lost or
counted twice. A cancelled `generate` aborts its request on the server.

Weight updates run inside `paused()`: new generations wait, in-flight ones drain, then every
live worker is updated and the client's `weight_version` advances; each response records the
version that generated it. In router mode generation goes through `sglang-router`, while
aborts and weight updates go to the workers directly (the router forwards neither).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Protocol

from pipeline.metrics import FleetMetrics
from pipeline.sglang_client import Generation, SamplingParams, ServerUnavailable, SGLangServerClient


class RolloutEngine(Protocol):
    """What the dynamic-sampling queue needs from a generation engine."""

    weight_version: int

    async def generate(self, input_ids: Sequence[int], params: SamplingParams) -> Generation:
        """One response to `input_ids`, tagged with the generating `weight_version`."""
        ...


class NoLiveServer(RuntimeError):
    """Every server of the fleet has failed."""


class RolloutClient:
    """The fleet as one engine.

    Args:
        workers: one client per SGLang worker (weight updates and aborts go to these).
        router: an `sglang-router` client that generation goes through, or None to balance
            over the workers here.
        metrics: fleet metrics (shared with the server clients).
        initial_weight_version: the policy version the servers hold at start.
    """

    def __init__(
        self,
        workers: Sequence[SGLangServerClient],
        router: SGLangServerClient | None = None,
        metrics: FleetMetrics | None = None,
        initial_weight_version: int = 0,
    ) -> None:
        if not workers:
            raise ValueError("RolloutClient needs at least one worker")
        self.workers = list(workers)
        self.router = router
        self.metrics = metrics if metrics is not None else workers[0].metrics
        self.weight_version = initial_weight_version
        self._dead: set[str] = set()
        self._updating = False
        self._active = 0
        self._state = asyncio.Condition()

    @property
    def live_workers(self) -> list[SGLangServerClient]:
        return [w for w in self.workers if w.url not in self._dead]

    def _pick(self) -> SGLangServerClient:
        if self.router is not None:
            return self.router
        live = self.live_workers
        if not live:
            raise NoLiveServer(f"all {len(self.workers)} rollout servers have failed")
        return min(live, key=lambda w: w.inflight)

    def _mark_dead(self, server: SGLangServerClient) -> None:
        if server is self.router:
            raise NoLiveServer(f"the router {server.url} stopped answering")
        if server.url not in self._dead:
            self._dead.add(server.url)
            self.metrics.server_failures.inc()

    async def generate(self, input_ids: Sequence[int], params: SamplingParams) -> Generation:
        """One response to `input_ids` ([P] token ids), re-issued elsewhere if its server dies.

        Waits while weights are being updated. Raises `NoLiveServer` when no server is left.
        """
        async with self._generation_slot():
            version = self.weight_version
            while True:
                server = self._pick()
                rid = uuid.uuid4().hex
                try:
                    generation = await server.generate(input_ids, params, rid=rid)
                except ServerUnavailable:
                    self._mark_dead(server)
                    self.metrics.reissued_requests.inc()
                    continue
                except asyncio.CancelledError:
                    await asyncio.shield(self._abort_quietly(rid))
                    raise
                return replace(generation, weight_version=version)

    async def _abort_quietly(self, rid: str) -> None:
        """Abort `rid` on every live worker (the router does not forward aborts)."""
        await asyncio.gather(*(w.abort(rid) for w in self.live_workers), return_exceptions=True)

    async def abort_all(self) -> None:
        """Abort every request on every live worker."""
        await asyncio.gather(*(w.abort() for w in self.live_workers), return_exceptions=True)

    @asynccontextmanager
    async def _generation_slot(self) -> AsyncIterator[None]:
        async with self._state:
            await self._state.wait_for(lambda: not self._updating)
            self._active += 1
        try:
            yield
        finally:
            async with self._state:
                self._active -= 1
                self._state.notify_all()

    @asynccontextmanager
    async def paused(self) -> AsyncIterator[list[SGLangServerClient]]:
        """Hold generation for a weight update: new requests wait and in-flight ones finish.

        Yields the live workers to update. Sets nothing itself: the caller assigns
        `weight_version` once the update succeeded.
        """
        async with self._state:
            await self._state.wait_for(lambda: not self._updating)
            self._updating = True
            await self._state.wait_for(lambda: self._active == 0)
        try:
            yield self.live_workers
        finally:
            async with self._state:
                self._updating = False
                self._state.notify_all()

    async def update_weights_from_disk(self, model_path: str, weight_version: int) -> None:
        """Load the HF checkpoint at `model_path` on every live worker as `weight_version`."""
        async with self.paused() as workers:
            await asyncio.gather(
                *(w.update_weights_from_disk(model_path, str(weight_version)) for w in workers)
            )
            self.weight_version = weight_version

    async def update_weights_from_tensor(
        self, serialized_named_tensors: bytes, weight_version: int
    ) -> None:
        """Load tensors from `serialize_named_tensors` on every live worker."""
        async with self.paused() as workers:
            await asyncio.gather(
                *(
                    w.update_weights_from_tensor(serialized_named_tensors, str(weight_version))
                    for w in workers
                )
            )
            self.weight_version = weight_version
