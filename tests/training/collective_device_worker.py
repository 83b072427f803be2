"""torchrun worker (2 ranks) of `test_collective_devices.py`: every tensor the project hands a
collective during a training step, a checkpoint save and load and a weight export would be
accepted by NCCL (see `collective_devices`).

    torchrun --nproc_per_node=2 collective_device_worker.py SCRATCH OUT

For each layout of `SCENARIOS` (a tiny HF checkpoint of `hf_worker`): `PolicyTrainer.train`
(pi_old recomputed, mismatch, two optimizer steps), `save_checkpoint`, `load_checkpoint` and
`export_hf_checkpoint` run with the collectives checked. Then two control collectives that NCCL
would refuse (a host-made tensor, a `.cpu()` copy of a model-device tensor) and one it accepts.
Rank 0 writes `{scenario: [violation, ...], "control": [...]}` to OUT.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from collective_devices import Violation, track_collective_devices  # noqa: E402
from hf_worker import VOCAB, make_hf_checkpoint  # noqa: E402
from training_helpers import random_train_batch, tiny_run_config  # noqa: E402

from megatron_dapo.ckpt.dist_checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from megatron_dapo.config.schema import ModelConfig  # noqa: E402
from megatron_dapo.hf.convert import export_hf_checkpoint  # noqa: E402
from megatron_dapo.mcore.parallel import (  # noqa: E402
    DistributedEnv,
    destroy_parallel,
    initialize_parallel,
    model_device,
)
from megatron_dapo.mcore.policy_step import PolicyTrainer  # noqa: E402

SCENARIOS = {
    "qwen2_tp2_sp": ("qwen2", {"tensor": 2, "sequence_parallel": True}),
    "qwen2_pp2": ("qwen2", {"pipeline": 2}),
    "qwen3_moe_ep2_dp2": ("qwen3_moe", {"expert": 2, "expert_tensor": 1}),
}
LENGTHS = (17, 9, 30, 5, 22, 12, 26, 8)


def run_scenario(name: str, layout: dict, model_type: str, scratch: Path) -> list[Violation]:
    from megatron.core import parallel_state

    moe = model_type == "qwen3_moe"
    base = tiny_run_config(moe=moe, world_size=2, **layout)
    initialize_parallel(base.parallelism, DistributedEnv.from_environ(), seed=0)
    weights = scratch / f"{name}_hf"
    if dist.get_rank() == 0:
        make_hf_checkpoint(model_type, weights)
    dist.barrier()
    config = base.model_copy(update={"model": ModelConfig(hf_checkpoint=str(weights))})
    config = config.model_copy(
        update={"training": config.training.model_copy(update={"mini_batch_size": 4})}
    )
    trainer = PolicyTrainer(config)
    batch = random_train_batch(0, LENGTHS, vocab=VOCAB)
    with track_collective_devices() as violations:
        result = trainer.train(batch)
        save_checkpoint(trainer, scratch / f"{name}_ckpt")
        load_checkpoint(trainer, scratch / f"{name}_ckpt")
        export_hf_checkpoint(trainer.models, scratch / f"{name}_export", weights)
    assert len(result.optimizer_steps) == 2 and result.mismatch is not None
    parallel_state.destroy_model_parallel()
    return violations


def run_controls() -> list[Violation]:
    """Two collectives NCCL would refuse, one it accepts (a model-device tensor)."""
    on_model = torch.ones(2, device=model_device())
    with track_collective_devices(Path(__file__)) as violations:
        dist.all_reduce(torch.tensor([1.0]))  # made on the host
        dist.all_reduce((on_model * 2).cpu())  # copied to the host
        dist.all_reduce(torch.tensor([1.0]).to(model_device()))  # moved to the model's device
    return violations


def main(scratch: Path, out: Path) -> None:
    env = DistributedEnv.from_environ()
    results = {
        name: run_scenario(name, layout, model_type, scratch)
        for name, (model_type, layout) in SCENARIOS.items()
    }
    results["control"] = run_controls()
    if env.rank == 0:
        payload = {k: [dataclasses.asdict(v) for v in vs] for k, vs in results.items()}
        out.write_text(json.dumps(payload, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
