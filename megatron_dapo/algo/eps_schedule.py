"""Schedule of the clip-higher bound eps_high over training steps.

    eps_high(step) = start + (end - start) * shape(min(step / num_steps, 1))

with shape(p) = 0 (constant), p (linear) or (1 - cos(pi p)) / 2 (cosine). The value is `start`
at step 0, `end` from step `num_steps` on. Steps count optimizer steps from 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from megatron_dapo.algo.policy_loss import LOSS_PARAMETER_RANGES

SCHEDULE_SHAPES: dict[str, Callable[[float], float]] = {
    "constant": lambda progress: 0.0,
    "linear": lambda progress: progress,
    "cosine": lambda progress: (1.0 - math.cos(math.pi * progress)) / 2.0,
}


@dataclass(frozen=True)
class EpsHighSchedule:
    """eps_high over training.

    Attributes:
        start: eps_high at step 0; in eps_high's range (`LOSS_PARAMETER_RANGES`).
        end: eps_high from `num_steps` on; required (in the same range) unless `kind` is
            "constant".
        num_steps: steps to move from `start` to `end`; >= 1 unless `kind` is "constant".
        kind: one of `SCHEDULE_SHAPES`.
    """

    start: float
    end: float | None = None
    num_steps: int = 0
    kind: str = "constant"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_SHAPES:
            raise ValueError(
                f"EpsHighSchedule.kind must be one of {sorted(SCHEDULE_SHAPES)}, got {self.kind!r}"
            )
        eps_high = LOSS_PARAMETER_RANGES["eps_high"]
        eps_high.validate("EpsHighSchedule.start", self.start)
        if not (isinstance(self.num_steps, int) and self.num_steps >= 0):
            raise ValueError(
                f"EpsHighSchedule.num_steps must be an int >= 0, got {self.num_steps!r}"
            )
        if self.kind == "constant":
            return
        needed_for = f"for kind={self.kind!r}"
        if self.end is None:
            raise ValueError(f"EpsHighSchedule.end is required {needed_for}")
        eps_high.validate("EpsHighSchedule.end", self.end)
        if self.num_steps < 1:
            raise ValueError(
                f"EpsHighSchedule.num_steps must be >= 1 {needed_for}, got {self.num_steps!r}"
            )

    def value_at(self, step: int) -> float:
        """eps_high to use at optimizer step `step` (>= 0)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        end = self.start if self.end is None else self.end
        progress = min(step / self.num_steps, 1.0) if self.num_steps else 1.0
        return self.start + (end - self.start) * SCHEDULE_SHAPES[self.kind](progress)
