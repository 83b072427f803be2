"""The rollout fleet: local SGLang servers (embedded mode) or remote URLs (cluster mode).

Embedded mode starts `num_servers` SGLang servers on free 127.0.0.1 ports, on the GPUs
`rollout.placement` gives them (`pipeline.colocation.embedded_server_args`) (and, with
`use_router`, an `sglang-router` in front), waits until each answers `/health` (a server whose
port was taken between choosing and binding it, e.g. by another server's internal ports, is
started again on a new port, at most `PORT_CLASH_RETRIES` times; the router:
until `/workers` lists them all, since it answers `/health` before workers register), and
stops every process by PID on exit: `with RolloutFleet(...)` covers normal exit, exceptions
and Ctrl-C (KeyboardInterrupt), and an `atexit` hook covers an interpreter exiting without
leaving the block. Cluster mode only records `server_urls` / `router_url` from the config.

The fleet's `client` re-admits failed servers once they answer again; in embedded mode it also
restarts a server whose process exited, on the same port (`rollout.max_server_restarts`).
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp

from pipeline.colocation import embedded_server_args
from pipeline.config import RolloutConfig
from pipeline.metrics import FleetMetrics
from pipeline.rollout_client import RevivalPolicy, RolloutClient
from pipeline.sglang_client import RetryPolicy, SGLangServerClient
from pipeline.sglang_server import (
    DETERMINISTIC_SERVER_FLAG,
    ROUTED_EXPERTS_SERVER_FLAG,
    ManagedProcess,
    cpu_server_args,
    free_port,
    http_get,
    server_tensor_parallel,
    sglang_dtype_args,
    sglang_server_argv,
    start_router,
)
from pipeline.train_batch import ExpertRouting

logger = logging.getLogger(__name__)

PORT_CLASH_RETRIES = 3
_PORT_CLASH = "address already in use"
CONTROL_CONNECTIONS = 4
"""Connections per server beyond its generation slots: health probes, aborts, weight updates."""


CPU_THREADS_BIND_ENV = "SGLANG_CPU_OMP_THREADS_BIND"
"""SGLang's per-rank CPU cores (`0-3|4-7`: rank r gets group r); without it SGLang allows no more
ranks than NUMA nodes, and it pins threads to the cores only on AMX and arm64 CPUs."""


def server_threads(config: RolloutConfig, trainer_ranks: int) -> int:
    """Threads of each embedded server: `rollout.threads_per_server`, or the usable cores left
    by the node's `trainer_ranks` (one core each) divided among the servers, at least 1.

    Measured on 2 cores beside 2 trainer ranks: the demo's server generates 2x slower with 2
    OpenMP threads than with 1 (15x when other processes load the cores), SmolLM2-135M's 1.2x
    faster (`rollout.threads_per_server` overrides)."""
    if config.threads_per_server is not None:
        return config.threads_per_server
    cores = len(os.sched_getaffinity(0))
    return max(1, (cores - trainer_ranks) // config.num_servers)


def server_thread_env(
    config: RolloutConfig, index: int, cpu: bool, trainer_ranks: int
) -> dict[str, str]:
    """The thread settings of embedded server `index`: each of its TP ranks computes with
    `server_threads // TP` OpenMP/MKL threads; a CPU server of TP > 1 also gets
    `CPU_THREADS_BIND_ENV`, one group of that many cores per rank from the server's share of
    the usable cores (unless the environment sets it)."""
    threads = server_threads(config, trainer_ranks)
    tp = server_tensor_parallel(config.server_args)
    per_rank = max(1, threads // tp)
    env = {"OMP_NUM_THREADS": str(per_rank), "MKL_NUM_THREADS": str(per_rank)}
    if cpu and tp > 1 and CPU_THREADS_BIND_ENV not in os.environ:
        cores = sorted(os.sched_getaffinity(0))
        first = index * threads
        groups = (
            [cores[(first + rank * per_rank + k) % len(cores)] for k in range(per_rank)]
            for rank in range(tp)
        )
        env[CPU_THREADS_BIND_ENV] = "|".join(",".join(map(str, group)) for group in groups)
    return env


@dataclass(frozen=True)
class EmbeddedFleetOptions:
    """How embedded servers are started.

    Attributes:
        model_path: HF model directory served (tokenizer included).
        log_dir: one `<name>.log` per process.
        start_timeout_s: deadline for all servers to become healthy, seconds.
        cpu_defaults: prepend `cpu_server_args(sample_tokens)` to the configured `server_args`.
        dtype: the policy's parameter dtype, served as such (`sglang_dtype_args`); None =
            SGLang's choice. `server_args` may still override it.
    """

    model_path: str
    log_dir: Path
    start_timeout_s: float = 300.0
    cpu_defaults: bool = True
    sample_tokens: int = 0
    """The longest request the run sends (`sample_token_budget`): CPU servers get a KV pool
    that holds it, so SGLang never lowers `max_new_tokens` below the configured length."""
    dtype: str | None = None
    trainer_local_ranks: int = 1
    """Trainer ranks on this node, on GPUs 0..R-1 (`rollout.placement` places servers by them)."""
    visible_gpus: int = 0
    """GPUs this node's processes see; 0 = a CPU node (no GPU flags)."""


class RolloutFleet:
    """Starts (embedded) or locates (cluster) the SGLang servers of a run.

    Attributes:
        worker_urls: one URL per SGLang worker.
        router_url: the router URL, or None when clients balance over the workers.
        processes: the local processes (embedded mode), router last.
        startup_s: seconds from spawning to all healthy (embedded mode).
    """

    def __init__(
        self,
        config: RolloutConfig,
        embedded: EmbeddedFleetOptions | None = None,
        routing: ExpertRouting | None = None,
    ):
        """`routing`: MoE routing replay; embedded servers then run with
        `--enable-return-routed-experts` (cluster servers must be started with it) and every
        client generation asks for its routes."""
        if config.mode == "embedded" and embedded is None:
            raise ValueError("embedded rollout mode needs EmbeddedFleetOptions (model path)")
        self.config = config
        self.embedded = embedded
        self.routing = routing
        self.worker_urls: list[str] = list(config.server_urls)
        self.router_url: str | None = config.router_url
        self.processes: list[ManagedProcess] = []
        self.startup_s = 0.0
        self._restarts: dict[str, int] = {}
        self._placement_args: list[tuple[str, ...]] = []

    def start(self) -> None:
        """Embedded mode: spawn the servers (and router), wait for them; no-op in cluster mode.

        On failure every process already started is stopped before the error propagates.
        """
        if self.config.mode != "embedded":
            return
        assert self.embedded is not None
        self._placement_args = embedded_server_args(
            self.config, self.embedded.trainer_local_ranks, self.embedded.visible_gpus
        )
        atexit.register(self.stop)
        begin = time.monotonic()
        try:
            for index in range(self.config.num_servers):
                self.processes.append(self._spawn_server(index, self.embedded))
            for index in range(self.config.num_servers):
                self._wait_healthy(
                    index, self.embedded, deadline=begin + self.embedded.start_timeout_s
                )
            if self.config.use_router:
                router, self.router_url = start_router(
                    self.worker_urls, self.embedded.log_dir / "router.log"
                )
                self.processes.append(router)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - begin

    def _spawn_server(self, index: int, options: EmbeddedFleetOptions) -> ManagedProcess:
        """Start embedded server `index` on a free port; its URL goes to `worker_urls[index]`."""
        threads = server_thread_env(
            self.config, index, options.cpu_defaults, options.trainer_local_ranks
        )
        env = {**os.environ, **threads}
        extra = (
            *self._placement_args[index],
            *sglang_dtype_args(options.dtype),
            *self.config.server_args,
        )
        if options.cpu_defaults:
            extra = (*cpu_server_args(options.sample_tokens), *extra)
        if self.config.deterministic:
            extra = (*extra, DETERMINISTIC_SERVER_FLAG)
        if self.routing is not None:
            extra = (*extra, ROUTED_EXPERTS_SERVER_FLAG)
        port = free_port()
        argv = sglang_server_argv(options.model_path, port, extra_args=extra)
        process = ManagedProcess(
            f"sglang-{index}", argv, options.log_dir / f"sglang-{index}.log", env
        )
        process.start()
        url = f"http://127.0.0.1:{port}"
        if index < len(self.worker_urls):
            self.worker_urls[index] = url
        else:
            self.worker_urls.append(url)
        return process

    def _wait_healthy(self, index: int, options: EmbeddedFleetOptions, deadline: float) -> None:
        """Wait for server `index`; start it again on a new port if its port was taken."""
        for attempt in range(PORT_CLASH_RETRIES + 1):
            process, url = self.processes[index], self.worker_urls[index]
            try:
                process.wait_until(
                    lambda u=url: http_get(f"{u}/health")[0] == 200,
                    deadline - time.monotonic(),
                    "healthy",
                )
                return
            except RuntimeError:
                clash = _PORT_CLASH in process.log_tail().lower()
                if attempt == PORT_CLASH_RETRIES or not clash:
                    raise
            logger.warning("%s: %s was taken before it bound; new port", process.name, url)
            self.processes[index] = self._spawn_server(index, options)

    def stop(self) -> None:
        """Stop every local process by PID (router first); safe to call twice."""
        for process in reversed(self.processes):
            process.stop()
        atexit.unregister(self.stop)

    def session(self) -> aiohttp.ClientSession:
        """An HTTP session whose connection limits follow the fleet: per host, a server's
        `max_inflight_per_server` slots (behind a router, those of every worker) plus
        `CONTROL_CONNECTIONS`; in all, every host's (aiohttp's default caps a whole fleet at
        100 connections)."""
        hosts = len(self.worker_urls) + (self.router_url is not None)
        per_host = self.config.max_inflight_per_server * (
            len(self.worker_urls) if self.router_url else 1
        )
        connector = aiohttp.TCPConnector(
            limit=hosts * (per_host + CONTROL_CONNECTIONS),
            limit_per_host=per_host + CONTROL_CONNECTIONS,
        )
        return aiohttp.ClientSession(connector=connector)

    def client(
        self,
        session: aiohttp.ClientSession,
        metrics: FleetMetrics | None = None,
        revival: RevivalPolicy | None = None,
    ) -> RolloutClient:
        """A `RolloutClient` over this fleet, using the configured back-pressure and retries;
        failed servers are re-probed by `revival` (default: for `rollout.revival_timeout_s`)
        and, in embedded mode, restarted if their process exited."""
        metrics = metrics if metrics is not None else FleetMetrics()

        def server(url: str, batched: bool = True) -> SGLangServerClient:
            return SGLangServerClient(
                url,
                session,
                batched=batched,
                max_inflight=self.config.max_inflight_per_server,
                timeout_s=self.config.request_timeout_s,
                retry=RetryPolicy(max_retries=self.config.max_retries),
                metrics=metrics,
                routing=self.routing,
            )

        router = server(self.router_url, batched=False) if self.router_url else None
        if revival is None:
            revival = RevivalPolicy(give_up_after_s=self.config.revival_timeout_s)
        return RolloutClient(
            [server(u) for u in self.worker_urls],
            router,
            metrics,
            revival=revival,
            on_worker_down=self.restart_if_exited,
        )

    def restart_if_exited(self, url: str) -> None:
        """Embedded mode: restart the local server at `url` on its port if its process exited,
        at most `rollout.max_server_restarts` times; no-op otherwise (a hung server is left to
        the request timeouts and re-probing)."""
        if self.config.mode != "embedded" or url not in self.worker_urls:
            return
        process = self.processes[self.worker_urls.index(url)]
        if process.is_running():
            return
        restarts = self._restarts.get(url, 0)
        if restarts >= self.config.max_server_restarts:
            return
        self._restarts[url] = restarts + 1
        process.stop()  # reap it and whatever is left of its process group
        process.start()
        logger.warning(
            "%s (%s) exited: restarted on its port (restart %d of at most %d); log %s",
            process.name,
            url,
            restarts + 1,
            self.config.max_server_restarts,
            process.log_path,
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
