#!/usr/bin/env bash
# The first run of the GPU path on a lent device: one script, at most ~8 minutes on one H100, PASS/FAIL lines,
# benchmark/results/gpu_check.md written. Needs torch + triton + this repository (no install, no network);
# with the gpu profile's packages (sglang, flashinfer) it also serves the default model briefly with graphs on.
#
#   bash benchmark/gpu_first_run.sh              # on the device
#   bash benchmark/gpu_first_run.sh --dry-run    # here: the same steps at tiny sizes, TRITON_INTERPRET=1 (make test)
#
# Steps: 1 the platform (a GPU that torch can use, versions); 2 benchmark/gpu_check.py (the shipping decode and
# prefill objects against the CPU serving path for the default and the uncalibrated selector, host syncs, a real
# CUDA-graph capture replayed at growing lengths under set_sync_debug_mode("error"), recompiles, per-stage timings
# at 8k/32k/128k against the fused dense kernel, torch SDPA and FlashInfer when importable, bytes-per-step bounds);
# 3 a tiny end-to-end server (when sglang is importable and a model is at hand).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
export PYTHONPATH="$PWD/python:$PWD/benchmark${PYTHONPATH:+:$PYTHONPATH}"
failed=0

result() {   # result NAME STATUS DETAIL
  echo "[$2] $1 ${3:-}"
  [[ "$2" == FAIL ]] && failed=$((failed + 1))
  return 0
}

# 1. platform: the device's torch must see the GPU (else the launcher's own error line says why)
platform=$($PY - "$DRY" <<'EOF' 2>&1
import sys
import torch, triton
from sglang_shplb.sglang_adapter.platform_check import cuda_problem, cuda_usable
dry = sys.argv[1] == "1"
ok, said = cuda_usable()
name = torch.cuda.get_device_name() if ok else "no GPU"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, {name}")
problem = cuda_problem()
if problem:
    print("error:", problem); sys.exit(1)
if not ok and not dry:
    print("error: torch sees no GPU:", said or "torch.cuda.is_available() is False"); sys.exit(1)
EOF
)
if [[ $? -eq 0 ]]; then result "platform" PASS "$platform"; else result "platform" FAIL "$platform"; fi

# 2. the shipping GPU objects (correctness, graphs, syncs, recompiles, timings)
OUT=${GPU_CHECK_OUT:-benchmark/results/gpu_check.md}
if [[ $DRY -eq 1 ]]; then
  export TRITON_INTERPRET=1
  OUT=${GPU_CHECK_OUT:-/tmp/gpu_check_dry.md}
  timeout 900 $PY benchmark/gpu_check.py --dry-run --out "$OUT" > /tmp/gpu_first_run_check.log 2>&1
else
  timeout 420 $PY benchmark/gpu_check.py --time-limit 300 --out "$OUT" > /tmp/gpu_first_run_check.log 2>&1
fi
rc=$?
grep -E '^\[(PASS|FAIL)\]' /tmp/gpu_first_run_check.log
if [[ $rc -eq 0 ]]; then result "gpu_check.py" PASS "(table: $OUT)"
else result "gpu_check.py" FAIL "exit $rc; last lines:"; tail -20 /tmp/gpu_first_run_check.log; fi

# 3. a tiny end-to-end server with decode CUDA graphs on (device with the gpu profile's packages and a model)
if [[ $DRY -eq 1 ]]; then
  result "end-to-end server" SKIP "(dry run: make test serves the real model on CPU)"
elif ! $PY -c "import sglang" 2>/dev/null; then
  result "end-to-end server" SKIP "(sglang not installed: the gpu profile's packages are not on this device)"
elif [[ -z "${SHPLB_MODEL:-}" ]]; then
  result "end-to-end server" SKIP "(set SHPLB_MODEL to a checkpoint directory: the device has no network)"
else
  log=/tmp/gpu_first_run_server.log
  $PY -m sglang_shplb.launch_server --model-path "$SHPLB_MODEL" --shplb-uniform-budget 0.1 --port 31777 > $log 2>&1 &
  pid=$!
  ok=0
  for _ in $(seq 1 120); do
    if curl -sf http://127.0.0.1:31777/v1/completions -H 'Content-Type: application/json' \
        -d '{"model":"default","prompt":"The capital of France is","max_tokens":8,"temperature":0}' > /tmp/gpu_first_run_answer.json; then
      ok=1; break
    fi
    kill -0 $pid 2>/dev/null || break
    sleep 2
  done
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
  if [[ $ok -eq 1 ]] && grep -q "decode CUDA graphs on" $log; then
    result "end-to-end server" PASS "$(cat /tmp/gpu_first_run_answer.json | head -c 300)"
  else
    result "end-to-end server" FAIL "see $log:"; tail -20 $log
  fi
fi

if [[ $failed -eq 0 ]]; then echo "[PASS] first run: all checks"; exit 0; fi
echo "[FAIL] first run: $failed step(s) failed"
exit 1
