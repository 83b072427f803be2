"""The rollout fleet seen as one generation engine: dispatch, failover, revival, pause for
weight sync.

`RolloutClient.generate_group` sends the G samples of a prompt as one request to the live
server with the fewest samples outstanding (each server client bounds its own in-flight
samples, so callers queue here when the fleet is saturated); in router mode the router client's
bound is `max_inflight` of a worker times the live workers, and it sends one request per sample
(`sglang-router` takes one prompt per `/generate`). When a server stops answering, its
requests are re-issued, whole, on the other servers: every call returns exactly its G
responses, so no sample is lost or counted twice. A cancelled call aborts its samples on the
server. A server that fails
during a weight update is dropped from the fleet like one that fails during generation.

A failed server is re-probed in the background (`/health`, with exponential backoff, for at
most `RevivalPolicy.give_up_after_s`). When it answers again it is brought to the fleet's
weights (a restarted server holds the initial weights: the last disk update is replayed on it)
and re-admitted. A server whose weights cannot be brought up to date (they came by broadcast or
tensors) stays out. While no server is live but some are being probed, `generate` waits.

Weight updates run inside `weight_update()` (the revival lock, then `paused()`): new
generations wait, in-flight ones drain, then every live worker is updated and the client's
`weight_version` advances; each response records the version that generated it. In router
mode generation goes through `sglang-router`, while aborts and weight updates go to the
workers directly (the router forwards neither).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Protocol

from pipeline.metrics import FleetMetrics
from pipeline.sglang_client import (
    Generation,
    SamplingParams,
    ServerRequestError,
    ServerUnavailable,
    SGLangServerClient,
    sample_rids,
)

logger = logging.getLogger(__name__)


class RolloutEngine(Protocol):
    """What the dynamic-sampling queue needs from a generation engine."""

    weight_version: int

    async def generate_group(
        self, input_ids: Sequence[int], params: Sequence[SamplingParams]
    ) -> list[Generation]:
        """`len(params)` responses to `input_ids`, the i-th sampled with `params[i]`, each
        tagged with the generating `weight_version`."""
        ...


class NoLiveServer(RuntimeError):
    """Every server of the fleet has failed (and none is being re-probed)."""


@dataclass(frozen=True)
class RevivalPolicy:
    """How a failed worker is re-probed: GET `/health` `first_delay_s` after the failure, then
    with the delay doubling up to `max_delay_s`, until `give_up_after_s` seconds have passed
    since the failure (0: failed workers are never re-probed). Seconds."""

    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    give_up_after_s: float = 3600.0


class RolloutClient:
    """The fleet as one engine.

    Args:
        workers: one client per SGLang worker (weight updates and aborts go to these).
        router: an `sglang-router` client that generation goes through, or None to balance
            over the workers here.
        metrics: fleet metrics (shared with the server clients).
        initial_weight_version: the policy version the servers hold at start (and after a
            restart).
        revival: how failed workers are re-probed and re-admitted.
        on_worker_down: called with a failed worker's URL when it is declared dead and after
            each probe it does not answer (the embedded fleet restarts exited servers there).
    """

    def __init__(
        self,
        workers: Sequence[SGLangServerClient],
        router: SGLangServerClient | None = None,
        metrics: FleetMetrics | None = None,
        initial_weight_version: int = 0,
        revival: RevivalPolicy = RevivalPolicy(),
        on_worker_down: Callable[[str], None] | None = None,
    ) -> None:
        if not workers:
            raise ValueError("RolloutClient needs at least one worker")
        self.workers = list(workers)
        self.router = router
        self.metrics = metrics if metrics is not None else workers[0].metrics
        self.weight_version = initial_weight_version
        self.revival = revival
        self.on_worker_down = on_worker_down
        self._initial_weight_version = initial_weight_version
        self._disk_weights: tuple[str, int] | None = None
        self._revival_blocker: str | None = None
        self._dead: set[str] = set()
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._updating = False
        self._active = 0
        self._state = asyncio.Condition()
        self._weights_lock = asyncio.Lock()
        self._live_changed()

    def _live_changed(self) -> None:
        """Export the live worker count and size the router's in-flight bound by it."""
        live = self.live_workers
        self.metrics.live_servers.set(len(live))
        if self.router is not None:
            self.router.slots.capacity = max(1, sum(w.max_inflight for w in live))

    async def check_request_capacity(self, sample_tokens: int) -> None:
        """Every worker can serve a request of `sample_tokens` tokens (`sample_token_budget`)
        without lowering its `max_new_tokens`.

        Raises:
            ServerRequestError: the workers too small, each with its capacity.
        """
        capacities = await asyncio.gather(*(w.request_capacity() for w in self.workers))
        small = [
            f"{worker.url} ({capacity} tokens)"
            for worker, capacity in zip(self.workers, capacities, strict=True)
            if capacity < sample_tokens
        ]
        if small:
            raise ServerRequestError(
                f"a sample needs {sample_tokens} tokens of a server's context and KV pool "
                f"(data.max_prompt_length + rollout.max_response_length + the server's "
                f"reserve), more than {', '.join(small)} can hold: start the servers with a "
                "larger --context-length / --max-total-tokens, or lower the lengths"
            )

    @property
    def live_workers(self) -> list[SGLangServerClient]:
        return [w for w in self.workers if w.url not in self._dead]

    def _pick(self) -> SGLangServerClient | None:
        """The router, or the live worker with the fewest requests outstanding (None if none)."""
        if self.router is not None:
            return self.router
        return min(self.live_workers, key=lambda w: w.inflight, default=None)

    async def _wait_for_live_worker(self) -> None:
        """Return once a worker is live; wait while failed ones are being re-probed.

        Raises:
            NoLiveServer: every worker failed and none is being re-probed.
        """
        if self.router is not None or self.live_workers:
            return
        if self._probes:
            logger.warning(
                "no live rollout server: waiting for one of %d to come back", len(self._probes)
            )
            async with self._state:
                await self._state.wait_for(lambda: bool(self.live_workers or not self._probes))
        if not self.live_workers:
            raise NoLiveServer(
                f"all {len(self.workers)} rollout servers have failed and none came back"
            )

    def _mark_dead(self, server: SGLangServerClient, error: Exception) -> None:
        """Take `server` out of the fleet (once) and start re-probing it."""
        if server is self.router:
            raise NoLiveServer(f"the router {server.url} stopped answering: {error}") from error
        if server.url in self._dead:
            return
        self._dead.add(server.url)
        self.metrics.server_failures.labels(server.url).inc()
        self._live_changed()
        logger.warning(
            "rollout server %s failed (%s); %d of %d servers left",
            server.url,
            error,
            len(self.live_workers),
            len(self.workers),
        )
        if self.revival.give_up_after_s > 0 and self._revival_blocker is None:
            self._report_down(server)
            self._probes[server.url] = asyncio.create_task(self._revive(server))

    def _report_down(self, server: SGLangServerClient) -> None:
        if self.on_worker_down is not None:
            self.on_worker_down(server.url)

    async def _revive(self, server: SGLangServerClient) -> None:
        """Re-probe a failed worker until it answers, bring it to the fleet's weights, and
        re-admit it; give up after `revival.give_up_after_s`."""
        policy = self.revival
        failed_at = time.monotonic()
        delay = policy.first_delay_s
        try:
            while time.monotonic() - failed_at < policy.give_up_after_s:
                await asyncio.sleep(delay)
                delay = min(2 * delay, policy.max_delay_s)
                if server.session.closed:
                    return
                if self._revival_blocker is not None:
                    logger.warning("%s stays out: %s", server.url, self._revival_blocker)
                    return
                if not await server.is_alive():
                    self._report_down(server)
                    continue
                try:
                    async with self._weights_lock:
                        if await self._catch_up(server):
                            self._readmit(server, time.monotonic() - failed_at)
                except (ServerUnavailable, ServerRequestError) as error:
                    logger.warning("%s answers but could not be re-admitted: %s", server.url, error)
                    continue
                return
            logger.error(
                "rollout server %s did not come back within %.0f s; it stays out",
                server.url,
                policy.give_up_after_s,
            )
        finally:
            self._probes.pop(server.url, None)
            async with self._state:
                self._state.notify_all()

    async def _catch_up(self, server: SGLangServerClient) -> bool:
        """Bring a revived `server` to `weight_version`; False if that is impossible."""
        if self.weight_version == self._initial_weight_version:
            return True
        if self._disk_weights is not None and self._disk_weights[1] == self.weight_version:
            path, version = self._disk_weights
            await server.update_weights_from_disk(path, str(version))
            return True
        logger.warning(
            "%s answers again but stays out: weight version %d did not come from disk, so it "
            "cannot be loaded on the server",
            server.url,
            self.weight_version,
        )
        return False

    def _readmit(self, server: SGLangServerClient, down_s: float) -> None:
        self._dead.discard(server.url)
        self.metrics.server_revivals.labels(server.url).inc()
        self._live_changed()
        logger.warning(
            "rollout server %s is back after %.1f s (weight version %d): re-admitted",
            server.url,
            down_s,
            self.weight_version,
        )

    def stop_revivals(self, reason: str) -> None:
        """Keep failed workers out from now on (e.g. they cannot rejoin a broadcast group)."""
        self._revival_blocker = reason

    async def close(self) -> None:
        """Stop re-probing failed workers."""
        probes = list(self._probes.values())
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)

    async def generate(self, input_ids: Sequence[int], params: SamplingParams) -> Generation:
        """One response to `input_ids` ([P] token ids): `generate_group` of one sample."""
        (generation,) = await self.generate_group(input_ids, [params])
        return generation

    async def generate_group(
        self, input_ids: Sequence[int], params: Sequence[SamplingParams]
    ) -> list[Generation]:
        """`len(params)` responses to `input_ids` ([P] token ids), the i-th sampled with
        `params[i]`, in one request; re-issued whole elsewhere if its server dies.

        Waits while weights are being updated, and while no server is live but some are
        being re-probed. Raises `NoLiveServer` when no server is left.
        """
        while True:
            await self._wait_for_live_worker()
            async with self._generation_slot():
                server = self._pick()
                if server is None:
                    continue  # the last live worker failed meanwhile: wait outside the slot
                version = self.weight_version
                rid = uuid.uuid4().hex
                try:
                    generations = await server.generate_group(input_ids, params, rid=rid)
                except ServerUnavailable as error:
                    self._mark_dead(server, error)
                    self.metrics.reissued_requests.inc()
                    continue
                except asyncio.CancelledError:
                    await asyncio.shield(self._abort_quietly(sample_rids(rid, len(params))))
                    raise
                return [replace(g, weight_version=version) for g in generations]

    async def _abort_quietly(self, rids: Sequence[str]) -> None:
        """Abort requests `rids` on every live worker (the router does not forward aborts)."""
        await asyncio.gather(
            *(w.abort(rid) for w in self.live_workers for rid in rids), return_exceptions=True
        )

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

    @asynccontextmanager
    async def weight_update(self, weight_version: int) -> AsyncIterator[FleetUpdate]:
        """Update the live workers' weights to `weight_version`, under the lock that guards
        revival and with generation paused (`paused()`); `weight_version` is set when the block
        ends without an error. The only way the fleet's weight version changes.

        Raises:
            NoLiveServer: no worker took the update (and none is being re-probed).
        """
        async with self._weights_lock, self.paused() as workers:
            yield FleetUpdate(self, workers)
            if not self.live_workers and not self._probes:
                raise NoLiveServer(f"no rollout server took weight version {weight_version}")
            self.weight_version = weight_version

    async def update_weights_from_disk(self, model_path: str, weight_version: int) -> None:
        """Load the HF checkpoint at `model_path` on every live worker as `weight_version`.

        A worker that stops answering is dropped (and re-probed) as during generation; the
        load is replayed on each worker that comes back.

        Raises:
            NoLiveServer: no worker took the update.
            ServerRequestError: a worker rejected the update (e.g. a bad checkpoint path).
        """
        async with self.weight_update(weight_version) as update:
            await update.each(lambda w: w.update_weights_from_disk(model_path, str(weight_version)))
        self._disk_weights = (model_path, weight_version)


class FleetUpdate:
    """The workers of one `RolloutClient.weight_update` (`workers`, those live when it began)."""

    def __init__(self, client: RolloutClient, workers: list[SGLangServerClient]) -> None:
        self._client = client
        self.workers = workers

    async def each(self, call: Callable[[SGLangServerClient], Awaitable[None]]) -> None:
        """Run `call` on every worker of the update still live, concurrently. A worker that
        stops answering is dropped (and re-probed) as during generation.

        Raises:
            ServerRequestError: a worker rejected the call.
        """
        live = [w for w in self.workers if w.url not in self._client._dead]
        outcomes = await asyncio.gather(*(call(w) for w in live), return_exceptions=True)
        for worker, outcome in zip(live, outcomes, strict=True):
            if isinstance(outcome, ServerUnavailable):
                self._client._mark_dead(worker, outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
