"""SGLang platform plugin that runs `--device cpu` on machines without CUDA.

SGLang's own CPU engine needs a source-built `sgl_kernel` that PyPI lacks. Registering a
subclass of `CpuSRTPlatform` as an out-of-tree (OOT) platform through the
`sglang.srt.platforms` entry point makes SGLang run its native torch models on CPU
(`--device cpu --attention-backend torch_native`). The plugin declines (returns None) when
CUDA is available, so GPU machines keep SGLang's CUDA platform.

A general plugin (`sglang.srt.plugins`, loaded before the server arguments are checked) also
declares `torch_native` attention usable with `--enable-deterministic-inference` on CPU: that
backend attends each request separately, so its output does not depend on the batch, and the
flag's per-request `sampling_seed` then makes sampling reproducible (exact resume needs it).
Another general plugin keeps host buffers that SGLang pins for CUDA copies unpinned on CPU, so
`--enable-return-routed-experts` (routing replay) starts. A third lets a CPU server answer
`/release_memory_occupation` (colocated placement's call sequence, tested on CPU).
"""

from __future__ import annotations

PLATFORM_CLASS = "sglang_cpu_platform.platform:CpuOOTPlatform"


def activate() -> str | None:
    """SGLang plugin hook: the platform class path, or None to leave CUDA machines alone."""
    import torch

    return None if torch.cuda.is_available() else PLATFORM_CLASS


def allow_deterministic_cpu_attention() -> None:
    """SGLang general-plugin hook: on CPU, make `--enable-deterministic-inference` runnable.

    Declares `torch_native` attention deterministic, skips SGLang's batch-invariant kernels
    (Triton, CUDA only) and samples with `seeded_gumbel_max` instead of SGLang's seeded sampler
    (its CPU hash needs a source-built `sgl_kernel`). On CPU the flag then means per-request
    seeded sampling (`sampling_seed`), which is what reproducible rollouts need; logits may
    still differ in the last bits between batch compositions.
    """
    import torch

    if torch.cuda.is_available():
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import add_deterministic_attention_backend_choices

    add_deterministic_attention_backend_choices(["torch_native"])
    HookRegistry.register(
        "sglang.srt.model_executor.model_runner.ModelRunner.maybe_enable_batch_invariant_mode",
        _no_batch_invariant_kernels,
        HookType.REPLACE,
    )
    HookRegistry.register(
        "sglang.srt.layers.sampler.multinomial_with_seed", seeded_gumbel_max, HookType.REPLACE
    )


def unpinned_host_buffers() -> None:
    """SGLang general-plugin hook: on CPU, host buffers stay ordinary (unpinned) memory.

    SGLang allocates some host buffers through `mem_cache/pool_host/common.py`
    `alloc_with_host_register`, which pins them with `cudaHostRegister`; without CUDA that
    raises "Found no NVIDIA driver". The routed-experts capturer of
    `--enable-return-routed-experts` is one (`state_capturer/base.py` `BaseHostCache`, int32
    `[KV-pool tokens, layers, top-k]`): the scheduler died at start-up. Pinning only speeds up
    copies to a GPU, so on CPU registration is skipped.
    """
    import torch

    if torch.cuda.is_available():
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.mem_cache.pool_host.common._cuda_host_register",
        _no_host_register,
        HookType.REPLACE,
    )


def cpu_memory_occupation() -> None:
    """SGLang general-plugin hook: on CPU, `torch.cuda.synchronize` is a no-op.

    `/release_memory_occupation` ends with `torch.get_device_module().synchronize()`, which is
    `torch.cuda` whatever the device: without CUDA it raises "Found no NVIDIA driver" and the
    scheduler dies. With no CUDA device there is no CUDA work to wait for, so the CPU server
    then releases (with SGLang's no-op memory saver: it flushes the cache and frees nothing)
    and resumes like a GPU server.
    """
    import torch

    if torch.cuda.is_available():
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("torch.cuda.synchronize", _no_cuda_work, HookType.REPLACE)


def _no_cuda_work(*args: object, **kwargs: object) -> None:
    """Replaces `torch.cuda.synchronize` on CPU: nothing to wait for."""


def _no_host_register(*args: object, **kwargs: object) -> None:
    """Replaces `_cuda_host_register` on CPU: the buffer stays as allocated."""


def _no_batch_invariant_kernels(*args: object, **kwargs: object) -> None:
    """Replaces `ModelRunner.maybe_enable_batch_invariant_mode` on CPU (no Triton kernels)."""


def seeded_gumbel_max(logprobs, seed, positions):
    """One token per row drawn from `softmax(logprobs)`, reproducibly: Gumbel-max with noise
    from a generator seeded by the row's (sampling seed, position).

    Args:
        logprobs: [n, vocab] log-probabilities (or unnormalised logits).
        seed: [n] int64 sampling seeds.
        positions: [n] token positions.
    Returns:
        [n, 1] int64 token ids.
    """
    import torch

    rows = []
    for row_seed, position in zip(seed.tolist(), positions.tolist(), strict=True):
        generator = torch.Generator().manual_seed(hash((row_seed, position)) & (2**63 - 1))
        uniform = torch.rand(logprobs.shape[1], generator=generator, dtype=torch.float64)
        rows.append(-(-uniform.clamp(min=1e-300).log()).log())
    gumbel = torch.stack(rows).to(logprobs.device)
    return torch.argmax(logprobs.double() + gumbel, dim=1, keepdim=True)
