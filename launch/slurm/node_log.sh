#!/usr/bin/env bash
# Run a command with its stdout and stderr appended to $DAPO_LOG_DIR/<name>-<SLURM node>.log
# (srun's own `--output=%N` names files by host name, not by SLURM node name).
#
#   srun ... launch/slurm/node_log.sh sglang python -m sglang.launch_server ...
set -euo pipefail
name=$1
shift
exec "$@" >>"$DAPO_LOG_DIR/$name-${SLURMD_NODENAME:-$(hostname -s)}.log" 2>&1
