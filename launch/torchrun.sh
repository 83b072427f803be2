#!/usr/bin/env bash
# Start this node's trainer ranks with torchrun: a single node, or one of DAPO_NNODES nodes that
# meet in a c10d rendezvous at DAPO_MASTER_ADDR:DAPO_MASTER_PORT (run it once on every node;
# node ranks are assigned by the rendezvous).
#
#   DAPO_CONFIG=configs/run.yaml launch/torchrun.sh [dotted.key=value ...]
#
# Each setting comes from the environment, else the run config (launch_env.py), else a default:
#   DAPO_NNODES          launch.nnodes           1      trainer nodes
#   DAPO_NPROC_PER_NODE  launch.nproc_per_node   1      ranks on this node
#   DAPO_MASTER_ADDR     launch.master_addr      127.0.0.1  rendezvous host (first trainer node)
#   DAPO_MASTER_PORT     launch.master_port      29500  rendezvous port
#   DAPO_RDZV_ID         $SLURM_JOB_ID, else megatron-dapo  rendezvous id, equal on all nodes
#   DAPO_MAX_RESTARTS    0                       torchrun restarts of the worker group
#   DAPO_NODE_NAME       $SLURMD_NODENAME, else `hostname -s`  names this node's log files
#   DAPO_LOG_DIR         logs                    trainer-<node>.log (this node's torchrun output)
#                                                and ranks-<node>/ (torchrun's per-rank logs)
#   DAPO_TRAIN_CMD       -m megatron_dapo.cli train $DAPO_CONFIG
#                        what each rank runs: a script or `-m module`, then its arguments
#                        (split on whitespace, no quoting); the arguments of this script are
#                        appended to it.
#   DAPO_DRY_RUN         1: print the torchrun command line instead of running it
# DAPO_ROOT, DAPO_PYTHON and DAPO_CONFIG: see env.sh. The overrides apply to the launch settings
# read from the config as well as to the trainer.
set -euo pipefail
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
dapo_load_config "$@"

if [[ -n ${DAPO_TRAIN_CMD:-} ]]; then
  read -r -a train <<<"$DAPO_TRAIN_CMD"
elif [[ -n ${DAPO_CONFIG:-} ]]; then
  train=(-m megatron_dapo.cli train "$DAPO_CONFIG")
else
  dapo_die "set DAPO_CONFIG (the run config) or DAPO_TRAIN_CMD (the command each rank runs)"
fi

node=${DAPO_NODE_NAME:-${SLURMD_NODENAME:-$(hostname -s)}}
log_dir=${DAPO_LOG_DIR:-logs}
rdzv_id=${DAPO_RDZV_ID:-${SLURM_JOB_ID:-megatron-dapo}}
endpoint=${DAPO_MASTER_ADDR:-127.0.0.1}:${DAPO_MASTER_PORT:-29500}
command=("$DAPO_PYTHON" -m torch.distributed.run
  --nnodes "${DAPO_NNODES:-1}"
  --nproc-per-node "${DAPO_NPROC_PER_NODE:-1}"
  --rdzv-backend c10d
  --rdzv-endpoint "$endpoint"
  --rdzv-id "$rdzv_id"
  --max-restarts "${DAPO_MAX_RESTARTS:-0}"
  --log-dir "$log_dir/ranks-$node"
  --tee 3
  "${train[@]}" "$@")
[[ ${DAPO_DRY_RUN:-0} != 1 ]] || dapo_exec "${command[@]}"
mkdir -p "$log_dir/ranks-$node"

{
  echo "[torchrun.sh] node $node: ${DAPO_NNODES:-1} node(s) x ${DAPO_NPROC_PER_NODE:-1} rank(s)," \
    "c10d rendezvous $rdzv_id at $endpoint"
  echo "[torchrun.sh] command: ${train[*]} $*"
  "${command[@]}"
} 2>&1 | tee -a "$log_dir/trainer-$node.log"
