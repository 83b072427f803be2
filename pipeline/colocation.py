"""Placement of embedded SGLang servers on GPUs, and colocated servers' memory hand-over.

Placement (`rollout.placement`), on a node whose trainer ranks use GPUs 0..R-1 (local rank =
GPU index) with `--tp T` servers:

    separate:   server i on GPUs R + iT .. R + (i+1)T - 1 (beyond the trainer's), SGLang's
                memory default (or `--mem-fraction-static` in `rollout.server_args`)
    colocated:  server i on GPUs iT .. (i+1)T - 1 (beside trainer ranks iT..), with
                `--mem-fraction-static rollout.colocated_memory_fraction` and
                `--enable-memory-saver`
    CPU:        no GPU flags (the servers run on the CPU; colocation only sequences the calls)

Colocated step, as verl and slime order it (SGLang 0.5.23 `/release_memory_occupation` and
`/resume_memory_occupation`, tags `kv_cache` and `weights`):

    generate (version k) -> release kv_cache + weights -> trainer trains -> resume weights
    -> weight sync (version k + 1) -> resume kv_cache -> generate (version k + 1)

`FleetColocation` makes those calls on the live workers with generation paused (SGLang
releases memory only while idle) and remembers what each worker released, so it resumes
exactly that: a resume of a tag a server did not release kills its scheduler (KeyError). A
released worker's weights are gone (torch_memory_saver frees them), so generation before a
weight sync is an error, and failed workers are not re-admitted: a restarted server would hold
its memory beside the trainer and not know it was released.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pipeline.config import RolloutConfig
from pipeline.sglang_server import (
    MEMORY_FRACTION_FLAG,
    MEMORY_SAVER_FLAG,
    server_flag_value,
    server_tensor_parallel,
)

if TYPE_CHECKING:  # the config schema imports the placement functions: keep this light
    from pipeline.rollout_client import RolloutClient

KV_CACHE = "kv_cache"
WEIGHTS = "weights"
"""SGLang's memory tags (`sglang.srt.constants.GPU_MEMORY_TYPE_*`)."""


def server_memory_fraction(rollout: RolloutConfig) -> float | None:
    """The `--mem-fraction-static` of each server: `rollout.colocated_memory_fraction` when
    colocated, else the flag in `rollout.server_args`; None = SGLang's default."""
    if rollout.placement == "colocated":
        return rollout.colocated_memory_fraction
    value = server_flag_value(rollout.server_args, (MEMORY_FRACTION_FLAG,))
    return float(value) if value is not None else None


def embedded_server_gpus(
    rollout: RolloutConfig, trainer_local_ranks: int, visible_gpus: int
) -> list[tuple[int, ...]]:
    """The GPU indices of each embedded server (see the module doc).

    Args:
        rollout: the fleet's section (`num_servers`, `placement`, `--tp` in `server_args`).
        trainer_local_ranks: trainer ranks on the data plane's node (GPUs 0..R-1).
        visible_gpus: GPUs the node's processes see.

    Raises:
        ValueError: the servers need GPUs the node does not have (separate) or that no trainer
            rank uses (colocated).
    """
    tp = server_tensor_parallel(rollout.server_args)
    needed = rollout.num_servers * tp
    servers = f"rollout.num_servers={rollout.num_servers} server(s) of {tp} GPU(s)"
    if rollout.placement == "colocated":
        if needed > trainer_local_ranks:
            raise ValueError(
                f"rollout.placement=colocated: {servers} need {needed} GPUs shared with trainer "
                f"ranks, but the trainer has {trainer_local_ranks} rank(s) on the node "
                "(launch.nproc_per_node): lower the servers or raise the ranks"
            )
        first = 0
    else:
        if trainer_local_ranks + needed > visible_gpus:
            raise ValueError(
                f"rollout.placement=separate: {servers} need {needed} GPUs beside the trainer's "
                f"{trainer_local_ranks}, but the node has {visible_gpus}: use "
                "rollout.placement=colocated, fewer servers, or cluster mode"
            )
        first = trainer_local_ranks
    return [tuple(range(first + i * tp, first + (i + 1) * tp)) for i in range(rollout.num_servers)]


def embedded_server_args(
    rollout: RolloutConfig, trainer_local_ranks: int, visible_gpus: int
) -> list[tuple[str, ...]]:
    """Each embedded server's placement flags: `--base-gpu-id` and, colocated,
    `--mem-fraction-static` and `--enable-memory-saver`; () for every server on a CPU node
    (`visible_gpus == 0`). Raises ValueError as `embedded_server_gpus`."""
    if visible_gpus == 0:
        return [() for _ in range(rollout.num_servers)]
    colocated: tuple[str, ...] = ()
    if rollout.placement == "colocated":
        fraction = str(rollout.colocated_memory_fraction)
        colocated = (MEMORY_FRACTION_FLAG, fraction, MEMORY_SAVER_FLAG)
    return [
        ("--base-gpu-id", str(gpus[0]), *colocated)
        for gpus in embedded_server_gpus(rollout, trainer_local_ranks, visible_gpus)
    ]


class FleetColocation:
    """Releases and resumes the GPU memory of a colocated fleet around training.

    Args:
        client: the fleet (its live workers are released and resumed).
    """

    def __init__(self, client: RolloutClient) -> None:
        self.client = client
        self._released: dict[str, set[str]] = {}
        """Worker URL -> the tags it released and has not resumed."""
        client.stop_revivals(
            "colocated placement: a restarted server would hold its GPU memory while the "
            "trainer trains"
        )

    async def before_training(self) -> None:
        """Release every live worker's KV cache and weights (generation paused meanwhile)."""
        async with self.client.paused() as workers:
            to_release = {
                w.url: [t for t in (KV_CACHE, WEIGHTS) if t not in self._tags(w.url)]
                for w in workers
            }
            await asyncio.gather(
                *(
                    w.release_memory_occupation(to_release[w.url])
                    for w in workers
                    if to_release[w.url]
                )
            )
            for worker in workers:
                self._tags(worker.url).update(to_release[worker.url])

    async def before_weight_sync(self) -> None:
        """Resume the released weights' memory: the sync then writes into it."""
        await self._resume(WEIGHTS)

    async def before_generation(self) -> None:
        """Resume the released KV cache.

        Raises:
            RuntimeError: a live worker's weights are still released (no weight sync since
                training: its weight memory holds nothing to generate with).
        """
        unsynced = [w.url for w in self.client.live_workers if WEIGHTS in self._tags(w.url)]
        if unsynced:
            raise RuntimeError(
                f"{', '.join(unsynced)}: weights released for training and not synced since; "
                "sync the weights before generating"
            )
        await self._resume(KV_CACHE)

    def _tags(self, url: str) -> set[str]:
        """The tags the worker at `url` released and has not resumed."""
        return self._released.setdefault(url, set())

    async def _resume(self, tag: str) -> None:
        async with self.client.paused() as workers:
            released = [w for w in workers if tag in self._tags(w.url)]
            await asyncio.gather(*(w.resume_memory_occupation([tag]) for w in released))
            for worker in released:
                self._tags(worker.url).discard(tag)
