#!/usr/bin/env bash
# Submit launch/slurm/dapo.sbatch for a run config: --nodes = launch.nnodes +
# launch.rollout_nodes, --partition, --account, --time from launch.slurm_*, and with
# launch.slurm_gpus --gpus-per-node = launch.nproc_per_node (each overridable by its DAPO_*
# variable, see ../launch_env.py). Arguments before `--` go to sbatch; the dotted
# overrides after it go to the run (the launch settings above are read with them applied).
#
#   DAPO_CONFIG=configs/run.yaml launch/slurm/submit.sh [sbatch option ...] [-- key=value ...]
set -euo pipefail
# shellcheck source=../env.sh
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"
[[ -n ${DAPO_CONFIG:-} ]] || dapo_die "set DAPO_CONFIG to the run config"

sbatch_options=()
while (($# > 0)) && [[ $1 != -- ]]; do
  sbatch_options+=("$1")
  shift
done
(($# == 0)) || shift # the `--`
dapo_load_config "$@"

args=(--nodes=$((DAPO_NNODES + DAPO_ROLLOUT_NODES)) --time="$DAPO_SLURM_TIME")
[[ -z $DAPO_SLURM_PARTITION ]] || args+=(--partition="$DAPO_SLURM_PARTITION")
[[ -z $DAPO_SLURM_ACCOUNT ]] || args+=(--account="$DAPO_SLURM_ACCOUNT")
[[ -z $DAPO_SLURM_GPUS_PER_NODE ]] || args+=(--gpus-per-node="$DAPO_SLURM_GPUS_PER_NODE")
exec sbatch "${args[@]}" "${sbatch_options[@]}" "$DAPO_ROOT/launch/slurm/dapo.sbatch" "$@"
