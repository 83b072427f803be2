"""Trainer side of SGLang's `update_weights_from_distributed`: rank 0 of a broadcast group.

The group holds the trainer (rank 0) and every live worker (ranks 1..W, one per server of
tensor-parallel size 1). SGLang joins it through `/init_weights_update_group` with a TCP
rendezvous at `master_address:master_port`; the trainer builds the same group from public torch
APIs (`TCPStore` as master, `PrefixStore`, `ProcessGroupGloo`) under the store prefixes SGLang's
`init_custom_process_group` and torch's `_new_process_group_helper` use
(`{group}`, then `{group}/`, then `cpu/`). An update broadcasts the tensors one by one, in the
order of the names sent to the servers, while their `/update_weights_from_distributed` calls
wait to receive.
Blocking torch calls run in a worker thread so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.rollout_client import RolloutClient


class WeightBroadcaster:
    """Rank 0 of a gloo group that pushes named tensors to every live worker of a fleet.

    Args:
        client: the fleet; its live workers at `connect` time join the group.
        master_address: address the workers reach the trainer at.
        master_port: a free TCP port on the trainer for the rendezvous store.
        group_name: the group's name on the servers (and the store prefix).
        timeout_s: collective timeout, seconds.
    """

    def __init__(
        self,
        client: RolloutClient,
        master_address: str,
        master_port: int,
        group_name: str = "megatron_dapo_weights",
        timeout_s: float = 300.0,
    ) -> None:
        self.client = client
        self.master_address = master_address
        self.master_port = master_port
        self.group_name = group_name
        self.timeout = timedelta(seconds=timeout_s)
        self._group: dist.ProcessGroup | None = None
        self._num_workers = 0

    def _create_group(self, world_size: int) -> dist.ProcessGroup:
        store = dist.TCPStore(
            self.master_address,
            self.master_port,
            world_size,
            is_master=True,
            timeout=self.timeout,
            wait_for_workers=False,
        )
        prefixed = dist.PrefixStore(self.group_name, store)
        prefixed = dist.PrefixStore(f"{self.group_name}/", prefixed)
        prefixed = dist.PrefixStore("cpu/", prefixed)
        return dist.ProcessGroupGloo(prefixed, 0, world_size, self.timeout)

    async def connect(self) -> None:
        """Form the group with every live worker (ranks 1..W); failed workers are no longer
        re-admitted, since they cannot join the group later."""
        workers = self.client.live_workers
        world_size = 1 + len(workers)
        group, *_ = await asyncio.gather(
            asyncio.to_thread(self._create_group, world_size),
            *(
                w.init_weights_update_group(
                    self.master_address,
                    self.master_port,
                    rank_offset=1 + i,
                    world_size=world_size,
                    group_name=self.group_name,
                    backend="gloo",
                )
                for i, w in enumerate(workers)
            ),
        )
        self._group = group
        self._num_workers = len(workers)
        self.client.stop_revivals("a server outside the broadcast group cannot receive weights")

    def _broadcast(self, tensors: Sequence[torch.Tensor]) -> None:
        assert self._group is not None
        for tensor in tensors:
            options = dist.BroadcastOptions()
            options.rootRank = 0
            self._group.broadcast([tensor.detach().contiguous().cpu()], options).wait()

    async def push(
        self, named_tensors: Sequence[tuple[str, torch.Tensor]], weight_version: int
    ) -> None:
        """Broadcast `named_tensors` (HF parameter names) to the fleet as `weight_version`.

        Generation is paused for the duration. Raises RuntimeError if the fleet lost a worker
        since `connect` (the group cannot complete a collective then).
        """
        if self._group is None:
            raise RuntimeError("WeightBroadcaster.push before connect()")
        names = [name for name, _ in named_tensors]
        tensors = [tensor for _, tensor in named_tensors]
        dtypes = [str(t.dtype).removeprefix("torch.") for t in tensors]
        shapes = [list(t.shape) for t in tensors]
        async with self.client.paused() as workers:
            if len(workers) != self._num_workers:
                raise RuntimeError(
                    f"{self._num_workers - len(workers)} worker(s) of the broadcast group died; "
                    "reconnect before pushing weights"
                )
            await asyncio.gather(
                asyncio.to_thread(self._broadcast, tensors),
                *(
                    w.update_weights_from_distributed(
                        names, dtypes, shapes, self.group_name, str(weight_version)
                    )
                    for w in workers
                ),
            )
            self.client.weight_version = weight_version

    async def close(self) -> None:
        """Leave the group on every worker of it (`/destroy_weights_update_group`)."""
        if self._group is None:
            return
        await asyncio.gather(
            *(w.destroy_weights_update_group(self.group_name) for w in self.client.live_workers)
        )
        self._group = None
