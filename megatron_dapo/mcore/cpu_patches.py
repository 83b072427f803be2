"""Patches that let Megatron-Core 0.16.1 train on a machine without CUDA (gloo backend).

Megatron-Core assumes CUDA in places that have nothing to do with the math: device arguments,
streams, RNG trackers, type-name checks. `apply_cpu_patches()` redirects exactly those to the
CPU when `torch.cuda.is_available()` is False and does nothing otherwise; it is idempotent and
never changes what is computed. Each patch names the Megatron-Core code that needs it, and
`tests/training/test_training_cpu_patches.py` runs each of those code paths.

Checked on torch 2.14.1 (CUDA build, no GPU) with megatron-core 0.16.1: leaving out any one
patch makes the parity worker (`tests/training/parity_worker.py`) fail, mostly with "Found no
NVIDIA driver". Not needed for training, hence absent: the inference-engine patches (NVTX,
`_is_cuda`), `get_default_causal_mask` (training passes its own mask), and the Adam `step`
aliasing after a distributed-optimizer load, which also happens with CUDA but without Apex/TE
and is fixed in `checkpoint.unalias_adam_steps`.

Call it after `import torch` and before building models or seeding (`parallel.py` does).
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class CpuPatch:
    """One patch: a name, why Megatron-Core needs it, and the function applying it."""

    name: str
    reason: str
    apply: Callable[[], None]


class _CpuEvent:
    """`torch.cuda.Event` stand-in; `elapsed_time` is wall-clock milliseconds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._time = time.perf_counter()

    def record(self, *args: Any, **kwargs: Any) -> None:
        self._time = time.perf_counter()

    def synchronize(self) -> None:
        """Nothing runs asynchronously on the CPU."""

    def wait(self, *args: Any, **kwargs: Any) -> None:
        """Nothing runs asynchronously on the CPU."""

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _CpuEvent) -> float:
        return (end._time - self._time) * 1e3


class _CpuStream:
    """`torch.cuda.Stream` stand-in: the CPU has a single, synchronous stream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        """Nothing runs asynchronously on the CPU."""

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        """Nothing runs asynchronously on the CPU."""

    def record_event(self, *args: Any, **kwargs: Any) -> _CpuEvent:
        return _CpuEvent()

    def synchronize(self) -> None:
        """Nothing runs asynchronously on the CPU."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _CpuStream)

    def __hash__(self) -> int:
        return 0


def _patch_current_device() -> None:
    torch.cuda.current_device = lambda: "cpu"


def _patch_streams() -> None:
    stream = _CpuStream()
    torch.cuda.Stream = _CpuStream
    torch.cuda.Event = _CpuEvent
    torch.cuda.current_stream = lambda *args, **kwargs: stream
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *args, **kwargs: None


def _patch_tensor_cuda() -> None:
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def _patch_rng_tracker() -> None:
    import megatron.core.tensor_parallel.random as mrandom

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """The model-parallel RNG tracker with its named states kept as CPU generator states."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            original = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker


_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.utils",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.dist_checkpointing.exchange_utils",
)
_TENSOR_FACTORIES = (
    "zeros",
    "ones",
    "empty",
    "tensor",
    "full",
    "arange",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
    "as_tensor",
)


def _torch_with_cpu_factories() -> types.ModuleType:
    """A view of the torch module whose tensor factories map `device="cuda..."` to the CPU."""
    proxy = types.ModuleType("torch_cpu_factories")
    proxy.__dict__.update({k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})

    def on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def make(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
            if device is not None and str(device).startswith("cuda"):
                device = "cpu"
            kwargs.pop("pin_memory", None)
            return factory(*args, device=device, **kwargs)

        return make

    for name in _TENSOR_FACTORIES:
        setattr(proxy, name, on_cpu(getattr(torch, name)))
    return proxy


def _patch_cuda_literals() -> None:
    import importlib

    proxy = _torch_with_cpu_factories()
    for module_name in _CUDA_LITERAL_MODULES:
        importlib.import_module(module_name).torch = proxy


def _patch_te_general_gemm() -> None:
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_torch_norm_sequence_parallel() -> None:
    import megatron.core.transformer.torch_norm as torch_norm

    norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}

    def build(
        cls: type,
        config: Any,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        if zero_centered_gamma:
            raise ValueError("zero_centered_gamma is not supported by torch norms")
        norm = norms[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(build)


def _patch_split_sizes_to_numpy() -> None:
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    def to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                tensor = tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = to_cpu


def _patch_uneven_all_gather() -> None:
    import megatron.core.tensor_parallel.mappings as mappings

    even_gather = mappings._gather_along_first_dim

    def gather(
        input_: torch.Tensor,
        group: Any,
        output_split_sizes: list[int] | None = None,
        use_global_buffer: bool = False,
    ) -> torch.Tensor:
        if output_split_sizes is None or group is None or group.size() == 1:
            return even_gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(size) for size in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((longest * group.size(), *input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, padded, group=group)
        return torch.cat([gathered[i * longest : i * longest + n] for i, n in enumerate(sizes)])

    mappings._gather_along_first_dim = gather


def _patch_tensor_type_names() -> None:
    plain_type = torch.Tensor.type

    def type_name(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs):
        if dtype is not None or kwargs:
            return plain_type(self, dtype, non_blocking, **kwargs)
        name = plain_type(self)
        if self.device.type == "cpu" and not name.startswith("torch.cuda."):
            return "torch.cuda." + name.removeprefix("torch.")
        return name

    torch.Tensor.type = type_name


def _patch_distrib_optimizer_state_load() -> None:
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states

    def set_states(self: Any, model_param: torch.Tensor, tensors: dict[str, torch.Tensor]):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destinations = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key, destination in destinations.items():
                if key in tensors:
                    destination.copy_(tensors[key])
        return None

    cls._set_main_param_and_optimizer_states = set_states


CPU_PATCHES: tuple[CpuPatch, ...] = (
    CpuPatch(
        "current_device",
        "tensor_parallel/mappings.py, moe router/experts, GPTModel, p2p shape exchange use "
        "`device=torch.cuda.current_device()`",
        _patch_current_device,
    ),
    CpuPatch(
        "streams",
        "MoEAlltoAllTokenDispatcher.__init__ creates torch.cuda.Stream() and "
        "_maybe_dtoh_and_synchronize uses current_stream()/stream()/synchronize()",
        _patch_streams,
    ),
    CpuPatch(
        "tensor_cuda",
        "LanguageModule.setup_embeddings_and_output_layer calls `weight.data.cuda()` for tied "
        "embeddings with PP > 1",
        _patch_tensor_cuda,
    ),
    CpuPatch(
        "rng_tracker",
        "tensor_parallel/random.py: CudaRNGStatesTracker (model_parallel_cuda_manual_seed, TP "
        "weight init, dropout forks) stores CUDA generator states",
        _patch_rng_tracker,
    ),
    CpuPatch(
        "cuda_literals",
        "schedules.py (`total_num_tokens`), optimizer/clip_grads/distrib_optimizer, grad "
        'buffers, finalize_model_grads, utils, MoE, exchange_utils create tensors on "cuda"',
        _patch_cuda_literals,
    ),
    CpuPatch(
        "te_general_gemm",
        "moe_utils.RouterGatingLinearFunction references te_general_gemm, defined only when "
        "Transformer Engine imports (NameError in every MoE router forward)",
        _patch_te_general_gemm,
    ),
    CpuPatch(
        "torch_norm_sequence_parallel",
        "torch_norm.WrappedTorchNorm asserts `not sequence_parallel`, which moe_layer.py "
        "requires with TP > 1; the params are tagged for finalize_model_grads' SP all-reduce",
        _patch_torch_norm_sequence_parallel,
    ),
    CpuPatch(
        "split_sizes_to_numpy",
        "token_dispatcher.py: maybe_move_tensor_to_cpu converts only CUDA tensors, so gloo "
        "all_to_all_single receives tensor split sizes (TypeError)",
        _patch_split_sizes_to_numpy,
    ),
    CpuPatch(
        "uneven_all_gather",
        "mappings._gather_along_first_dim(output_split_sizes=...) (alltoall dispatcher, "
        "expert TP > 1) all-gathers uneven tensors, which gloo rejects",
        _patch_uneven_all_gather,
    ),
    CpuPatch(
        "tensor_type_names",
        "distrib_optimizer/optimizer/clip_grads check `param.type() == 'torch.cuda.FloatTensor'`",
        _patch_tensor_type_names,
    ),
    CpuPatch(
        "distrib_optimizer_state_load",
        "DistributedOptimizer._set_main_param_and_optimizer_states copies every state key, but "
        "torch Adam (no Apex/TE) has a per-param 'step' (KeyError on checkpoint load)",
        _patch_distrib_optimizer_state_load,
    ),
)

_applied = False


def apply_cpu_patches() -> bool:
    """Apply every patch in `CPU_PATCHES` once, only without CUDA; True if they are in effect."""
    global _applied
    if torch.cuda.is_available():
        return False
    if not _applied:
        for patch in CPU_PATCHES:
            patch.apply()
        _applied = True
    return True
