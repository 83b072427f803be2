"""Rank 0's account of a supervised warm-up (`megatron-dapo sft`): a progress bar, one loss line
per step (every `metrics.log_every` steps and the last) and one `metrics.jsonl` record per step.

A record holds every `SFTStepMetrics` field plus `step` (1-based), `epoch` (1-based), `seconds`
(wall time of the step) and `tokens_per_second` (prompt and response tokens through the model).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tqdm import tqdm

from megatron_dapo.mcore.sft_step import SFTStepMetrics


class SFTReporter:
    """Writes `log_path` afresh (JSON lines, flushed per step) and prints the step lines.

    Args:
        total_steps: optimizer steps of the warm-up.
        steps_per_epoch: optimizer steps of one epoch.
        log_path: the `metrics.jsonl` to write.
        log_every: print the loss line every this many steps (and the last).
    """

    def __init__(self, total_steps: int, steps_per_epoch: int, log_path: Path, log_every: int):
        self._total = total_steps
        self._per_epoch = steps_per_epoch
        self._log_every = log_every
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("w", encoding="utf-8")
        self._bar = tqdm(total=total_steps, desc="SFT steps", unit="step")

    def report(self, step: int, m: SFTStepMetrics, seconds: float) -> None:
        """Log optimizer step `step` (0-based) that took `seconds` of wall time."""
        record = {
            "step": step + 1,
            "epoch": step // self._per_epoch + 1,
            **dataclasses.asdict(m),
            "seconds": seconds,
            "tokens_per_second": m.num_tokens / max(seconds, 1e-9),
        }
        self._log.write(json.dumps(record) + "\n")
        self._log.flush()
        self._bar.update(1)
        if (step + 1) % self._log_every and step + 1 < self._total:
            return
        parts = [
            f"sft step {step + 1}/{self._total}",
            f"epoch {record['epoch']}",
            f"loss {m.loss:.4f}",
            f"grad norm {m.grad_norm:.3f}",
            f"lr {m.lr:.2e}",
            f"{m.num_loss_tokens} response tokens",
            f"{record['tokens_per_second']:.0f} tok/s",
            f"{seconds:.2f}s",
        ]
        if m.moe_aux_loss is not None:
            parts.insert(3, f"aux {m.moe_aux_loss:.3f}")
        if not m.update_successful:
            parts.append("optimizer step SKIPPED as non-finite")
        self._bar.write(" | ".join(parts))

    def close(self) -> None:
        self._bar.close()
        self._log.close()
