"""The SGLang CPU platform plugin: SGLang selects it on CPU machines, it declines with CUDA."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch

pytest.importorskip("sglang_cpu_platform")


def _activate():
    (entry,) = [
        e for e in entry_points(group="sglang.srt.platforms") if "sglang_cpu_platform" in e.value
    ]
    return entry.load()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the plugin only activates without CUDA")
def test_sglang_resolves_the_plugin_platform_on_cpu():
    from sglang.srt.platforms import current_platform
    from sglang.srt.platforms.cpu import CpuSRTPlatform

    assert type(current_platform).__name__ == "CpuOOTPlatform"
    assert isinstance(current_platform, CpuSRTPlatform) and current_platform.is_out_of_tree()


def test_plugin_declines_when_cuda_is_available(monkeypatch):
    activate = _activate()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert activate() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinning works with CUDA")
def test_host_buffers_are_allocated_unpinned_on_cpu():
    """The routed-experts capturer's host buffer (`--enable-return-routed-experts`) is allocated
    this way; without the plugin `cudaHostRegister` raises and the server dies at start-up."""
    from sglang.srt.mem_cache.pool_host import common
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang_cpu_platform import unpinned_host_buffers

    def allocate() -> torch.Tensor:
        allocator = common.HostTensorAllocator()
        return common.alloc_with_host_register((8, 2, 2), torch.int32, "cpu", True, allocator)

    with pytest.raises(RuntimeError):
        allocate()
    unpinned_host_buffers()
    HookRegistry.apply_hooks()
    buffer = allocate()
    assert buffer.shape == (8, 2, 2) and not buffer.is_pinned()
