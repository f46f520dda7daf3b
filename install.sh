#!/usr/bin/env bash
# Install competesmoe into ./.venv.  Usage: bash install.sh [EXTRAS]   (e.g. "test", "test,eval")
# Where the environment has no torch yet, the CPU build of PyTorch is installed first, so that pip never
# pulls a multi-GB CUDA build by accident. GPU users: install the torch build you want into .venv first.
# Every other package is installed at the version pinned in constraints.txt (the set the tests passed
# with); COMPETESMOE_UNPINNED=1 resolves the newest versions the ranges in pyproject.toml allow instead
# (how constraints.txt is refreshed: docs/install.md).
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
pin=(-c constraints.txt)
[ "${COMPETESMOE_UNPINNED:-0}" = 1 ] && pin=()
"$VPY" -m pip install -q "${pin[@]}" -e "$spec"
# a pinned install must give the locked set (an environment that drifted would hide a broken fresh install)
[ "${COMPETESMOE_UNPINNED:-0}" = 1 ] || "$VPY" .ci/check_lock.py
