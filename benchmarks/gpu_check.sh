#!/usr/bin/env bash
# One command for a lent GPU machine (H200: Python 3.12, torch 2.11+cu130, nvcc 13.0, no network):
# builds embedops for sm_90, runs the CUDA tests and the CUDA benchmarks, and writes a log and
# JSON under $OUT (default ./gpu-out). Meant to finish within 8 minutes. With GPU_CHECK_SANITIZE=1
# it also runs compute-sanitizer (memcheck, racecheck) over the CUDA tests (up to 5 more minutes:
# give it its own call).
#   bash benchmarks/gpu_check.sh
# Each family adds its CUDA tests (they are selected by the "cuda" in their test ids) and its
# bench family (see BENCH_FAMILIES) here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SITE=/tmp/embedops-site
export PYTHONUNBUFFERED=1
STAMP=$(date -u +%Y-%m-%d)
BENCH_FAMILIES="embedding matryoshka attention"
status=0

step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
{
  step "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

  step "build (sm_90)"
  rm -rf "$SITE"
  EMBEDOPS_CUDA=ON timeout 300 python3 -m pip install --no-build-isolation --no-deps --no-index --target "$SITE" \
      -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 -C build-dir=build/gpu-check . || { echo "BUILD FAILED"; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  python3 -m embedops info

  step "CUDA tests"
  timeout 240 python3 -m pytest tests -q -k cuda -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml" || status=1

  if [ "${GPU_CHECK_SANITIZE:-0}" = 1 ] && command -v compute-sanitizer >/dev/null 2>&1; then
    # (tests/test_large.py is left out here: tens of GB of device buffers per test under memcheck)
    step "compute-sanitizer (memcheck, racecheck) over the CUDA op tests, one op family at a time"
    for tool in memcheck racecheck; do
      timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 3 --target-processes all \
          python3 -m pytest tests -q -x -p no:cacheprovider -k "cuda and not compile and not property and not test_large" \
          > "$OUT/sanitizer_$tool.log" 2>&1
      rc=$?
      echo "$tool: rc=$rc (log: sanitizer_$tool.log; 124 = ran out of its 150 s)"; tail -3 "$OUT/sanitizer_$tool.log"
      [ "$rc" = 0 ] || [ "$rc" = 124 ] || status=1
    done
  else
    echo "(compute-sanitizer skipped: set GPU_CHECK_SANITIZE=1, and have it on the PATH)"
  fi

  step "CUDA benchmarks"
  # shellcheck disable=SC2086
  timeout 240 python3 -m embedops.bench $BENCH_FAMILIES --device cuda --quick \
      --json "$OUT/bench_cuda_${STAMP}.json" || status=1
  step "done (status $status)"
  exit "$status"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
