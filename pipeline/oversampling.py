"""How many prompts a dynamic-sampling round requests: an online keep-rate estimate plus a
binomial margin.

A round that misses `m` kept groups draws

    N = ceil((m + z * sqrt(m * (1 - p))) / p),    z = `MARGIN_SIGMAS`

prompts, where `p` is the estimated keep rate (fraction of generated groups kept), so that
Binomial(N, p) >= m with probability about Phi(z) (90%): one round usually fills the batch, and
the expected surplus, z * sqrt(m * (1 - p)) kept groups, shrinks as `p` nears 1 (a fixed
over-sampling factor f instead adds (f - 1) * m whatever `p`). The surplus is what the queue
carries to the next step or aborts in flight when the batch is full: the samples generated
beyond `1 / p` per kept one.

The estimate, `p = max((kept + p0) / (generated + 1), min_keep_rate)`, counts groups with weights
that decay by `STEP_DECAY` at every step (a memory of about `1 / (1 - STEP_DECAY)` steps, so it
follows a policy whose keep rate drifts), and starts from the prior `p0 = 1 / oversample_factor`
worth one group: the first round of a run is sized as if the keep rate were `p0`.

That N is a round's budget, not what it issues at once: a round keeps `ceil(m' / p)` groups
generating (`in_flight_for`, m' the groups still missing, p re-estimated as groups finish) and
draws one more from the budget whenever a dropped group leaves too few, so at high keep rates
the margin's prompts are generated only when drops call for them (they used to run from the
start and be aborted as stragglers when the batch filled).

Measured (`benchmarks/dynamic_sampling.py` defaults, seed 0; gen/kept counts every sample
that began generating, aborted ones whole; 1/p of the prompts consumed, a response cut at the
length limit counting as wrong; wall times noisy on a shared 2-core machine):

    acceptance  1/p   gen/kept before -> after (ratio)   speed-up vs sync before -> after
    0.10        7.0   9.10 (1.30) -> 9.04 (1.28)         1.25x* -> 2.23x
    0.25        3.3   4.03 (1.22) -> 3.76 (1.12)         2.29x  -> 2.74x
    0.50        1.8   2.09 (1.12) -> 2.01 (1.11)         1.51x  -> 1.26x
    0.90        1.15  1.27 (1.11) -> 1.23 (1.07)         1.83x  -> 1.57x
    (* a noisy run: other runs of the same queue code took 4.9-5.3 s, ~3.2x this sync loop)

On a quiet machine (2026-11-29) the same code gives 9.08 (1.29), 3.76 (1.12), 1.99 (1.09),
1.23 (1.07), speed-ups 3.44x, 2.65x, 1.43x, 2.01x. At low keep rates the surplus is bounded by
the fleet, not the margin: when the batch fills, the fleet's 256 slots are full of partly
generated groups, which are aborted. Measured at acceptance 0.1 (5 steps): 17% of the samples
that began generating were aborted in flight (~400 per step, 1.5 fleet loads), and the groups
aborted are more often keepable than those finished (a group with a response cut at the limit is
kept, and such groups finish last): 7.54 groups scored per kept one against 7.05 over all rows
begun, so 9.08 = 7.54 x 1.20; at 0.25 11.5% were aborted. Carrying in-flight groups into the next
step instead of aborting them (a partial rollout, with per-token policy versions) is what would
remove both; not built.

With `adapt_to_keep_rate` off a round draws `ceil(m * oversample_factor)` prompts; with dynamic
sampling off, `m`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.config import DynamicSamplingConfig

MARGIN_SIGMAS = 1.28
"""`z` of the margin: a round fills its missing groups with probability ~90% (normal approx.)."""

STEP_DECAY = 0.8
"""Weight of the past groups' counts after each step (a memory of ~5 steps)."""


@dataclass
class KeepRateEstimator:
    """Decayed counts of generated and kept groups, and the prompts a round requests.

    Args:
        config: the dynamic-sampling switches (`oversample_factor` gives the prior).
    """

    config: DynamicSamplingConfig
    generated: float = 0.0
    """Generated groups, each weighted `STEP_DECAY ** (steps since)`."""
    kept: float = 0.0
    """Kept groups, weighted alike."""

    @property
    def keep_rate(self) -> float:
        """The estimated fraction of generated groups kept (at least `min_keep_rate`)."""
        prior = 1.0 / self.config.oversample_factor
        estimate = (self.kept + prior) / (self.generated + 1.0)
        return max(estimate, self.config.min_keep_rate)

    def observe(self, kept: bool) -> None:
        """Count one generated group, kept or dropped by the group filter."""
        self.generated += 1.0
        self.kept += float(kept)

    def end_step(self) -> None:
        """Decay the counts by `STEP_DECAY` (call once per step)."""
        self.generated *= STEP_DECAY
        self.kept *= STEP_DECAY

    def prompts_for(self, missing: int) -> int:
        """Prompts to draw for a round that misses `missing` kept groups (module docstring)."""
        if not self.config.enabled:
            return missing
        if not self.config.adapt_to_keep_rate:
            return math.ceil(missing * self.config.oversample_factor)
        p = self.keep_rate
        return math.ceil((missing + MARGIN_SIGMAS * math.sqrt(missing * (1.0 - p))) / p)

    def in_flight_for(self, missing: int) -> int:
        """Groups to keep generating while a round misses `missing` kept groups: `ceil(m / p)`,
        as many as are expected to fill them, without the margin (module docstring)."""
        if not (self.config.enabled and self.config.adapt_to_keep_rate):
            return self.prompts_for(missing)
        return math.ceil(missing / self.keep_rate)

    def state_dict(self) -> dict[str, float]:
        return {"generated": self.generated, "kept": self.kept}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generated = float(state["generated"])
        self.kept = float(state["kept"])
