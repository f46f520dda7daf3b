#!/usr/bin/env bash
# Every GPU benchmark of the speed issue, at most ~6 minutes on one H200: Markdown + JSON into OUT_DIR.
#   bash benchmarks/gpu_suite.sh OUT_DIR            # needs CUDA, torch and transformers (runs from source)
#   bash benchmarks/gpu_suite.sh OUT_DIR --smoke    # tiny CPU dry run of the whole pipeline
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu_suite.sh OUT_DIR [--smoke]}
shift
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
py=${PYTHON:-$(command -v python3 || command -v python)}
exec "$py" "$here/gpu_suite.py" --out "$out" "$@"
