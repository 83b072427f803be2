"""The CPU platform class, imported by SGLang only after `activate()` selected it."""

from sglang.srt.platforms.cpu import CpuSRTPlatform
from sglang.srt.platforms.device_mixin import PlatformEnum


class CpuOOTPlatform(CpuSRTPlatform):
    """SGLang's CPU platform, registered out of tree so no `sgl_kernel` CPU build is needed."""

    _enum = PlatformEnum.OOT
