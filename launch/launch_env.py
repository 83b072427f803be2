"""Print a run config's launch settings as shell assignments, for the scripts in `launch/`.

    eval "$(python launch/launch_env.py configs/run.yaml [dotted.key=value ...])"

The overrides are applied as `megatron-dapo train` applies them. Each setting is printed as
`export NAME=value` (shell-quoted) only when the variable is not already set in the
environment, so an explicit environment variable always wins over the config. Printed settings
(config key -> variable):

    launch.nnodes              DAPO_NNODES            trainer nodes
    launch.nproc_per_node      DAPO_NPROC_PER_NODE    trainer ranks per node
    launch.master_addr         DAPO_MASTER_ADDR       rendezvous host
    launch.master_port         DAPO_MASTER_PORT       rendezvous port
    launch.rollout_nodes       DAPO_ROLLOUT_NODES     SLURM nodes for the SGLang fleet
    launch.slurm_partition     DAPO_SLURM_PARTITION   (empty when unset)
    launch.slurm_account       DAPO_SLURM_ACCOUNT     (empty when unset)
    launch.slurm_time          DAPO_SLURM_TIME        wall-clock limit, HH:MM:SS
    launch.slurm_gpus          DAPO_SLURM_GPUS_PER_NODE
                                                      `nproc_per_node` (empty when false)
    launch.network_interface   NCCL_SOCKET_IFNAME,    the NIC of NCCL's and Gloo's sockets
                               GLOO_SOCKET_IFNAME     (not printed when unset)
    launch.nccl_ib_hca         NCCL_IB_HCA            NCCL's InfiniBand adapters (not printed
                                                      when unset)
    model.hf_checkpoint        DAPO_SGLANG_MODEL      the fleet's --model-path (empty when unset)
    model.params_dtype,        DAPO_SGLANG_ARGS       `--dtype` of the policy, then the extra
    rollout.server_args                               `sglang.launch_server` flags
"""

from __future__ import annotations

import os
import shlex
import sys

from megatron_dapo.config.loading import ConfigError, load_config
from megatron_dapo.config.schema import RunConfig
from pipeline.sglang_server import sglang_dtype_args


def launch_settings(config: RunConfig) -> dict[str, str]:
    """The variables a run config defines, as strings (see the module docstring)."""
    launch = config.launch
    settings = {
        "DAPO_NNODES": str(launch.nnodes),
        "DAPO_NPROC_PER_NODE": str(launch.nproc_per_node),
        "DAPO_MASTER_ADDR": launch.master_addr,
        "DAPO_MASTER_PORT": str(launch.master_port),
        "DAPO_ROLLOUT_NODES": str(launch.rollout_nodes),
        "DAPO_SLURM_PARTITION": launch.slurm_partition or "",
        "DAPO_SLURM_ACCOUNT": launch.slurm_account or "",
        "DAPO_SLURM_TIME": launch.slurm_time,
        "DAPO_SLURM_GPUS_PER_NODE": str(launch.nproc_per_node) if launch.slurm_gpus else "",
        "DAPO_SGLANG_MODEL": config.model.hf_checkpoint or "",
        "DAPO_SGLANG_ARGS": shlex.join(
            (*sglang_dtype_args(config.model.params_dtype), *config.rollout.server_args)
        ),
    }
    # Unset, the libraries choose: an empty value would not mean that to them.
    if launch.network_interface is not None:
        settings["NCCL_SOCKET_IFNAME"] = settings["GLOO_SOCKET_IFNAME"] = launch.network_interface
    if launch.nccl_ib_hca is not None:
        settings["NCCL_IB_HCA"] = launch.nccl_ib_hca
    return settings


def config_from_argv(program: str, argv: list[str]) -> RunConfig:
    """The run config of a launch helper's `CONFIG [dotted.key=value ...]` arguments.

    Raises:
        SystemExit: code 2, after the usage or the config's errors on stderr.
    """
    if not argv:
        print(f"usage: {program} CONFIG [dotted.key=value ...]", file=sys.stderr)
        raise SystemExit(2)
    try:
        return load_config(argv[0], argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str]) -> int:
    config = config_from_argv("launch_env.py", argv)
    for name, value in launch_settings(config).items():
        if name not in os.environ:
            print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
