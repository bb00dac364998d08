#!/usr/bin/env bash
# The GPU suite in one go (at most 8 minutes on one GPU): xllm's engine path vs naive HF generate at
# GLM-4-9B / ViT-g / Whisper-large-v3 shapes with random weights. Results: $OUT/gpu_suite.json and
# $OUT/gpu_suite.md ($OUT defaults to ./bench-out).
#
#   bench/gpu_suite.sh                  # full sizes, bf16, needs a CUDA GPU
#   bench/gpu_suite.sh --tiny           # toy sizes on the CPU (what tests/bench runs)
#
# Python: $PYTHON, else this checkout's .venv, else python3. xllm need not be installed: the driver
# imports it from the checkout. nf4 needs bitsandbytes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export OUT="${OUT:-./bench-out}"
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$here/../.venv/bin/python" ]; then PYTHON="$here/../.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
# The driver skips sections after --budget (420 s by default); the timeout is the hard stop.
exec timeout -k 15 "${SUITE_TIMEOUT:-480}" "$PYTHON" "$here/gpu_suite.py" --out "$OUT" "$@"
