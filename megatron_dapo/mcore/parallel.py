"""Process group and Megatron-Core model-parallel state from a torchrun or SLURM environment.

    env = DistributedEnv.from_environ()          # RANK/WORLD_SIZE/... or SLURM_PROCID/...
    initialize_parallel(config.parallelism, env, seed=config.training.seed)
    ...
    destroy_parallel()

Data parallelism is what the world size leaves after TP x PP (dense) and EP x ETP x PP (experts).
On a machine without CUDA the CPU patches are applied and the backend is gloo.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_dapo.config.schema import ParallelismConfig
from megatron_dapo.mcore.cpu_patches import apply_cpu_patches


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in the job.

    Attributes:
        rank: global rank in [0, world_size).
        world_size: number of processes.
        local_rank: rank on this node (the GPU index on GPU nodes).
        master_addr, master_port: rendezvous of the default process group.
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> DistributedEnv:
        """Read torchrun's variables, else SLURM's (srun), else a single local process.

        torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. SLURM (srun without
        torchrun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the sbatch script exports
        MASTER_ADDR/MASTER_PORT (defaults 127.0.0.1:29500, right for one node only).
        """
        env = os.environ if environ is None else environ
        if "RANK" in env:
            rank, world, local = env["RANK"], env["WORLD_SIZE"], env.get("LOCAL_RANK", "0")
        elif "SLURM_PROCID" in env:
            rank, world, local = env["SLURM_PROCID"], env["SLURM_NTASKS"], env["SLURM_LOCALID"]
        else:
            rank, world, local = "0", "1", "0"
        return cls(
            rank=int(rank),
            world_size=int(world),
            local_rank=int(local),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
        )


def model_device() -> torch.device:
    """The device of this rank's model: its batches and every tensor it hands a collective live
    here (NCCL accepts CUDA tensors only). The local rank's GPU (`initialize_parallel` made it
    current) on GPU nodes, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_backend(parallelism: ParallelismConfig) -> str:
    """`parallelism.backend`, with `auto` meaning NCCL when CUDA is available, else gloo."""
    if parallelism.backend != "auto":
        return parallelism.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize_parallel(
    parallelism: ParallelismConfig,
    env: DistributedEnv,
    seed: int,
    timeout: timedelta = timedelta(minutes=10),
) -> None:
    """Start the default process group and Megatron-Core's TP/PP/VPP/EP/ETP/DP groups, then seed.

    Seeding follows Megatron: the default generator gets `seed + 100 * pp_rank` and the
    model-parallel RNG tracker gets distinct streams per TP rank (CUDA generators on GPU, the
    CPU generator otherwise), so dropout and TP-sharded initialisation are reproducible.

    Raises:
        ValueError: the world size does not fit the layout.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    apply_cpu_patches()
    backend = resolve_backend(parallelism)
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )
    dense = parallelism.tensor * parallelism.pipeline
    if env.world_size % dense:
        raise ValueError(
            f"world size {env.world_size} is not a multiple of tensor x pipeline = {dense}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallelism.tensor,
        pipeline_model_parallel_size=parallelism.pipeline,
        virtual_pipeline_model_parallel_size=parallelism.virtual_pipeline,
        expert_model_parallel_size=parallelism.expert,
        expert_tensor_parallel_size=parallelism.expert_tensor,
        distributed_timeout_minutes=int(timeout.total_seconds() // 60),
    )
    torch.manual_seed(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down Megatron-Core's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
