#!/usr/bin/env bash
# The GPU preset once, as one prepared script (issue 17): the whole pipeline at 64 px on one GPU in bf16, then the
# GPU figures (DDPM training images/s in fp32 vs bf16, guided sampling at batch 256). Everything lands under $RESULTS
# (default outputs/gpu_run): the pipeline's report.md (wall time per stage, the evaluation table), its grids, the
# bench table and nvidia-smi's card name.
#   benchmarks/gpu_preset.sh [pipeline overrides…]      e.g. trainer=ddp trainer.devices=4
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
RESULTS="${RESULTS:-outputs/gpu_run}"
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/card.txt"
start=$(date +%s)
"$PY" -m clipdiff.pipeline preset=gpu train_logger=csv "$@" 2>&1 | tee "$RESULTS/pipeline.log"
echo "pipeline wall seconds: $(( $(date +%s) - start ))" | tee -a "$RESULTS/card.txt"
run=$(readlink -f outputs/latest_gpu)
cp "$run/report.md" "$RESULTS/report.md"
cp -r "$run/evaluate/grids" "$RESULTS/grids"
"$PY" -m clipdiff.bench --gpu --threads "${THREADS:-8}" --out "$RESULTS/bench" 2>&1 | tee "$RESULTS/bench.log"
