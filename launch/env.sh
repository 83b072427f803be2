# shellcheck shell=bash
# Shared set-up for the launch scripts (sourced, not run): the checkout, the Python, error exit,
# and the run config's launch settings as DAPO_* variables (see launch_env.py). Variables that
# are already set in the environment win over the config.
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

if [[ -n ${DAPO_CONFIG:-} ]]; then
  dapo_settings=$("$DAPO_PYTHON" "$DAPO_ROOT/launch/launch_env.py" "$DAPO_CONFIG") ||
    dapo_die "cannot read the launch settings of DAPO_CONFIG=$DAPO_CONFIG"
  eval "$dapo_settings"
  unset dapo_settings
fi
