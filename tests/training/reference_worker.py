"""torchrun worker (2 ranks) of `test_reference_layouts.py`: the reference policy's log-probs
equal the log-probs of the HF checkpoint the run starts from, in sharded layouts, also after
the policy has moved away from it.

    torchrun --nproc_per_node=2 reference_worker.py SCRATCH OUT

For each scenario a tiny random HF checkpoint (`hf_worker.make_hf_checkpoint`, 4 layers) is
written and named as `model.hf_checkpoint`; the batch's rollout log-probs are transformers'
log-probs of it (`pi_old_worker.fleet_batch`). A `PolicyTrainer` with a k3 KL penalty takes two
optimizer steps on the batch, then runs its forward-only passes once more (pi_old and pi_ref of
every micro-batch, `_with_log_probs`) on the packed batch. Writes to OUT (rank 0) per scenario:
the reported KL of both steps, the max |log pi_ref - transformers'| and, as the control, the
max |log pi_old - transformers'| of the moved policy over every last-stage rank's loss tokens,
and the loss tokens compared (counted once: TP rank 0 of the last stage).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_worker import make_hf_checkpoint  # noqa: E402
from pi_old_worker import SCENARIOS as PI_OLD_SCENARIOS  # noqa: E402
from pi_old_worker import fleet_batch  # noqa: E402
from training_helpers import tiny_run_config  # noqa: E402

from megatron_dapo.config.schema import ModelConfig  # noqa: E402
from megatron_dapo.mcore.parallel import (  # noqa: E402
    DistributedEnv,
    destroy_parallel,
    initialize_parallel,
)
from megatron_dapo.mcore.policy_step import PolicyTrainer  # noqa: E402

SCENARIOS = {
    name: PI_OLD_SCENARIOS[name]
    for name in ("qwen2_tp2_sp", "qwen2_pp2", "llama_pp2_vpp2", "qwen3_moe_ep2")
}


def _max_abs_diffs(trainer: PolicyTrainer, batch) -> tuple[list[float], int]:
    """[max |log pi_ref - rollout|, max |log pi_old - rollout|] over this rank's loss tokens
    (0 off the last stage) and the loss tokens it counts (TP rank 0 of the last stage)."""
    from megatron.core import parallel_state

    passed = trainer._with_log_probs(trainer._pack(batch))
    diffs, tokens = [0.0, 0.0], 0
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return diffs, tokens
    for mb in passed.micro_batches:
        mask = mb.loss_mask
        for index, log_probs in enumerate((mb.ref_log_probs, mb.old_log_probs)):
            diff = (log_probs - mb.rollout_log_probs)[mask].abs().max().item()
            diffs[index] = max(diffs[index], diff)
        tokens += int(mask.sum()) * (parallel_state.get_tensor_model_parallel_rank() == 0)
    return diffs, tokens


def main(scratch: Path, out: Path) -> None:
    from megatron.core import parallel_state

    env = DistributedEnv.from_environ()
    results = {}
    for name, (model_type, layout) in SCENARIOS.items():
        moe = model_type == "qwen3_moe"
        base = tiny_run_config(moe=moe, world_size=2, **layout)  # its model section is replaced
        initialize_parallel(base.parallelism, env, seed=0)
        weights = scratch / name
        if env.rank == 0:
            make_hf_checkpoint(model_type, weights, num_hidden_layers=4)
        dist.barrier()
        algorithm = base.algorithm.model_copy(update={"kl_coef": 0.1, "kl_estimator": "k3"})
        model = ModelConfig(hf_checkpoint=str(weights))  # the architecture: config.json
        trainer = PolicyTrainer(base.model_copy(update={"model": model, "algorithm": algorithm}))
        batch = fleet_batch(weights)
        kls = [trainer.train(batch).optimizer_steps[0].reference_kl for _ in range(2)]
        diffs, tokens = _max_abs_diffs(trainer, batch)
        reduced = torch.tensor(diffs, dtype=torch.float64)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        counted = torch.tensor([tokens], dtype=torch.int64)
        dist.all_reduce(counted)
        results[name] = {
            "kl_step1": kls[0],
            "kl_step2": kls[1],
            "ref_max_abs_diff": reduced[0].item(),
            "control_old_max_abs_diff": reduced[1].item(),
            "tokens": int(counted),
        }
        parallel_state.destroy_model_parallel()
    if env.rank == 0:
        out.write_text(json.dumps(results, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
