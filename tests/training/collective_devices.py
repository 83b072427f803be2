"""Check, on CPU, that the project's collectives would run under NCCL (CUDA tensors only).

On a CPU machine the model lives on the host, so a tensor built on the host cannot be told apart
from one on the model's device by its `.device`. `HostTensorTracker` tells them apart by where
the tensor came from, tracking it the way a GPU would place it:

* made on the host: a factory call without `device=` (`torch.tensor([...])`, `torch.zeros(n)`),
  `Tensor.cpu()`, `Tensor.numpy()`-backed `torch.from_numpy`;
* moved to the model: `Tensor.to(<device or tensor>)`, `Tensor.cuda()`, a factory with `device=`;
* otherwise an op's outputs are host-made if any tensor input is (on a GPU the op would either
  run on the host or fail on mixed devices); tensors that existed before tracking started (the
  model's parameters, gradient buffers, optimizer state) are on the model's device.

While tracking, `torch.distributed`'s tensor collectives called from the project's own code
(`megatron_dapo/`, `pipeline/`, and the calling test worker) record every host-made tensor they
receive as a `Violation`. Object collectives (`gather_object`, ...) pickle through the current
device under NCCL and are allowed. Megatron-Core's own collectives are Megatron's business.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[2]
_HOST = "_made_on_host"

TENSOR_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
)
_FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.from_numpy,
}


@dataclass(frozen=True)
class Violation:
    """A host-made tensor handed to a collective: `collective` called at `where` (file:line)."""

    collective: str
    where: str
    shape: tuple[int, ...]


def is_host_made(tensor: torch.Tensor) -> bool:
    return getattr(tensor, _HOST, False)


def _mark(outputs: object, host: bool) -> None:
    for leaf in tree_flatten(outputs)[0]:
        if isinstance(leaf, torch.Tensor):
            setattr(leaf, _HOST, host)


def _tensor_inputs(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]


def _moves_to_device(func, args: tuple, kwargs: dict) -> bool:
    """`Tensor.to` with a device (or a tensor to follow), or `Tensor.cuda`."""
    if func is torch.Tensor.cuda:
        return True
    if func is not torch.Tensor.to:
        return False
    targets = [*args[1:], kwargs.get("device"), kwargs.get("other")]
    return any(isinstance(t, str | torch.device | torch.Tensor) for t in targets)


class HostTensorTracker(TorchFunctionMode):
    """Marks every tensor made on the host (see the module doc) while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        outputs = func(*args, **kwargs)
        if func in _FACTORIES:
            _mark(outputs, kwargs.get("device") is None)
        elif func is torch.Tensor.cpu:
            outputs = outputs.view_as(outputs)  # on the CPU `cpu()` returns its input
            _mark(outputs, True)
        elif _moves_to_device(func, args, kwargs):
            outputs = outputs.view_as(outputs)  # on the CPU `to()` may return its input
            _mark(outputs, False)
        elif any(is_host_made(x) for x in _tensor_inputs(args, kwargs)):
            _mark(outputs, True)
        return outputs


def _project_caller(checked: tuple[Path, ...]) -> str | None:
    """file:line of the nearest caller frame in a checked path, if the caller is one."""
    frame = sys._getframe(2)  # 0: this function, 1: the wrapper, 2: the collective's caller
    path = Path(frame.f_code.co_filename).resolve()
    if any(path == root or root in path.parents for root in checked):
        return f"{path.relative_to(REPO)}:{frame.f_lineno}"
    return None


@contextlib.contextmanager
def track_collective_devices(*extra_checked: Path) -> Iterator[list[Violation]]:
    """Within the block, record every host-made tensor the project hands a tensor collective.

    Yields the list the violations are appended to. `extra_checked`: more files or directories
    whose collectives are checked (a test worker's own control call).
    """
    checked = (REPO / "megatron_dapo", REPO / "pipeline", *(p.resolve() for p in extra_checked))
    violations: list[Violation] = []
    originals = {name: getattr(dist, name) for name in TENSOR_COLLECTIVES}

    def wrap(name: str, collective):
        def checked_collective(*args, **kwargs):
            where = _project_caller(checked)
            if where is not None:
                for tensor in _tensor_inputs(args, kwargs):
                    if is_host_made(tensor):
                        violations.append(Violation(name, where, tuple(tensor.shape)))
            return collective(*args, **kwargs)

        return checked_collective

    for name, collective in originals.items():
        setattr(dist, name, wrap(name, collective))
    try:
        with HostTensorTracker():
            yield violations
    finally:
        for name, collective in originals.items():
            setattr(dist, name, collective)
