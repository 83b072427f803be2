"""`megatron-dapo sft CONFIG [overrides]`: the supervised warm-up, run on every rank of a
torchrun job (or alone for a 1-rank layout).

    start:  rank 0 writes the initial checkpoint if the run starts from scratch
            (`model.random_init`); every rank reads and tokenizes the pairs of `sft.data`
            (`pipeline.sft_data`, the same on every rank: no broadcast) and loads its
            Megatron-Core shards of `model.hf_checkpoint` (`SFTTrainer`)
    step k: all  the k-th batch of `sft.batch_size` pairs -> one optimizer step (loss on the
                 response tokens, token-mean over the batch)
            rank 0 progress bar, loss line, a `metrics.jsonl` record in `sft.output_dir`
    end:    the policy written to `sft.output_dir` as an HF checkpoint (collective); `train`
            starts from it with `model.hf_checkpoint=<sft.output_dir>`.

The run is `sft.epochs` epochs of `pairs // sft.batch_size` steps, cut at `sft.steps` if set.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch.distributed as dist

from megatron_dapo.config.schema import RunConfig, SFTConfig


def total_steps(sft: SFTConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the warm-up: `sft.epochs` epochs, at most `sft.steps`."""
    epochs = sft.epochs * steps_per_epoch
    return min(epochs, sft.steps) if sft.steps is not None else epochs


def check_output_dir(sft: SFTConfig) -> Path:
    """`sft.output_dir`, which must not hold a checkpoint yet.

    Raises:
        FileExistsError: it holds a `config.json`.
    """
    output = Path(sft.output_dir)
    if (output / "config.json").exists():
        raise FileExistsError(
            f"sft.output_dir={output} already holds a checkpoint (config.json): remove it or "
            "write elsewhere"
        )
    return output


def run(config: RunConfig) -> None:
    """The warm-up on this rank; see the module doc."""
    from transformers import AutoTokenizer

    from megatron_dapo.hf.convert import export_hf_checkpoint
    from megatron_dapo.mcore.cpu_patches import apply_cpu_patches
    from megatron_dapo.mcore.parallel import DistributedEnv, destroy_parallel, initialize_parallel
    from megatron_dapo.mcore.sft_step import SFTTrainer
    from megatron_dapo.report.sft_report import SFTReporter
    from megatron_dapo.train import prepare_initial_checkpoint
    from pipeline.sft_data import SFTPairs

    sft = config.sft
    if sft is None:
        raise ValueError("megatron-dapo sft needs an sft section in the run config")
    output = check_output_dir(sft)
    # torch deprecates collectives that Megatron-Core calls: not actionable in a run log
    warnings.filterwarnings("ignore", message=r".* is deprecated", module=r"torch\.distributed")
    apply_cpu_patches()
    initialize_parallel(config.parallelism, DistributedEnv.from_environ(), config.training.seed)
    reporter = None
    try:
        initial = prepare_initial_checkpoint(config)
        pairs = SFTPairs.from_config(sft.data, AutoTokenizer.from_pretrained(initial))
        per_epoch = pairs.steps_per_epoch(sft.batch_size)
        steps = total_steps(sft, per_epoch)
        trainer = SFTTrainer(config, steps)
        if dist.get_rank() == 0:
            print(
                f"sft: {len(pairs.pairs)} pairs, {steps} steps of {sft.batch_size} "
                f"({per_epoch} per epoch) from {initial} to {output}",
                flush=True,
            )
            log_path, log_every = output / "metrics.jsonl", config.metrics.log_every
            reporter = SFTReporter(steps, per_epoch, log_path, log_every)
        for step in range(steps):
            started = time.perf_counter()
            metrics = trainer.step(pairs.batch(step, sft.batch_size))
            if reporter is not None:
                reporter.report(step, metrics, time.perf_counter() - started)
        export_hf_checkpoint(trainer.models, output, initial)
        if dist.get_rank() == 0:
            print(f"wrote {output}; start RL from it: model.hf_checkpoint={output}", flush=True)
    finally:
        if reporter is not None:
            reporter.close()
        destroy_parallel()
