"""Bytes of tensor storage allocated inside a block and still alive, and their peak.

`LiveTensorBytes` is a `TorchDispatchMode`: every op output whose storage is new (shares no
input's storage) is counted with its storage's size until the last tensor of this process that
views it is freed (views made inside the block keep it counted). Storage that existed before
(parameters, their views) is not counted. Collectives write into tensors allocated by ops, so
their buffers are counted where they are allocated.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Within the block: `live` bytes of storage allocated in it and alive, `peak` its maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._views: dict[int, int] = {}  # storage pointer -> tensors alive that view it
        self._sizes: dict[int, int] = {}

    def _release(self, ptr: int) -> None:
        self._views[ptr] -= 1
        if self._views[ptr] == 0:
            del self._views[ptr]
            self.live -= self._sizes.pop(ptr)

    def _track(self, tensor: torch.Tensor, new: bool) -> None:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._views:
            if not new or storage.nbytes() == 0:
                return
            self._views[ptr], self._sizes[ptr] = 0, storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._views[ptr] += 1
        weakref.finalize(tensor, self._release, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outputs = func(*args, **(kwargs or {}))
        inputs = {
            x.untyped_storage().data_ptr()
            for x in tree_flatten((args, kwargs))[0]
            if isinstance(x, torch.Tensor)
        }
        for out in tree_flatten(outputs)[0]:
            if isinstance(out, torch.Tensor) and out.device.type != "meta":
                self._track(out, out.untyped_storage().data_ptr() not in inputs)
        return outputs
