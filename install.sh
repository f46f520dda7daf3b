#!/usr/bin/env bash
# Install competesmoe into ./.venv.  Usage: bash install.sh [EXTRAS]   (e.g. "test", "test,eval")
# Where the environment has no torch yet, the CPU build of PyTorch is installed first, so that pip never
# pulls a multi-GB CUDA build by accident. GPU users: install the torch build you want into .venv first.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q "torch==2.13.0"
fi
spec="."
[ -n "${1:-}" ] && spec=".[${1}]"
"$VPY" -m pip install -q -e "$spec"
