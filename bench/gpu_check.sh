#!/usr/bin/env bash
# GPU checks in one run (see bench/gpu_check.py). Needs torch with CUDA; onnxruntime-gpu and tensorrt optional.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -m pip install -q -e . >/dev/null 2>&1 || true
timeout 480 python3 bench/gpu_check.py
