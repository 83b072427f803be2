"""Write a run's initial HF checkpoint before its rollout nodes start serving it.

    python launch/initial_model.py CONFIG [dotted.key=value ...]

A run that starts from random weights (`model.random_init`) has its initial checkpoint written
by the trainer's rank 0 at start-up; with SLURM rollout nodes the SGLang servers start first and
need it on disk, so `slurm/dapo.sbatch` runs this beforehand. It writes
`model.hf_checkpoint` with the trainer's function and seed when `random_init` is set and the
directory has no `config.json` yet (the trainer then finds it and loads it), and does nothing
otherwise. Exit code 0, or 2 with the reason for a bad config.
"""

from __future__ import annotations

import sys

from launch_env import config_from_argv

from megatron_dapo.hf.initial_checkpoint import ensure_initial_checkpoint


def main(argv: list[str]) -> int:
    config = config_from_argv("initial_model.py", argv)
    if config.model.random_init is None:
        return 0
    path = ensure_initial_checkpoint(config.model, config.training.seed)
    print(f"initial model: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
