#!/usr/bin/env bash
# The container image's entrypoint: one role per container.
#
#   trainer [key=value ...]   this node's trainer ranks: ./torchrun.sh with the dotted overrides
#                             (needs DAPO_CONFIG; DAPO_NNODES, DAPO_MASTER_ADDR, ... for several
#                             nodes, see torchrun.sh)
#   fleet [server flag ...]   one SGLang server (`sglang.launch_server`) on
#                             DAPO_BIND_HOST:DAPO_SGLANG_PORT serving DAPO_SGLANG_MODEL, with
#                             DAPO_SGLANG_ARGS and then the given flags (see fleet.sh)
#   router WORKER_URL ...     `sglang-router` on DAPO_BIND_HOST:DAPO_ROUTER_PORT in front of the
#                             given SGLang servers
#   help                      this text
#
# Settings come from the environment, else from the run config DAPO_CONFIG (optional for the
# fleet: model.hf_checkpoint, rollout.server_args), else defaults: DAPO_BIND_HOST 0.0.0.0,
# DAPO_SGLANG_PORT 30000, DAPO_ROUTER_PORT 30001. DAPO_DRY_RUN=1 prints the role's command line
# instead of running it.
set -euo pipefail
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# shellcheck source=fleet.sh
source "$(dirname "${BASH_SOURCE[0]}")/fleet.sh"

usage() {
  sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
}

role=${1:-help}
(($# == 0)) || shift
case $role in
  trainer)
    exec bash "$DAPO_ROOT/launch/torchrun.sh" "$@"
    ;;
  fleet)
    # shellcheck disable=SC2119 # the role's arguments are server flags, not config overrides
    dapo_load_config
    dapo_server_command "${DAPO_BIND_HOST:-0.0.0.0}" "${DAPO_SGLANG_PORT:-30000}" "$@"
    dapo_exec "${server_command[@]}"
    ;;
  router)
    dapo_router_command "${DAPO_BIND_HOST:-0.0.0.0}" "${DAPO_ROUTER_PORT:-30001}" "$@"
    dapo_exec "${router_command[@]}"
    ;;
  help | -h | --help)
    usage
    ;;
  *)
    usage >&2
    dapo_die "unknown role '$role' (trainer, fleet, router or help)"
    ;;
esac
