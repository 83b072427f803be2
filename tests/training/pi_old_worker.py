"""torchrun worker (2 ranks) of `test_pi_old_layouts.py`: the trainer's recomputed pi_old of a
batch equals the log-probs of the HF model it starts from, in every parallel layout.

    torchrun --nproc_per_node=2 pi_old_worker.py SCRATCH OUT

For each scenario a tiny random HF checkpoint (`hf_worker.make_hf_checkpoint`, 4 layers) is
written; the run config names it as `model.hf_checkpoint` alone (the architecture comes from its
`config.json`); the batch's rollout log-probs are transformers' log-probs of that checkpoint
(the role of the fleet). `PolicyTrainer.train` then loads the checkpoint's shards, recomputes
pi_old and reports the mismatch, which must be fp32 rounding. The control scenario's trainer
starts from another seed, so its mismatch is large. Writes `{scenario: {max_abs_diff, kl,
tokens}}` to OUT (rank 0).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_worker import VOCAB, hf_log_probs, make_hf_checkpoint  # noqa: E402
from training_helpers import random_train_batch, tiny_run_config  # noqa: E402

from megatron_dapo.config.schema import ModelConfig  # noqa: E402
from megatron_dapo.mcore.parallel import (  # noqa: E402
    DistributedEnv,
    destroy_parallel,
    initialize_parallel,
)
from megatron_dapo.mcore.policy_step import PolicyTrainer  # noqa: E402
from pipeline.train_batch import TrainBatch  # noqa: E402

SCENARIOS = {
    "qwen2_tp2_sp": ("qwen2", {"tensor": 2, "sequence_parallel": True}),  # qkv bias, tied
    "qwen2_pp2": ("qwen2", {"pipeline": 2}),  # tied embeddings on two stages
    "llama_pp2_vpp2": ("llama", {"pipeline": 2, "virtual_pipeline": 2}),
    "qwen3_moe_ep2": ("qwen3_moe", {"expert": 2, "expert_tensor": 1}),
    "mixtral_tp2_etp2_sp": ("mixtral", {"tensor": 2, "sequence_parallel": True}),
    "qwen3_dp2": ("qwen3", {}),  # qk-norm
    "control_other_weights": ("llama", {}),
}
LENGTHS = (17, 9, 30, 5, 22, 12, 26, 8)


def fleet_batch(checkpoint: Path) -> TrainBatch:
    """A random batch whose rollout log-probs are transformers' under `checkpoint`."""
    from transformers import AutoModelForCausalLM

    batch = random_train_batch(0, LENGTHS, vocab=VOCAB)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    log_probs = torch.zeros(batch.num_tokens)
    for start, end in zip(batch.sample_offsets[:-1], batch.sample_offsets[1:], strict=True):
        tokens = batch.tokens[start:end].unsqueeze(0)
        log_probs[start + 1 : end] = hf_log_probs(hf, tokens)[0].float()
    rollout = torch.where(batch.loss_mask, log_probs, 0.0)
    return dataclasses.replace(batch, rollout_log_probs=rollout)


def main(scratch: Path, out: Path) -> None:
    from megatron.core import parallel_state

    env = DistributedEnv.from_environ()
    results = {}
    for name, (model_type, layout) in SCENARIOS.items():
        moe = model_type in ("qwen3_moe", "mixtral")
        base = tiny_run_config(moe=moe, world_size=2, **layout)  # its model section is replaced
        initialize_parallel(base.parallelism, env, seed=0)
        trainer_weights, fleet_weights = scratch / f"{name}_trainer", scratch / f"{name}_fleet"
        if env.rank == 0:
            make_hf_checkpoint(model_type, trainer_weights, num_hidden_layers=4)
            fleet_seed = 1 if name.startswith("control") else 0
            make_hf_checkpoint(model_type, fleet_weights, fleet_seed, num_hidden_layers=4)
        dist.barrier()
        model = ModelConfig(hf_checkpoint=str(trainer_weights))  # the architecture: config.json
        trainer = PolicyTrainer(base.model_copy(update={"model": model}))
        mismatch = trainer.train(fleet_batch(fleet_weights)).mismatch
        results[name] = {
            "max_abs_diff": float(mismatch.max_abs_diff),
            "kl": mismatch.mean_kl(),
            "tokens": int(mismatch.num_tokens),
        }
        parallel_state.destroy_model_parallel()
    if env.rank == 0:
        out.write_text(json.dumps(results, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
