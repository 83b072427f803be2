#!/usr/bin/env bash
# The GPU path in one command, for a machine with one GPU and the trainer image's stack: prints
# PASS or FAIL per check and exits 1 if any failed. Without a CUDA device it stops after the
# first check (the others need one).
#
#   launch/gpu_smoke.sh [dotted.key=value ...]     overrides of configs/gpu-smoke.yaml
#
# Checks: CUDA visible to torch; Transformer Engine importable; SGLang's CUDA kernels importable
# (sgl_kernel, flashinfer); an NCCL all-reduce of a CUDA tensor; the initial model written; a
# real SGLang server up on the GPU; `megatron-dapo train` (TE spec, bf16, NCCL) finishing its
# steps against it; the server at the trainer's last weight version; the step-1 mismatch KL of
# metrics.jsonl below DAPO_SMOKE_MAX_KL; then the same run colocated (rollout.placement=colocated:
# an embedded server beside the trainer on GPU 0 with torch_memory_saver, releasing its KV cache
# and weights while the trainer trains, weights synced as tensors over CUDA IPC) finishing its
# steps with its step-1 KL below the bound (garbage weights after the resume would not). Run from
# a writable directory: the runs and the logs go to runs/gpu-smoke/ there.
#
#   DAPO_SGLANG_PORT    30000   the server's port on 127.0.0.1
#   DAPO_FLEET_TIMEOUT  600     seconds the server may take to start
#   DAPO_SMOKE_MAX_KL   1e-3    bound on the step-1 KL(pi_rollout || pi_old): bf16 on both sides
set -uo pipefail # not -e: a failed check is reported, then the next one runs
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# shellcheck source=fleet.sh
source "$(dirname "${BASH_SOURCE[0]}")/fleet.sh"

config=$DAPO_ROOT/configs/gpu-smoke.yaml
port=${DAPO_SGLANG_PORT:-30000}
url=http://127.0.0.1:$port
overrides=("rollout.server_urls=[$url]" "$@")
logs=runs/gpu-smoke/logs
mkdir -p "$logs"
failures=0

# check NAME COMMAND [ARG ...]: run the command with its output in $logs/NAME.log; print PASS, or
# FAIL with the log's last line (the reason the check's code prints).
check() {
  local name=$1 log
  log=$logs/${1// /-}.log
  shift
  if "$@" >"$log" 2>&1; then
    echo "PASS  $name"
  else
    echo "FAIL  $name: $(tail -n 1 "$log") (log: $log)"
    failures=$((failures + 1))
    return 1
  fi
}

# py CODE [ARG ...]: Python code with the checkout and launch/ (launch_env.py) importable.
py() {
  PYTHONPATH="$DAPO_ROOT/launch:$PYTHONPATH" "$DAPO_PYTHON" -c "$@"
}

check "CUDA visible" py '
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device")
print(torch.cuda.get_device_name(0))' || {
  echo "the remaining checks need a GPU: stopping"
  exit 1
}
check "Transformer Engine importable" py 'import transformer_engine.pytorch'
check "SGLang kernels importable" py 'import sgl_kernel, flashinfer'
check "NCCL all-reduce of a CUDA tensor" py '
import os, torch, torch.distributed as dist
from pipeline.sglang_server import free_port
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
tensor = torch.full((1024,), 2.0, device="cuda")
dist.all_reduce(tensor)
torch.cuda.synchronize()
assert tensor.eq(2.0).all(), "wrong all-reduce result"
dist.destroy_process_group()'

DAPO_CONFIG=$config dapo_load_config "${overrides[@]}"
check "initial model written" "$DAPO_PYTHON" "$DAPO_ROOT/launch/initial_model.py" "$config" \
  "${overrides[@]}"

# The server: started here (and stopped on exit), sharing the GPU with the trainer.
dapo_server_command 127.0.0.1 "$port"
"${server_command[@]}" >"$logs/sglang.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null' EXIT
check "SGLang server starts on the GPU" "$DAPO_PYTHON" "$DAPO_ROOT/launch/wait_healthy.py" \
  --timeout "${DAPO_FLEET_TIMEOUT:-600}" --watch-pid "$server" "$url/health" || {
  echo "training needs the server: stopping (its log: $logs/sglang.log)"
  exit 1
}

check "training steps finish (TE, bf16, NCCL)" \
  "$DAPO_PYTHON" -m megatron_dapo.cli train "$config" "${overrides[@]}"

# What the run says: its config (overrides applied), the server's weight version, metrics.jsonl.
export SMOKE_CONFIG=$config SMOKE_URL=$url SMOKE_MAX_KL=${DAPO_SMOKE_MAX_KL:-1e-3}
check "server holds the last weight version" py '
import json, os, sys, urllib.request
from launch_env import config_from_argv
steps = config_from_argv("gpu_smoke.sh", [os.environ["SMOKE_CONFIG"], *sys.argv[1:]]).training.steps
with urllib.request.urlopen(os.environ["SMOKE_URL"] + "/model_info", timeout=30) as answer:
    version = json.load(answer)["weight_version"]
if version != str(steps):
    sys.exit(f"weight version {version!r}, expected {steps} after {steps} steps")
print(version)' "${overrides[@]}"
# step1_kl_below_bound [override ...]: the step-1 mismatch KL of the run's metrics.jsonl.
step1_kl_below_bound() {
  py '
import json, os, sys
from pathlib import Path
from launch_env import config_from_argv
config = config_from_argv("gpu_smoke.sh", [os.environ["SMOKE_CONFIG"], *sys.argv[1:]])
metrics = Path(config.checkpoint.dir).parent / "metrics.jsonl"
records = [json.loads(line) for line in metrics.read_text().splitlines()]
kl = next(r["rollout_mismatch_kl"] for r in records if r["step"] == 1)
bound = float(os.environ["SMOKE_MAX_KL"])
if not kl < bound:
    sys.exit(f"step-1 mismatch KL {kl:.3g} >= {bound:g}")
print(kl)' "$@"
}
check "step-1 mismatch KL below $SMOKE_MAX_KL" step1_kl_below_bound "${overrides[@]}"

# Colocated: the data plane starts its own server on the trainer's GPU (the one above is stopped).
kill "$server" 2>/dev/null
wait "$server" 2>/dev/null
colocated=("$@" rollout.mode=embedded "rollout.server_urls=[]" rollout.placement=colocated
  rollout.weight_sync=tensor "rollout.server_args=[--disable-cuda-graph]"
  checkpoint.dir=runs/gpu-smoke/colocated/checkpoints metrics.run_name=gpu-smoke-colocated)
check "colocated training steps finish (memory saver, tensor sync)" \
  "$DAPO_PYTHON" -m megatron_dapo.cli train "$config" "${colocated[@]}" &&
  check "colocated step-1 mismatch KL below $SMOKE_MAX_KL" step1_kl_below_bound "${colocated[@]}"

if ((failures > 0)); then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all checks passed"
