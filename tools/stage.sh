#!/usr/bin/env bash
# Dev helper: stage a build dir's extension with the Python sources for PYTHONPATH runs.
#   tools/stage.sh BUILD_DIR STAGE_DIR   ->   PYTHONPATH=STAGE_DIR python -m pytest tests
set -euo pipefail
build="$1" stage="$2"
rm -rf "$stage/embedops"
mkdir -p "$stage"
cp -r python/embedops "$stage/"
rm -f "$stage"/embedops/_C*.so "$stage/embedops/_build_config.py"
cp "$build"/_C*.so "$stage/embedops/"
cp "$build/_build_config.py" "$stage/embedops/"
