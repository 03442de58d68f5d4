#!/usr/bin/env bash
# One call on a lent GPU (the `device` tool's `run`), prepared ahead so that a session's 15 device minutes go to
# measuring. Usage there:  bash bench/gpu_session.sh [BUDGET_SECONDS]   (default 480; give run a timeout of ~560)
#
# Steps, each with its own time limit, logs under $OUT (the tool brings $OUT back):
#   0  the machine: nvidia-smi, torch / triton versions (the image's python3, not this project's pins)
#   1  build driftscope in place with the image's python3 (--no-deps: nothing can be fetched there)
#   2  ../shared/tools/gpu_check.py with DRIFTSCOPE_VOCAB_PATH=panel, then =fused (exactness at the paper's shapes,
#      timings against the two bf16 cuBLAS GEMMs; the Triton cache is kept, so the second run compiles less)
#   3  the gpu-marked tests, and the Triton kernel tests on the real device (the CPU runs them interpreted)
#   4  the GPU benchmarks: bench/test_bench_vocab_panel.py, bench/test_bench_cov_update.py
# gpu_check.py lives in ../shared/tools; if the device's copy of the tree lacks ../shared, copy it to shared/tools/
# in the checkout first (untracked files that git does not ignore travel with the tree).
# A step that would start past the budget is skipped (and says so). The table printed last is what to copy into
# bench/RESULTS.md with the card's name; the JSON files under $OUT hold every number.
set -u
BUDGET=${1:-480}
OUT=${OUT:-/tmp/driftscope-gpu}
mkdir -p "$OUT"
START=$(date +%s)
PY=${PY:-python3}
DRY=${DRY:-}  # DRY=1 PY=.venv/bin/python: a rehearsal on a CPU machine (gpu_check --dry-cpu, no build)
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="$OUT/triton-cache"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

left() { echo $((BUDGET - ($(date +%s) - START))); }

step() {  # step NAME LIMIT_SECONDS COMMAND...: runs it with a limit, logs to $OUT/NAME.log, records the outcome
  local name=$1 limit=$2
  shift 2
  if [ "$(left)" -lt 20 ]; then
    printf '%-22s SKIPPED (budget spent)\n' "$name" >> "$SUMMARY"
    return
  fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-22s rc=%-4s %4ss  %s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" \
    "$(grep -E 'passed|failed|skipped|PASS|FAIL' "$OUT/$name.log" | tail -1 | cut -c1-90)" >> "$SUMMARY"
  echo "$name done (rc=$rc)"
}

GPU_CHECK=../shared/tools/gpu_check.py
[ -f "$GPU_CHECK" ] || GPU_CHECK=shared/tools/gpu_check.py

step machine 30 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, \
torch.version.cuda, torch.cuda.get_device_name(0))'"
[ -z "$DRY" ] && step build 180 $PY -m pip install --no-deps --no-build-isolation -e .
CHECK="$PY $GPU_CHECK${DRY:+ --dry-cpu}"
step gpu_check_panel 200 env DRIFTSCOPE_VOCAB_PATH=panel OUT="$OUT/panel" bash -c "mkdir -p \$OUT && $CHECK"
step gpu_check_fused 200 env DRIFTSCOPE_VOCAB_PATH=fused OUT="$OUT/fused" bash -c "mkdir -p \$OUT && $CHECK"
step tests_gpu 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests
step tests_kernels 150 $PY -m pytest -q -p no:cacheprovider -x tests/kernels -k "triton or panel or fused or cov"
step bench_gpu 150 $PY -m pytest -q -p no:cacheprovider bench/test_bench_vocab_panel.py \
  bench/test_bench_cov_update.py --benchmark-only --benchmark-json="$OUT/bench_gpu.json"

echo "== driftscope GPU session, $(( $(date +%s) - START )) s of $BUDGET; logs and JSON in $OUT"
cat "$SUMMARY"
grep -h "SUMMARY" "$OUT"/gpu_check_*.log 2>/dev/null
