"""The supervised warm-up's test material, and the torchrun worker (2 ranks) of `test_sft.py`:
the same SFT steps give the same losses in 2-rank layouts as on one rank.

    torchrun --nproc_per_node=2 sft_worker.py CHECKPOINT DATA OUT

A tiny random Llama (`hf_worker.make_hf_checkpoint`) with the project's character-level
tokenizer and ChatML template (`pipeline.tokenizer`) learns a fixed mapping (a colour's fruit)
from a procedurally written jsonl. For each layout of `LAYOUTS` the worker runs `NUM_STEPS`
`SFTTrainer` steps on the pairs' first batches and writes `{layout: [loss per step]}` to OUT
(rank 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_worker import make_hf_checkpoint  # noqa: E402
from training_helpers import tiny_run_config  # noqa: E402

from megatron_dapo.config.schema import RunConfig  # noqa: E402
from pipeline.tokenizer import ALPHABET, SPECIAL_TOKENS, build_char_tokenizer  # noqa: E402

FRUIT = {
    "red": "apple",
    "green": "lime",
    "blue": "berry",
    "yellow": "banana",
    "purple": "grape",
    "orange": "mango",
    "brown": "date",
    "pink": "peach",
}
"""The mapping the policy learns: colour -> fruit."""
BATCH_SIZE = 8
NUM_STEPS = 3
LAYOUTS = {"tp2": {"tensor": 2}, "dp2": {}, "pp2": {"pipeline": 2}}
"""2-rank layouts: vocab-parallel log-probs over TP, the global normaliser over DP, the loss on
the last of two pipeline stages (1F1B, rows padded to one length)."""


def make_sft_checkpoint(directory: Path) -> Path:
    """A random 2-layer Llama (hidden 32, 4 heads / 2 KV) with the character-level tokenizer."""
    vocab = len(SPECIAL_TOKENS) + len(ALPHABET)
    make_hf_checkpoint("llama", directory, vocab_size=vocab, max_position_embeddings=256)
    build_char_tokenizer(directory)
    return directory


def write_pairs(path: Path, copies: int = 4) -> Path:
    """`copies` x 8 jsonl rows `{"prompt": "Fruit of red?", "response": "apple"}`."""
    rows = [
        {"prompt": f"Fruit of {colour}?", "response": fruit}
        for _ in range(copies)
        for colour, fruit in FRUIT.items()
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sft_config_dict(
    checkpoint: Path, data: Path, output: Path, world_size: int = 1, **parallelism: object
) -> dict:
    """A run config (as YAML would hold it) that warms up `checkpoint` on `data`: batches of
    `BATCH_SIZE` pairs (34-41 tokens) packed into micro-batches of at most 96 tokens, 6
    epochs, its own optimizer section (the tiny run's without weight decay: AdamW at 1e-2, eps
    1e-4, so that layouts agree)."""
    config = tiny_run_config(world_size=world_size, max_tokens=96, **parallelism)
    values = config.model_dump(mode="json", exclude={"model", "sft"})
    return {
        **values,
        "model": {"hf_checkpoint": str(checkpoint)},  # the architecture: its config.json
        "sft": {
            "data": {"path": str(data), "max_length": 64},
            "output_dir": str(output),
            "batch_size": BATCH_SIZE,
            "epochs": 6,
            "optimizer": {**values["optimizer"], "weight_decay": 0.0},
        },
        "metrics": {**values["metrics"], "prometheus": False},
    }


def sft_config(checkpoint: Path, data: Path, output: Path, **kwargs: object) -> RunConfig:
    return RunConfig.model_validate(sft_config_dict(checkpoint, data, output, **kwargs))


def sft_trainer(config: RunConfig, total_steps: int):
    """(`SFTTrainer` of `config`, the `SFTPairs` of `config.sft.data` with the checkpoint's
    tokenizer); collective, after `initialize_parallel`."""
    from transformers import AutoTokenizer

    from megatron_dapo.mcore.sft_step import SFTTrainer
    from pipeline.sft_data import SFTPairs

    assert config.sft is not None and config.model.hf_checkpoint is not None
    tokenizer = AutoTokenizer.from_pretrained(config.model.hf_checkpoint)
    return SFTTrainer(config, total_steps), SFTPairs.from_config(config.sft.data, tokenizer)


def first_losses(config: RunConfig) -> list[float]:
    """The losses of `NUM_STEPS` optimizer steps on the first batches of `BATCH_SIZE` pairs."""
    trainer, pairs = sft_trainer(config, NUM_STEPS)
    return [trainer.step(pairs.batch(k, BATCH_SIZE)).loss for k in range(NUM_STEPS)]


def main(checkpoint: Path, data: Path, out: Path) -> None:
    from megatron.core import parallel_state

    from megatron_dapo.mcore.parallel import DistributedEnv, destroy_parallel, initialize_parallel

    env = DistributedEnv.from_environ()
    results = {}
    for name, layout in LAYOUTS.items():
        config = sft_config(checkpoint, data, out.parent / name, world_size=2, **layout)
        initialize_parallel(config.parallelism, env, seed=0)
        results[name] = first_losses(config)
        parallel_state.destroy_model_parallel()
    if env.rank == 0:
        out.write_text(json.dumps(results, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
