#!/usr/bin/env bash
# One command for a lent GPU machine (H200: Python 3.12, torch 2.11+cu130, nvcc 13.0, no network).
# Stages, smallest first, each under its own time limit, each writing what it found to $OUT as
# it goes (a run cut short still reports the stages it finished; $OUT/summary.txt has one line per
# stage):
#   build      pip install for sm_90 into a scratch site               <= 240 s
#   smoke      benchmarks/gpu_smoke.py: one small call per kernel family vs the CPU   <= 45 s
#   tests      the CUDA tests (pytest -k cuda)                          <= 150 s
#   bench      the CUDA benchmarks, --quick, JSON                       <= 120 s
#   sanitize   only with GPU_CHECK_SANITIZE=1 (give it its own call): compute-sanitizer memcheck
#              and racecheck over a short named list of small tests, one family at a time,
#              <= 90 s each; a timeout is a failure
# Worst case of a default run: ~9.5 minutes; typically ~5. Within 15 minutes of device time that
# leaves one rerun (or the sanitizer call).
#   bash benchmarks/gpu_check.sh             # on the GPU machine; $OUT defaults to ./gpu-out
#   bash benchmarks/gpu_check.sh --dry-run   # on any machine: checks the script itself (every
#                                            # pytest selection resolves to tests, every stage's
#                                            # command exists, the smoke script runs on the CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
SITE=/tmp/embedops-site
export PYTHONUNBUFFERED=1
STAMP=$(date -u +%Y-%m-%d)
BENCH_FAMILIES="embedding matryoshka attention"
PY="${PYTHON:-python3}"
# compute-sanitizer's list: small tests of the kernels the CUDA review marked first
SANITIZE_TESTS=(
  "tests/test_attention.py::test_tensor_core_forward_cuda"
  "tests/test_attention.py::test_small_lq_long_keys_split_kv"
  "tests/test_matryoshka.py::test_topk_odd_sizes"
  "tests/test_matryoshka.py::test_topk_nan_and_inf"
  "tests/test_embedding_bag.py::test_empty_bags_give_zeros_and_empty_batch"
  "tests/test_embedding_bag.py::test_fused_update_equals_dense_grad_plus_textbook_step"
)
status=0
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME LIMIT CMD...: runs CMD under `timeout LIMIT`, log in $OUT/NAME.log; a timeout (124)
# or any non-zero exit is a failure of the stage
stage() {
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== $name (limit ${limit}s, $(date -u +%H:%M:%S))"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -15 "$OUT/$name.log"
  if [ "$rc" = 124 ]; then
    note "$name: TIMEOUT after ${limit}s (a failure)"
    status=1
  elif [ "$rc" != 0 ]; then
    note "$name: FAILED rc=$rc in $((SECONDS - t0))s (log: $name.log)"
    status=1
  else
    note "$name: ok in $((SECONDS - t0))s"
  fi
  return "$rc"
}

dry_run() {
  local ok=1
  for cmd in "$PY" timeout; do
    command -v "$cmd" > /dev/null || { note "dry-run: missing command $cmd"; ok=0; }
  done
  for cmd in nvidia-smi compute-sanitizer; do
    command -v "$cmd" > /dev/null || note "dry-run: $cmd not here (needed on the GPU machine only)"
  done
  "$PY" -c "import embedops" || { note "dry-run: embedops does not import"; ok=0; }
  # every selection must collect at least one test (CUDA tests are collected, then skipped here)
  # (one collection serves both: the sanitizer's tests are node ids of the tests stage's selection)
  local n listed
  listed=$("$PY" -m pytest tests -q -k cuda --collect-only -p no:cacheprovider 2> /dev/null)
  n=$(echo "$listed" | grep -c "::")
  [ "$n" -gt 0 ] && note "dry-run: 'tests -k cuda' selects $n tests" || { note "dry-run: 'tests -k cuda' selects nothing"; ok=0; }
  for t in "${SANITIZE_TESTS[@]}"; do
    n=$(echo "$listed" | grep -c "^$t\[")
    [ "$n" -gt 0 ] && note "dry-run: $t (-k cuda): $n tests" || { note "dry-run: $t selects no test"; ok=0; }
  done
  "$PY" -c "
import sys, embedops.bench as b
missing = [f for f in sys.argv[1:] if not b.load_family(f)]
sys.exit(f'bench families that do not load: {missing}' if missing else 0)" $BENCH_FAMILIES \
    || { note "dry-run: a bench family does not load"; ok=0; }
  "$PY" benchmarks/gpu_smoke.py --device cpu --out "$OUT/smoke_cpu.txt" > "$OUT/smoke_cpu.log" 2>&1 \
    && note "dry-run: gpu_smoke.py runs (on the CPU against the CPU)" \
    || { tail -5 "$OUT/smoke_cpu.log"; note "dry-run: gpu_smoke.py fails on the CPU"; ok=0; }
  [ "$ok" = 1 ] && note "dry-run: ok" || { note "dry-run: FAILED"; return 1; }
}

{
  if [ "$DRY" = 1 ]; then
    dry_run
    exit $?
  fi
  echo "=== machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee "$OUT/device.txt"

  rm -rf "$SITE"
  stage build 240 env EMBEDOPS_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps --no-index \
      --target "$SITE" -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 -C build-dir=build/gpu-check . \
    || { note "build failed: nothing else runs"; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -m embedops info > "$OUT/build_info.txt" 2>&1

  stage smoke 45 "$PY" benchmarks/gpu_smoke.py --device cuda --out "$OUT/smoke.txt"
  stage tests 150 "$PY" -m pytest tests -q -k cuda -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml"
  # shellcheck disable=SC2086
  stage bench 120 "$PY" -m embedops.bench $BENCH_FAMILIES --device cuda --quick \
      --json "$OUT/bench_cuda_${STAMP}.json"

  if [ "${GPU_CHECK_SANITIZE:-0}" = 1 ]; then
    if command -v compute-sanitizer > /dev/null 2>&1; then
      for tool in memcheck racecheck; do
        for t in "${SANITIZE_TESTS[@]}"; do
          name="sanitize_${tool}_$(basename "${t##*::}")"
          stage "$name" 90 compute-sanitizer --tool "$tool" --error-exitcode 3 --target-processes all \
              "$PY" -m pytest "$t" -q -x -k cuda -p no:cacheprovider
        done
      done
    else
      note "sanitize: compute-sanitizer is not on the PATH"
      status=1
    fi
  fi
  note "done (status $status)"
  exit "$status"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
