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
