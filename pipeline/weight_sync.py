"""Streamed, bucketed weight sync: the trainer's stage senders and the fleet's strategy object.

One sender per pipeline stage (the stage's rank of tensor, data, expert and expert-tensor rank
0) receives its stage's HF-named tensors packed in `WeightBucket`s (`pack_buckets`: one reused
byte buffer of `rollout.weight_sync_bucket_mb`) and publishes one record per bucket in the
trainer's default `torch.distributed` store, keyed by (version, stage, index); `WeightSync`, run
by the data plane on the trainer's rank 0, consumes the records of stage 0, then stage 1, ...
and loads them on the fleet. Records go through the store, never through torch collectives with
rank 0 (whose main thread may be inside its own stage's collectives at the time), and a later
stage's sender simply waits for its turn, so no cycle can form. Per `rollout.weight_sync`:

    disk         the sender writes its bucket as a safetensors shard `model-SSS-BBBBB` in the
                 version directory and publishes the file; the data plane writes
                 `model.safetensors.index.json`, config and tokenizer files, then every server
                 loads the directory (`update_weights_from_disk`, replayed on revived servers).
    distributed  the sender is rank 0 of its own update group (every server GPU one rank:
                 world = 1 + the servers' TP sizes, a server's ranks start at 1 + the TP sizes
                 before it; gloo on CPU, NCCL on GPU), publishes each bucket's names, dtypes
                 and shapes, and broadcasts its bytes while every server receives it in one
                 `update_weights_from_distributed(load_format="flattened_bucket")` call.
                 Failed servers are not re-admitted once the groups formed: a group's ranks are
                 fixed.
    tensor       the sender publishes the bucket serialized for SGLang once per server TP
                 rank (its storage travels by shared memory, CUDA IPC on GPU: servers on the
                 trainer's host), the servers load it
                 (`update_weights_from_tensor(load_format="flattened_bucket")`), and the data
                 plane acknowledges it before the sender reuses its buffer.

`WeightSync` is the only code that changes the fleet's weight version: through
`RolloutClient.weight_update`, under the lock that guards server revival, with generation
paused. The imports run one way: the training plane (`megatron_dapo.hf.convert`) imports this
module, never the reverse.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist

from pipeline.sglang_server import free_port

if TYPE_CHECKING:  # the training plane imports the sender half: no HTTP client for it
    from pipeline.rollout_client import RolloutClient
    from pipeline.sglang_client import SGLangServerClient

WeightSyncMode = Literal["disk", "distributed", "tensor"]
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)
"""The non-weight files of an HF checkpoint, copied from the source checkpoint when present."""
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_VERSIONS_KEPT = 2
"""Disk mode keeps the directories of this many versions (a revived server replays the last)."""
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_STORE_PREFIX = "megatron_dapo_weight_sync/"


@dataclass(frozen=True)
class BucketEntry:
    """One tensor of a bucket: HF name, torch dtype name (`"float32"`), shape, and its bytes
    `[start, end)` in the bucket."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class WeightBucket:
    """HF-named tensors of one dtype packed back to back.

    Attributes:
        data: [nbytes] uint8, on the model's device; a view of the packer's reused buffer,
            valid until the next bucket is requested.
        entries: the tensors, in order; `entries[-1].end == data.numel()`.
    """

    data: torch.Tensor
    entries: tuple[BucketEntry, ...]

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) views into `data`."""
        return [
            (e.name, self.data[e.start : e.end].view(getattr(torch, e.dtype)).view(e.shape))
            for e in self.entries
        ]


def pack_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[WeightBucket]:
    """Pack `named_tensors` into buckets of at most `bucket_bytes` bytes, in order.

    One buffer of `bucket_bytes` is allocated (on the first tensor's device) and reused: each
    yielded bucket is valid until the next one is requested. A bucket holds one dtype (a new
    one starts where the dtype changes, so every tensor is aligned as SGLang's
    `FlattenedTensorBucket` expects); a tensor larger than `bucket_bytes` goes alone in a
    buffer of its own size. Peak memory: the buffer plus whatever the producer of the tensor
    being packed holds.
    """
    buffer: torch.Tensor | None = None
    entries: list[BucketEntry] = []
    used = 0
    for item in named_tensors:
        name, tensor = item
        size = tensor.numel() * tensor.element_size()
        dtype = str(tensor.dtype).removeprefix("torch.")
        if entries and (used + size > bucket_bytes or dtype != entries[-1].dtype):
            assert buffer is not None
            yield WeightBucket(buffer[:used], tuple(entries))
            entries, used = [], 0
        entry = BucketEntry(name, dtype, tuple(tensor.shape), used, used + size)
        flat = tensor.contiguous().view(-1).view(torch.uint8)
        if size > bucket_bytes:
            yield WeightBucket(flat.clone(), (entry,))
        else:
            if buffer is None:
                buffer = torch.empty(bucket_bytes, dtype=torch.uint8, device=tensor.device)
            buffer[used : used + size].copy_(flat)
            entries.append(entry)
            used += size
        del item, tensor, flat  # not held while the producer makes the next tensor
    if entries:
        assert buffer is not None
        yield WeightBucket(buffer[:used], tuple(entries))


def shard_file_name(stage: int, index: int) -> str:
    """The safetensors shard of bucket `index` of pipeline stage `stage`."""
    return f"model-{stage:03d}-{index:05d}.safetensors"


def write_safetensors(path: Path, bucket: WeightBucket) -> None:
    """Write `bucket` as a safetensors file: a JSON header (padded to 8 bytes) and the bucket's
    bytes as they are, since its layout is already safetensors' (tensors back to back)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    for e in bucket.entries:
        dtype = _SAFETENSORS_DTYPES[getattr(torch, e.dtype)]
        header[e.name] = {"dtype": dtype, "shape": list(e.shape), "data_offsets": [e.start, e.end]}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        file.write(bucket.data.cpu().numpy().data)


def finish_hf_checkpoint(directory: Path, weight_map: dict[str, str], source_dir: Path) -> None:
    """Make `directory` (holding the shards of `weight_map`: HF name -> file) a complete HF
    checkpoint: the shard index plus the `HF_SIDE_FILES` found in `source_dir`."""
    total = sum(_tensor_bytes(directory / f) for f in sorted(set(weight_map.values())))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=1))
    for name in HF_SIDE_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, directory / name)


def _tensor_bytes(path: Path) -> int:
    with path.open("rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
    return path.stat().st_size - 8 - header_size


def version_dir(run_dir: Path, version: int) -> Path:
    """Disk mode: the HF checkpoint directory of weight `version` of a run."""
    return run_dir / "weights" / f"v{version}"


def group_name(stage: int) -> str:
    """The name of pipeline stage `stage`'s update group on the servers."""
    return f"megatron_dapo_weights_s{stage}"


def serialize_for_sglang(payload: object) -> bytes:
    """Pickle `payload` the way SGLang's `MultiprocessingSerializer` reads it.

    Tensor storage travels through shared memory; on CPU this needs torch's `file_system`
    sharing strategy (with `file_descriptor` the server dies), which this call sets for the
    process.
    """
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # registers the tensor reductions with ForkingPickler

    torch.multiprocessing.set_sharing_strategy("file_system")
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(payload)
    return buffer.getvalue()


def serialize_flattened_bucket(bucket: WeightBucket) -> bytes:
    """`bucket` as SGLang's `load_format="flattened_bucket"` payload: the flat uint8 tensor and
    per-tensor metadata (fields of `sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata`,
    in a SimpleNamespace so the server unpickles no class of this project)."""
    metadata = [
        SimpleNamespace(
            name=e.name,
            shape=torch.Size(e.shape),
            dtype=getattr(torch, e.dtype),
            start_idx=e.start,
            end_idx=e.end,
            numel=e.end - e.start,
        )
        for e in bucket.entries
    ]
    return serialize_for_sglang({"flattened_tensor": bucket.data, "metadata": metadata})


_BucketLoad = Callable[["SGLangServerClient", int, dict, int], Awaitable[None]]
"""Loads one bucket record of a stage on one server: (worker, stage, record, version)."""


def _key(version: int, stage: int, index: int) -> str:
    return f"v{version}/s{stage}/b{index}"


def _receivers_key(version: int, stage: int) -> str:
    """Tensor mode: how many server TP ranks read each bucket of (version, stage); the sender
    pickles the bucket once for each, since every unpickling drops one reference of the shared
    storage (one pickle read twice would unlink it while the sender still reuses it)."""
    return f"v{version}/s{stage}/receivers"


def _store_take(store: dist.Store, key: str, timeout: timedelta) -> bytes:
    """The value of `key`, waiting up to `timeout` for another process to set it; the key is
    deleted (each record is read once, and a stale one is never mistaken for the next)."""
    store.wait([key], timeout)
    value = store.get(key)
    store.delete_key(key)
    return value


class WeightSender:
    """The trainer side of one pipeline stage: publishes the stage's buckets (see the module doc).

    Args:
        mode: `rollout.weight_sync`.
        store: the trainer's default store (`distributed_c10d._get_default_store()`).
        stage: this sender's pipeline stage.
        run_dir: disk mode: the version directories go under it (`version_dir`).
        address: distributed mode: the address the servers reach this process at.
        timeout_s: how long to wait for the data plane (its turn on this stage, an acknowledge,
            the update group), seconds.
    """

    def __init__(
        self,
        mode: WeightSyncMode,
        store: dist.Store,
        stage: int,
        run_dir: Path,
        address: str = "127.0.0.1",
        timeout_s: float = 1800.0,
    ) -> None:
        self.mode = mode
        self.store = dist.PrefixStore(_STORE_PREFIX, store)
        self.stage = stage
        self.run_dir = run_dir
        self.address = address
        self.timeout = timedelta(seconds=timeout_s)
        self._group: dist.ProcessGroup | None = None

    def send(self, version: int, buckets: Iterable[WeightBucket]) -> None:
        """Publish every bucket of this stage as weight `version`; returns once the last was
        written (disk), broadcast (distributed) or loaded by the fleet (tensor)."""
        index, receivers = -1, 0
        for index, bucket in enumerate(buckets):
            key = _key(version, self.stage, index)
            record: dict[str, object] = {"entries": [e.__dict__ for e in bucket.entries]}
            if self.mode == "disk":
                file = shard_file_name(self.stage, index)
                write_safetensors(version_dir(self.run_dir, version) / file, bucket)
                record["file"] = file
            elif self.mode == "tensor":
                if index == 0:
                    receivers = int(
                        _store_take(self.store, _receivers_key(version, self.stage), self.timeout)
                    )
                record["payloads"] = [
                    base64.b64encode(serialize_flattened_bucket(bucket)).decode()
                    for _ in range(receivers)
                ]
            self.store.set(key, json.dumps(record))
            if self.mode == "distributed":
                self._broadcast(bucket.data)
            elif self.mode == "tensor":
                _store_take(self.store, f"{key}/ack", self.timeout)
        self.store.set(_key(version, self.stage, index + 1), json.dumps({"end": True}))

    def _broadcast(self, data: torch.Tensor) -> None:
        if self._group is None:
            self._group = self._join_update_group()
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self._group.broadcast([data], options).wait()

    def _join_update_group(self) -> dist.ProcessGroup:
        """Rank 0 of this stage's update group: a TCP store master on a free port, named and
        prefixed as SGLang's `init_custom_process_group` and torch's `_new_process_group_helper`
        name theirs (`{group}`, then `{group}/`, then `{device}/`)."""
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        port = free_port(self.address)
        record = {"address": self.address, "port": port, "backend": backend}
        self.store.set(f"group/s{self.stage}", json.dumps(record))
        world_size = int(_store_take(self.store, f"group/s{self.stage}/world", self.timeout))
        master = dist.TCPStore(
            self.address,
            port,
            world_size,
            is_master=True,
            timeout=self.timeout,
            wait_for_workers=False,
        )
        name = group_name(self.stage)
        prefixed = dist.PrefixStore(f"{name}/", dist.PrefixStore(name, master))
        if backend == "nccl":
            return dist.ProcessGroupNCCL(dist.PrefixStore("cuda/", prefixed), 0, world_size)
        return dist.ProcessGroupGloo(
            dist.PrefixStore("cpu/", prefixed), 0, world_size, self.timeout
        )


def sender_address(configured: str | None, embedded: bool) -> str:
    """Where servers reach a stage sender for the update group's rendezvous:
    `rollout.weight_sync_address`, else 127.0.0.1 (embedded fleet) or this host's FQDN."""
    return configured or ("127.0.0.1" if embedded else socket.getfqdn())


class WeightSync:
    """The weight-sync strategy of the data plane (`disk | distributed | tensor`).

    Args:
        mode: `rollout.weight_sync`.
        client: the fleet.
        store: a store the senders publish in (a `clone()` of the trainer's default store, for
            use from the data plane's threads).
        num_stages: pipeline stages of the trainer (one sender each).
        run_dir: the run directory (disk mode writes `version_dir`s under it).
        source_dir: the HF checkpoint the run started from (config and tokenizer files).
        timeout_s: how long to wait for a sender's next record, seconds.
    """

    def __init__(
        self,
        mode: WeightSyncMode,
        client: RolloutClient,
        store: dist.Store,
        num_stages: int,
        run_dir: Path,
        source_dir: Path,
        timeout_s: float = 1800.0,
    ) -> None:
        self.mode = mode
        self.client = client
        self.store = dist.PrefixStore(_STORE_PREFIX, store)
        self.num_stages = num_stages
        self.run_dir = run_dir
        self.source_dir = source_dir
        self.timeout = timedelta(seconds=timeout_s)
        self._group_members: list[str] | None = None
        self._payload_slices: dict[str, slice] = {}

    async def sync(self, version: int) -> None:
        """Load the senders' weight `version` on every live server; the fleet's weight version
        is `version` afterwards."""
        if self.mode == "disk":
            await self._sync_from_disk(version)
        elif self.mode == "distributed":
            if self._group_members is None:
                await self._form_update_groups()
            await self._sync_buckets(version, self._receive_broadcast)
        else:
            await self._sync_buckets(version, self._load_tensor)

    async def _records(self, version: int, stage: int) -> AsyncIterator[tuple[str, dict]]:
        """(key, record) of every bucket of `stage`, in order, as the sender publishes them."""
        index = 0
        while True:
            key = _key(version, stage, index)
            record = json.loads(await asyncio.to_thread(_store_take, self.store, key, self.timeout))
            if record.get("end"):
                return
            yield key, record
            index += 1

    async def _sync_from_disk(self, version: int) -> None:
        directory = version_dir(self.run_dir, version)
        weight_map: dict[str, str] = {}
        for stage in range(self.num_stages):
            async for _, record in self._records(version, stage):
                weight_map.update({e["name"]: record["file"] for e in record["entries"]})
        await asyncio.to_thread(finish_hf_checkpoint, directory, weight_map, self.source_dir)
        await self.client.update_weights_from_disk(str(directory), version)
        stale = version_dir(self.run_dir, version - WEIGHT_VERSIONS_KEPT)
        await asyncio.to_thread(shutil.rmtree, stale, ignore_errors=True)

    async def _sync_buckets(self, version: int, load: _BucketLoad) -> None:
        """Stream every stage's buckets to the fleet in one weight-update session per server."""
        async with self.client.weight_update(version) as update:
            if self._group_members is not None and [w.url for w in update.workers] != (
                self._group_members
            ):
                raise RuntimeError(
                    "a server of the weight update groups died; the groups cannot complete a "
                    "broadcast without it (restart the run to form them again)"
                )
            if self.mode == "tensor":
                await self._assign_tensor_payloads(version, update.workers)
            await update.each(lambda w: w.begin_weight_update())
            try:
                for stage in range(self.num_stages):
                    async for key, record in self._records(version, stage):
                        await update.each(lambda w, s=stage, r=record: load(w, s, r, version))
                        if self.mode == "tensor":
                            self.store.set(f"{key}/ack", b"1")
            finally:
                await update.each(lambda w: w.end_weight_update())

    @staticmethod
    async def _receive_broadcast(
        worker: SGLangServerClient, stage: int, record: dict, version: int
    ) -> None:
        entries = record["entries"]
        await worker.update_weights_from_distributed(
            [e["name"] for e in entries],
            [e["dtype"] for e in entries],
            [e["shape"] for e in entries],
            group_name(stage),
            str(version),
            load_format="flattened_bucket",
        )

    async def _assign_tensor_payloads(
        self, version: int, workers: list[SGLangServerClient]
    ) -> None:
        """Tensor mode: tell every stage sender how many payloads to pickle per bucket (one per
        server TP rank) and which of them go to which server."""
        tp_sizes = await asyncio.gather(*(w.tp_size() for w in workers))
        starts = [sum(tp_sizes[:i]) for i in range(len(workers))]
        self._payload_slices = {
            w.url: slice(start, start + size)
            for w, start, size in zip(workers, starts, tp_sizes, strict=True)
        }
        for stage in range(self.num_stages):
            self.store.set(_receivers_key(version, stage), str(sum(tp_sizes)))

    async def _load_tensor(
        self, worker: SGLangServerClient, stage: int, record: dict, version: int
    ) -> None:
        payloads = record["payloads"][self._payload_slices[worker.url]]
        await worker.update_weights_from_tensor(
            [base64.b64decode(p) for p in payloads], str(version), load_format="flattened_bucket"
        )

    async def _form_update_groups(self) -> None:
        """Every live server GPU joins each stage sender's update group (stage order); failed
        servers are no longer re-admitted afterwards."""
        workers = self.client.live_workers
        tp_sizes = await asyncio.gather(*(w.tp_size() for w in workers))
        world_size = 1 + sum(tp_sizes)
        offsets = [1 + sum(tp_sizes[:i]) for i in range(len(workers))]
        for stage in range(self.num_stages):
            key = f"group/s{stage}"
            sender = json.loads(await asyncio.to_thread(_store_take, self.store, key, self.timeout))
            self.store.set(f"{key}/world", str(world_size))
            await asyncio.gather(
                *(
                    w.init_weights_update_group(
                        sender["address"],
                        sender["port"],
                        rank_offset=offset,
                        world_size=world_size,
                        group_name=group_name(stage),
                        backend=sender["backend"],
                    )
                    for w, offset in zip(workers, offsets, strict=True)
                )
            )
        self._group_members = [w.url for w in workers]
        self.client.stop_revivals(
            "a server outside the weight update groups cannot receive weights"
        )

    async def close(self) -> None:
        """Leave the update groups on every live server (`/destroy_weights_update_group`)."""
        if self._group_members is None:
            return
        await asyncio.gather(
            *(
                w.destroy_weights_update_group(group_name(stage))
                for w in self.client.live_workers
                for stage in range(self.num_stages)
            ),
            return_exceptions=True,
        )
        self._group_members = None
