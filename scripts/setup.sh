#!/usr/bin/env bash
# Create .venv with lmstack and its test dependencies. Installs the CPU build of torch first so that
# pip does not pull the multi-GB CUDA build; on a GPU machine, install your CUDA torch beforehand
# with LMSTACK_SKIP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY=.venv/bin/python
$PY -m pip install -q --upgrade pip >/dev/null
if [ -z "${LMSTACK_SKIP_TORCH:-}" ] && ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0
fi
$PY -m pip install -q -e ".[dev]"
echo "lmstack installed in .venv ($($PY -c 'import torch; print("torch", torch.__version__)'))"
