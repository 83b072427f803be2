"""torchrun worker of the multi-rank parity tests (`test_training_parity.py`).

    torchrun --nproc_per_node=N parity_worker.py --phase {reference,two,four} --out DIR

`reference` (1 rank) saves the initial weights of a dense and an MoE tiny policy, takes two
optimizer steps on each and stores loss, gradients and parameters (full shapes). `two` and
`four` run the layouts of their world size from those initial weights and write, per scenario,
the largest differences to the reference (`DIR/<phase>.json`): after step 1 the loss, every
gradient (gathered to full shape; the distributed optimizer's shards are combined) and every
parameter; after a save/load round trip (or a reload with another DP size) step 2.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training_helpers import random_train_batch, tiny_run_config  # noqa: E402

from megatron_dapo.ckpt.dist_checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from megatron_dapo.mcore.parallel import DistributedEnv, initialize_parallel  # noqa: E402
from megatron_dapo.mcore.policy_step import PolicyTrainer  # noqa: E402

DENSE_LENGTHS = (17, 9, 30, 5, 22, 12, 26, 8)  # uneven: exercises packing and padding
MOE_LENGTHS = (20, 12, 20, 12, 18, 14, 18, 14)  # four full 32-token bins: no padding tokens,
MOE_MAX_TOKENS = 32  # which the load-balancing loss would count

TWO_RANK_SCENARIOS = {
    "dense_tp2_sp": ("dense", {"tensor": 2, "sequence_parallel": True}),
    "dense_pp2_tied": ("dense", {"pipeline": 2}),
    "moe_pp2_vpp2": ("moe", {"pipeline": 2, "virtual_pipeline": 2}),
    "moe_ep2_dp2": ("moe", {"expert": 2, "expert_tensor": 1}),
    "moe_tp2_etp2_sp": ("moe", {"tensor": 2, "sequence_parallel": True}),
    "dense_dp2": ("dense", {}),
}
FOUR_RANK_SCENARIOS = {
    "moe_tp2_ep2_etp2_sp": ("moe", {"tensor": 2, "expert": 2, "sequence_parallel": True}),
    "moe_tp2_pp2_ep2_sp": (
        "moe",
        {"tensor": 2, "pipeline": 2, "expert": 2, "expert_tensor": 1, "sequence_parallel": True},
    ),
}
WORKER_TIMEOUT_S = 240
CHECKPOINT_SCENARIO = "dense_dp2"  # saved by `two`, reloaded with DP=4 by `four`


def _config(kind: str, world_size: int, parallelism: dict):
    moe = kind == "moe"
    return tiny_run_config(
        moe=moe,
        world_size=world_size,
        max_tokens=MOE_MAX_TOKENS if moe else 64,
        **parallelism,
    )


def _batch(kind: str, step: int):
    return random_train_batch(
        seed=10 * step, lengths=MOE_LENGTHS if kind == "moe" else DENSE_LENGTHS
    )


def _modules(trainer: PolicyTrainer) -> list[torch.nn.Module]:
    return [chunk.module for chunk in trainer.chunks]


def _sharded_parameters(trainer: PolicyTrainer):
    """(ShardedTensor, parameter, is main replica) for every parameter, in model order."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    params = {p.data_ptr(): p for m in _modules(trainer) for p in m.parameters()}
    for module in _modules(trainer):
        for sharded in nested_values(module.sharded_state_dict()):
            if not isinstance(sharded, ShardedTensor) or sharded.data.data_ptr() not in params:
                continue
            replica = sharded.replica_id
            replicas = replica if isinstance(replica, tuple) else (replica,)
            yield sharded, params[sharded.data.data_ptr()], all(r == 0 for r in replicas)


def _reduced_grad(trainer: PolicyTrainer, param: torch.nn.Parameter) -> torch.Tensor:
    """The DP-reduced gradient of `param`; the distributed optimizer's shards are combined."""
    from megatron.core import parallel_state

    grad = param.main_grad.detach().clone()
    if not trainer.config.parallelism.distributed_optimizer:
        return grad
    owned_part = torch.zeros(grad.numel())
    for inner in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        if param in inner.model_param_gbuf_map:  # only params overlapping this rank's shard
            owned = inner._get_model_param_range_map(param)["param"]
            owned_part[owned.start : owned.end] = grad.view(-1)[owned.start : owned.end]
    is_expert = not getattr(param, "allreduce", True)
    group = (
        parallel_state.get_expert_data_parallel_group()
        if is_expert
        else parallel_state.get_data_parallel_group()
    )
    dist.all_reduce(owned_part, group=group)
    return owned_part.view_as(grad)


def _gather_full(trainer: PolicyTrainer, what: str) -> dict[str, torch.Tensor]:
    """Full-shape parameters or gradients by checkpoint key, on global rank 0 ({} elsewhere)."""
    pieces = []
    for sharded, param, is_main in _sharded_parameters(trainer):
        value = _reduced_grad(trainer, param) if what == "grads" else param.detach().clone()
        if is_main:
            pieces.append((sharded.key, sharded.global_shape, sharded.global_offset, value))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pieces)
    if dist.get_rank() != 0:
        return {}
    full: dict[str, torch.Tensor] = {}
    for key, shape, offset, value in (piece for rank in gathered for piece in rank):
        target = full.setdefault(key, torch.full(shape, math.nan))
        local_shape = (1,) * (len(shape) - value.dim()) + tuple(value.shape)
        index = tuple(slice(o, o + n) for o, n in zip(offset, local_shape, strict=True))
        target[index] = value.reshape(local_shape)
    return full


def _save_initial_model(trainer: PolicyTrainer, directory: Path) -> None:
    from megatron.core import dist_checkpointing

    directory.mkdir(parents=True)
    (module,) = _modules(trainer)
    dist_checkpointing.save({"model": module.sharded_state_dict()}, str(directory))


def _load_initial_model(trainer: PolicyTrainer, directory: Path) -> None:
    from megatron.core import dist_checkpointing

    modules = _modules(trainer)
    state = {f"model{i}": module.sharded_state_dict() for i, module in enumerate(modules)}
    loaded = dist_checkpointing.load(state, str(directory))
    for index, module in enumerate(modules):
        module.load_state_dict(loaded[f"model{index}"])


def _timed_step(trainer: PolicyTrainer, batch) -> tuple[object, float]:
    dist.barrier()
    start = time.perf_counter()
    metrics = trainer.step(batch)
    return metrics, (time.perf_counter() - start) * 1e3


def _max_diff(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    if actual.keys() != expected.keys():
        raise AssertionError(f"keys differ: {sorted(actual.keys() ^ expected.keys())}")
    return max(float((actual[k] - expected[k]).abs().max()) for k in expected)


def _new_trainer(kind: str, world_size: int, parallelism: dict) -> PolicyTrainer:
    """A trainer in a freshly initialised model-parallel layout."""
    from megatron.core import parallel_state

    config = _config(kind, world_size, parallelism)
    parallel_state.destroy_model_parallel()
    initialize_parallel(config.parallelism, DistributedEnv.from_environ(), seed=1)
    return PolicyTrainer(config)


def run_reference(out: Path) -> None:
    results = {}
    for kind in ("dense", "moe"):
        trainer = _new_trainer(kind, 1, {})
        _save_initial_model(trainer, out / f"init-{kind}")
        metrics, _ = _timed_step(trainer, _batch(kind, 1))
        grads, params = _gather_full(trainer, "grads"), _gather_full(trainer, "params")
        metrics2, step_ms = _timed_step(trainer, _batch(kind, 2))
        results[kind] = {
            "loss1": metrics.loss,
            "grad_norm1": metrics.grad_norm,
            "grads1": grads,
            "params1": params,
            "loss2": metrics2.loss,
            "params2": _gather_full(trainer, "params"),
            "step_ms": step_ms,
            "padding_fraction": metrics.padding_fraction,
        }
    torch.save(results, out / "reference.pt")


def _compare_step1(trainer, kind: str, reference: dict) -> dict:
    metrics, first_ms = _timed_step(trainer, _batch(kind, 1))
    grads, params = _gather_full(trainer, "grads"), _gather_full(trainer, "params")
    report = {"first_step_ms": first_ms, "padding_fraction": metrics.padding_fraction}
    if dist.get_rank() == 0:
        report.update(
            loss=abs(metrics.loss - reference["loss1"]),
            grad_norm=abs(metrics.grad_norm - reference["grad_norm1"]),
            grads=_max_diff(grads, reference["grads1"]),
            params=_max_diff(params, reference["params1"]),
        )
    return report


def _compare_step2(trainer, kind: str, reference: dict, report: dict, key: str) -> None:
    metrics, step_ms = _timed_step(trainer, _batch(kind, 2))
    params = _gather_full(trainer, "params")
    report[f"{key}_step_ms"] = step_ms
    if dist.get_rank() == 0:
        report[f"{key}_loss2"] = abs(metrics.loss - reference["loss2"])
        report[f"{key}_params2"] = _max_diff(params, reference["params2"])


def _adam_steps(trainer: PolicyTrainer) -> dict[str, object]:
    """How many Adam states this rank has, how many distinct `step` tensors, and their values."""
    states = [
        state
        for inner in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
        for state in inner.optimizer.state.values()
    ]
    return {
        "states": len(states),
        "step_tensors": len({id(state["step"]) for state in states}),
        "step_values": sorted({float(state["step"]) for state in states}),
    }


def run_layouts(out: Path, scenarios: dict, world_size: int, phase: str) -> None:
    reference = torch.load(out / "reference.pt", weights_only=False)
    reports = {}
    for name, (kind, parallelism) in scenarios.items():
        trainer = _new_trainer(kind, world_size, parallelism)
        _load_initial_model(trainer, out / f"init-{kind}")
        report = _compare_step1(trainer, kind, reference[kind])
        checkpoint = out / f"ckpt-{name}"
        save_checkpoint(trainer, checkpoint)
        _compare_step2(trainer, kind, reference[kind], report, "continued")
        resumed = PolicyTrainer(_config(kind, world_size, parallelism))
        load_checkpoint(resumed, checkpoint)
        _compare_step2(resumed, kind, reference[kind], report, "resumed")
        report["adam"] = _adam_steps(resumed)
        reports[name] = report
    if phase == "four":
        trainer = _new_trainer("dense", world_size, {})
        load_checkpoint(trainer, out / f"ckpt-{CHECKPOINT_SCENARIO}")
        report = {}
        _compare_step2(trainer, "dense", reference["dense"], report, "resumed")
        reports["dense_dp2_checkpoint_on_dp4"] = report
    if dist.get_rank() == 0:
        (out / f"{phase}.json").write_text(json.dumps(reports, indent=1))


def main() -> None:
    warnings.filterwarnings("ignore")
    faulthandler.dump_traceback_later(WORKER_TIMEOUT_S, exit=True)  # a hang fails, not blocks
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=("reference", "two", "four"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    env = DistributedEnv.from_environ()
    initialize_parallel(_config("dense", env.world_size, {}).parallelism, env, seed=1)
    if args.phase == "reference":
        run_reference(args.out)
    else:
        scenarios = TWO_RANK_SCENARIOS if args.phase == "two" else FOUR_RANK_SCENARIOS
        run_layouts(args.out, scenarios, env.world_size, args.phase)
    from megatron_dapo.mcore.parallel import destroy_parallel

    destroy_parallel()


# dist_checkpointing's writer spawns processes that re-import this module.
if __name__ == "__main__":
    main()
