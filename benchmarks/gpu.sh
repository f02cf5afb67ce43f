#!/usr/bin/env bash
# GPU figures for clipdiff: DDPM training images/s in fp32 vs bf16 autocast + channels-last, and guided sampling
# images/s (DDIM + noisy CLIP). Writes outputs/bench/<timestamp>.csv and latest.csv like `make bench`.
#   benchmarks/gpu.sh                      # on a CUDA machine (ddpm_64 preset, 64 px, batch 64)
#   benchmarks/gpu.sh --gpu-device cpu --quick   # dry run on a CPU with tiny sizes (what the tests run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PY" -m clipdiff.bench --gpu --threads "${THREADS:-8}" "$@"
