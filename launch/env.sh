# shellcheck shell=bash
# Shared set-up for the launch scripts (sourced, not run): the checkout, the Python, error exit,
# and `dapo_load_config`, which exports the run config's launch settings as DAPO_* variables
# (see launch_env.py). Variables that are already set in the environment win over the config.
#
#   DAPO_ROOT     the megatron-dapo checkout (default: the parent of this file's directory)
#   DAPO_PYTHON   the Python with torch and megatron-dapo (default: python3 on PATH)
#   DAPO_CONFIG   the run config YAML (optional here; the launchers say when they need it)

DAPO_ROOT=${DAPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
DAPO_PYTHON=${DAPO_PYTHON:-python3}
export DAPO_ROOT DAPO_PYTHON
export PYTHONPATH="$DAPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

dapo_die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 1
}

# dapo_load_config [dotted.key=value ...]
# Export the launch settings of DAPO_CONFIG with these overrides applied (the same overrides the
# trainer is given, so both read one configuration); does nothing when DAPO_CONFIG is unset.
dapo_load_config() {
  [[ -n ${DAPO_CONFIG:-} ]] || return 0
  local settings
  settings=$("$DAPO_PYTHON" "$DAPO_ROOT/launch/launch_env.py" "$DAPO_CONFIG" "$@") ||
    dapo_die "cannot read the launch settings of DAPO_CONFIG=$DAPO_CONFIG"
  eval "$settings"
}

# dapo_exec COMMAND [ARG ...]
# Replace this shell with the command; with DAPO_DRY_RUN=1, print it on one line (shell-quoted)
# and exit 0 instead.
dapo_exec() {
  if [[ ${DAPO_DRY_RUN:-0} == 1 ]]; then
    local line
    printf -v line '%q ' "$@"
    echo "${line% }"
    exit 0
  fi
  exec "$@"
}
