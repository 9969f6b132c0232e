#!/usr/bin/env bash
# Builds the CPU code with AddressSanitizer + UndefinedBehaviorSanitizer (no CUDA) and runs the
# test suite under it, once per CPU level in EMBEDOPS_SANITIZE_LEVELS (default: "default avx2";
# only those levels' kernels are compiled). Usage (in a venv with embedops' requirements):
#   [EMBEDOPS_SANITIZE_LEVELS="default avx2"] bash tools/sanitize.sh [pytest args...]   default: tests -q -x
# EMBEDOPS_SANITIZE_STEPS="build" only builds (and stages) the sanitized copy, "test" only runs the
# suite on the copy an earlier "build" left (CI builds in the background while other steps run);
# default: both. EMBEDOPS_SANITIZE_EMULATE_AVX512=1 with avx512 in the levels builds that level as
# the test build's AVX2 code of avx512 width (CMake EMBEDOPS_EMULATE_AVX512), which runs on any
# AVX2 CPU.
# Needs: torch, numpy, pytest, hypothesis, cmake, ninja, g++ (libasan/libubsan come with g++).
# Python itself is not instrumented, so leak checking is off (CPython and torch keep caches
# alive at exit); heap overflows, use-after-free and undefined behaviour in embedops abort the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
BUILD="${EMBEDOPS_SANITIZE_BUILD:-build/sanitize}"
STAGE="$BUILD-stage"
LEVELS="${EMBEDOPS_SANITIZE_LEVELS:-default avx2}"
STEPS="${EMBEDOPS_SANITIZE_STEPS:-build test}"
if [[ " $STEPS " == *" build "* ]]; then
  mkdir -p "$(dirname "$BUILD")"
  cmake -S . -B "$BUILD" -G Ninja -DPython_EXECUTABLE="$(command -v "$PY")" -DEMBEDOPS_CUDA=OFF \
        -DEMBEDOPS_CPU_CAPABILITIES="$(echo "$LEVELS" | tr ' ' ';')" \
        -DEMBEDOPS_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DEMBEDOPS_EMULATE_AVX512="$([ "${EMBEDOPS_SANITIZE_EMULATE_AVX512:-0}" = 1 ] && echo ON || echo OFF)" \
        > "$BUILD.configure.log" 2>&1 \
    || { cat "$BUILD.configure.log"; exit 1; }
  cmake --build "$BUILD"
  rm -rf "$STAGE" && mkdir -p "$STAGE"
  cp -r python/embedops "$STAGE/"
  cp "$BUILD"/_C*.so "$BUILD/_build_config.py" "$STAGE/embedops/"
fi
[[ " $STEPS " == *" test "* ]] || exit 0
[ -f "$STAGE/embedops/_build_config.py" ] || { echo "sanitize.sh: no sanitized build in $STAGE (run the build step first)"; exit 1; }
# An editable install of embedops in the same venv hooks sys.meta_path ahead of PYTHONPATH:
# drop that hook at start-up so the sanitized copy is the one imported.
cat > "$STAGE/sitecustomize.py" <<'PY'
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "embedops" not in repr(getattr(f, "known_source_files", ""))
                    and "ScikitBuildRedirectingFinder" not in type(f).__name__]
PY
ASAN_LIB="$(g++ -print-file-name=libasan.so)"
UBSAN_LIB="$(g++ -print-file-name=libubsan.so)"
export LD_PRELOAD="$ASAN_LIB $UBSAN_LIB"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1"
export EMBEDOPS_SANITIZER=asan,ubsan  # the RSS-growth test skips itself (ASan's quarantine)
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PYTHONPATH="$PWD/$STAGE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import embedops, sys; assert embedops.__file__.startswith('$PWD/$STAGE'), embedops.__file__; print('sanitized build:', embedops.__file__)"
if [ $# -eq 0 ]; then set -- tests -q -x; fi
# tests/test_cpu_levels.py runs every level itself (in subprocesses): once, with the first level
once=()
for level in $LEVELS; do
  echo "== sanitized test suite at CPU level $level"
  EMBEDOPS_CPU_CAPABILITY="$level" "$PY" -m pytest -p no:cacheprovider "$@" "${once[@]}"
  once=(--ignore=tests/test_cpu_levels.py)
done
