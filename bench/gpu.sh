#!/usr/bin/env bash
# One-GPU benchmark (H100 / H200, <= 8 minutes): training tokens/s + MFU, ~1B FSDP + activation
# checkpointing, decode tokens/s + MBU at batch 1 and 32, compiled-vs-eager parity. Results in
# OUT/results.json and OUT/results.md.  Usage: bench/gpu.sh [OUT] [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/bench_gpu}"
shift || true
PY="${PYTHON:-.venv/bin/python}"
timeout 480 "$PY" bench/bench_gpu.py --out "$OUT" "$@"
