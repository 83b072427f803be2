# shellcheck shell=bash disable=SC2034  # the arrays set here are read by the sourcing script
# Command lines of the rollout fleet's processes, for slurm/dapo.sbatch and
# container_entrypoint.sh (sourced after env.sh). Each function sets one global array.
#
#   DAPO_SGLANG_MODEL   model.hf_checkpoint     the servers' --model-path
#   DAPO_SGLANG_ARGS    rollout.server_args     extra server flags (split on whitespace)
#   DAPO_FLEET_TIMEOUT  1800                    seconds the router waits for its workers

# dapo_server_command HOST PORT [flag ...]
# Set `server_command` to one `sglang.launch_server` on HOST:PORT with DAPO_SGLANG_ARGS, then
# the given flags.
dapo_server_command() {
  local host=$1 port=$2
  local -a extra
  shift 2
  [[ -n ${DAPO_SGLANG_MODEL:-} ]] ||
    dapo_die "the SGLang fleet needs a model: model.hf_checkpoint in DAPO_CONFIG, or DAPO_SGLANG_MODEL"
  read -r -a extra <<<"${DAPO_SGLANG_ARGS:-}"
  server_command=("$DAPO_PYTHON" -m sglang.launch_server --model-path "$DAPO_SGLANG_MODEL"
    --host "$host" --port "$port" "${extra[@]}" "$@")
}

# dapo_router_command HOST PORT WORKER_URL [WORKER_URL ...]
# Set `router_command` to an `sglang-router` on HOST:PORT balancing round-robin over the workers.
# It may start before them: it registers each one once it answers, checking every 2 s for up to
# DAPO_FLEET_TIMEOUT seconds (default 1800).
dapo_router_command() {
  local host=$1 port=$2
  shift 2
  (($# > 0)) || dapo_die "sglang-router needs at least one worker URL"
  router_command=("$DAPO_PYTHON" -m sglang_router.launch_router --host "$host" --port "$port"
    --policy round_robin --worker-startup-timeout-secs "${DAPO_FLEET_TIMEOUT:-1800}"
    --worker-startup-check-interval 2 --worker-urls "$@")
}
