"""torchrun worker (2 ranks) of `test_routing_replay_layouts.py`: the routers replay a batch's
routes in every parallel layout, and activation recompute re-runs them with the right routes.

    torchrun --nproc_per_node=2 routing_replay_worker.py SCRATCH OUT

For each scenario a tiny HF MoE checkpoint (4 layers, 4 experts, top-2) is trained on one batch
with random routes, once without and once with full recompute. A forward hook records every
router call's routing map; each must be the routes of one of this rank's micro-batches for
that layer (this TP rank's slice of the row under sequence parallelism), and each micro-batch
must be routed once per pass (pi_old, training forward, recompute). Recompute replaying a
wrong micro-batch's routes would change the gradient: loss and gradient norm are reported for
both runs. Writes `{scenario: {recompute: {...}}}` to OUT (rank 0; counts summed over ranks).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_worker import VOCAB, make_hf_checkpoint  # noqa: E402
from training_helpers import random_train_batch, tiny_run_config  # noqa: E402

from megatron_dapo.config.schema import ModelConfig, RecomputeConfig  # noqa: E402
from megatron_dapo.mcore.parallel import (  # noqa: E402
    DistributedEnv,
    destroy_parallel,
    initialize_parallel,
)
from megatron_dapo.mcore.policy_step import PolicyTrainer  # noqa: E402
from pipeline.train_batch import TrainBatch  # noqa: E402

SCENARIOS = {
    "mixtral_tp2_sp": ("mixtral", {"tensor": 2, "sequence_parallel": True}),
    "qwen3_moe_ep2": ("qwen3_moe", {"expert": 2, "expert_tensor": 1}),
    "mixtral_pp2": ("mixtral", {"pipeline": 2}),
    "qwen3_moe_pp2_vpp2": ("qwen3_moe", {"pipeline": 2, "virtual_pipeline": 2}),
}
LENGTHS = (17, 9, 30, 5, 22, 12, 26, 8)
LAYERS, EXPERTS, TOPK = 4, 4, 2


def routed_batch() -> TrainBatch:
    """`random_train_batch` with K distinct random experts per token and layer."""
    batch = random_train_batch(0, LENGTHS, vocab=VOCAB)
    scores = torch.rand(
        batch.num_tokens, LAYERS, EXPERTS, generator=torch.Generator().manual_seed(1)
    )
    fields = {name: getattr(batch, name) for name in TrainBatch.__dataclass_fields__}
    return TrainBatch(
        **{**fields, "routed_experts": scores.argsort(dim=2)[..., :TOPK].to(torch.uint8)}
    )


def run(config, batch: TrainBatch, sequence_parallel_rank: int, slices: int) -> dict:
    from megatron.core.transformer.moe.router import TopKRouter

    trainer = PolicyTrainer(config)
    calls: list[tuple[int, torch.Tensor]] = []
    layers = set()
    for chunk in trainer.chunks:
        for module in chunk.modules():
            if isinstance(module, TopKRouter):
                layers.add(module.layer_number - 1)
                module.register_forward_hook(
                    lambda router, _, out: calls.append((router.layer_number - 1, out[1].clone()))
                )
    metrics = trainer.train(batch).optimizer_steps[0]
    candidates = {}  # (layer, micro-batch index) -> expected routing map
    for index, mb in enumerate(trainer._pack(batch).micro_batches):
        length = mb.length // slices
        rows = mb.routed_experts[
            0, sequence_parallel_rank * length : (sequence_parallel_rank + 1) * length
        ]
        for layer in layers:
            expected = torch.zeros(length, EXPERTS, dtype=torch.bool)
            candidates[layer, index] = expected.scatter(1, rows[:, layer].long(), True)
    matched = Counter()
    unmatched = 0
    for layer, applied in calls:
        hits = [
            key
            for key, wanted in candidates.items()
            if key[0] == layer and torch.equal(applied, wanted)
        ]
        unmatched += not hits
        matched.update(hits[:1])
    passes = 3 if config.training.recompute.granularity == "full" else 2
    counts = torch.tensor(
        [
            len(calls),
            unmatched,
            sum(n != passes for n in matched.values()) + len(candidates) - len(matched),
        ]
    )
    dist.all_reduce(counts)
    return {
        "calls": int(counts[0]),
        "unmatched_calls": int(counts[1]),
        "micro_batch_layers_not_routed_once_per_pass": int(counts[2]),
        "loss": metrics.loss,
        "grad_norm": metrics.grad_norm,
    }


def main(scratch: Path, out: Path) -> None:
    from megatron.core import parallel_state

    env = DistributedEnv.from_environ()
    results = {}
    for name, (model_type, layout) in SCENARIOS.items():
        base = tiny_run_config(moe=True, world_size=2, **layout)
        initialize_parallel(base.parallelism, env, seed=0)
        weights = scratch / name
        if env.rank == 0:
            make_hf_checkpoint(model_type, weights, num_hidden_layers=LAYERS)
        dist.barrier()
        sequence_parallel = layout.get("sequence_parallel", False)
        slices = parallel_state.get_tensor_model_parallel_world_size() if sequence_parallel else 1
        rank = parallel_state.get_tensor_model_parallel_rank() if sequence_parallel else 0
        results[name] = {}
        for recompute in ("none", "full"):
            config = base.model_copy(
                update={
                    "model": ModelConfig(hf_checkpoint=str(weights)),
                    "algorithm": base.algorithm.model_copy(update={"routing_replay": "rollout"}),
                    "training": base.training.model_copy(
                        update={"recompute": RecomputeConfig(granularity=recompute)}
                    ),
                }
            )
            results[name][recompute] = run(config, routed_batch(), rank, slices)
        parallel_state.destroy_model_parallel()
    if env.rank == 0:
        out.write_text(json.dumps(results, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
