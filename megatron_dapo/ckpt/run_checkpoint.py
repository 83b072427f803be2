"""Resumable run checkpoints: the Megatron distributed checkpoint plus everything else a run
needs to continue exactly where it stopped.

    <checkpoint.dir>/step<K>/          after K RL steps (the policy is at weight version K)
        (dist_checkpointing files)     model, optimizer, LR scheduler, optimizer-step counter
        rng/rank<r>.pt                 torch (CPU, CUDA), Python and NumPy RNG states, Megatron's
                                       model-parallel RNG tracker, per global rank
        pipeline.pt                    rank 0: the data plane's state (prompt position, carried
                                       groups, group counters), the step and the parallel layout
        complete                       written last: a directory without it is ignored

A checkpoint resumes in the layout that wrote it (`parallelism`: TP, PP, virtual stages, EP,
expert TP, distributed optimizer) and with the same number of ranks; a run changes layout by
starting from an HF export instead.

A crash while saving leaves a directory without `complete`, which `latest_checkpoint` skips
and the next save of the same step replaces. Only the newest `checkpoint.keep_last` complete
checkpoints are kept.
"""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_dapo.ckpt.dist_checkpoint import load_checkpoint, save_checkpoint
from megatron_dapo.mcore.policy_step import PolicyTrainer

_STEP_DIR = re.compile(r"step(\d+)")
_COMPLETE = "complete"
_PIPELINE_STATE = "pipeline.pt"
_LAYOUT_FIELDS = (
    "tensor",
    "pipeline",
    "virtual_pipeline",
    "expert",
    "expert_tensor",
    "distributed_optimizer",
)
"""The `parallelism` fields that decide how the checkpoint's tensors are sharded."""


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues.

    Attributes:
        step: RL steps already done; the next step trains weight version `step`.
        pipeline_state: the data plane's `state_dict()` (rank 0; None on other ranks).
    """

    step: int
    pipeline_state: dict[str, Any] | None


def step_directory(root: str | Path, step: int) -> Path:
    return Path(root) / f"step{step}"


def has_checkpoint(root: str | Path, step: int) -> bool:
    """Whether the checkpoint after `step` RL steps exists and is complete."""
    return (step_directory(root, step) / _COMPLETE).is_file()


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint under `root`, by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _STEP_DIR.fullmatch(path.name)) and (path / _COMPLETE).is_file()
    )


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint of the highest step under `root`, or None."""
    complete = complete_checkpoints(root)
    return complete[-1][1] if complete else None


def save_run_checkpoint(
    trainer: PolicyTrainer,
    root: str | Path,
    step: int,
    pipeline_state: dict[str, Any] | None,
    keep_last: int,
) -> Path:
    """Write the checkpoint after `step` RL steps; collective (every rank calls it).

    Args:
        pipeline_state: the data plane's state on global rank 0 (ignored elsewhere).
        keep_last: complete checkpoints to keep, this one included.
    """
    directory = step_directory(root, step)
    is_rank0 = dist.get_rank() == 0
    if is_rank0 and directory.exists():  # an incomplete save of this step, interrupted
        shutil.rmtree(directory)
    dist.barrier()
    save_checkpoint(trainer, directory)
    rng_dir = directory / "rng"
    rng_dir.mkdir(exist_ok=True)
    torch.save(_rng_states(), rng_dir / f"rank{dist.get_rank()}.pt")
    if is_rank0:
        saved = {"step": step, "pipeline": pipeline_state, "layout": _layout(trainer)}
        torch.save(saved, directory / _PIPELINE_STATE)
    dist.barrier()
    if is_rank0:
        (directory / _COMPLETE).write_text(f"{step}\n")
        for _, old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return directory


def load_run_checkpoint(trainer: PolicyTrainer, directory: str | Path) -> ResumePoint:
    """Restore `trainer` and this rank's RNG states from `directory`; collective.

    Raises:
        FileNotFoundError: no RNG states were saved for this rank (another world size).
    """
    directory = Path(directory)
    saved = torch.load(directory / _PIPELINE_STATE, weights_only=False)
    layout = _layout(trainer)
    if saved["layout"] != layout:
        differing = ", ".join(
            f"{name} {saved['layout'][name]} (this run: {layout[name]})"
            for name in _LAYOUT_FIELDS
            if saved["layout"][name] != layout[name]
        )
        raise ValueError(
            f"{directory} was written with another parallelism: {differing}; a run checkpoint "
            "resumes only in its own layout (start a new run from an HF export of its weights "
            "to change it)"
        )
    rank_file = directory / "rng" / f"rank{dist.get_rank()}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(
            f"{rank_file} is missing: {directory} was written by a run with fewer ranks; "
            "exact resume needs the same number of ranks"
        )
    load_checkpoint(trainer, directory)
    _set_rng_states(torch.load(rank_file, weights_only=False))
    pipeline_state = saved["pipeline"] if dist.get_rank() == 0 else None
    return ResumePoint(step=saved["step"], pipeline_state=pipeline_state)


def _layout(trainer: PolicyTrainer) -> dict[str, Any]:
    parallelism = trainer.config.parallelism
    return {name: getattr(parallelism, name) for name in _LAYOUT_FIELDS}


def _rng_states() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "megatron_tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state_all(states["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["megatron_tracker"])
