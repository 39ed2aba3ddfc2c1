#!/usr/bin/env bash
# GPU checks in one run, under 10 minutes on one H100 (see bench/gpu_check.py); exits non-zero on any mismatch. Needs torch with CUDA; onnxruntime-gpu and tensorrt optional.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -m pip install -q -e . >/dev/null 2>&1 || true
timeout 570 python3 bench/gpu_check.py
