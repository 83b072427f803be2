"""SGLang platform plugin that runs `--device cpu` on machines without CUDA.

SGLang's own CPU engine needs a source-built `sgl_kernel` that PyPI lacks. Registering a
subclass of `CpuSRTPlatform` as an out-of-tree (OOT) platform through the
`sglang.srt.platforms` entry point makes SGLang run its native torch models on CPU
(`--device cpu --attention-backend torch_native`). The plugin declines (returns None) when
CUDA is available, so GPU machines keep SGLang's CUDA platform.
"""

from __future__ import annotations

PLATFORM_CLASS = "sglang_cpu_platform.platform:CpuOOTPlatform"


def activate() -> str | None:
    """SGLang plugin hook: the platform class path, or None to leave CUDA machines alone."""
    import torch

    return None if torch.cuda.is_available() else PLATFORM_CLASS
