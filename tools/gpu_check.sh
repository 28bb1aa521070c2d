#!/usr/bin/env bash
# The GPU checks in one script, for a lent GPU machine (no network there). From the repo root:
#   PYTHONPATH=/tmp/site:$PWD OUT=$OUT bash tools/gpu_check.sh
# /tmp/site must hold DALI + lmdb (shared/reference/tools/dali-offline-bundle.sh) and, for the
# GPU tests, pytest (e.g. `pip download pytest iniconfig pluggy packaging` unzipped beside them).
# Everything it measures goes to $OUT: GPU tests, the training benchmark (seed's method vs the
# same-run plain-PyTorch baseline, eager and compiled), DALI end to end, a short GPU training run.
set -uo pipefail
OUT=${OUT:-gpu-out}
PY=${PY:-python3}
WORK=${WORK:-/tmp/alexnet-pipe-gpu}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
{ nvidia-smi; $PY -c "import torch, nvidia.dali as d; print(torch.__version__, d.__version__)"; } > "$OUT/env.txt" 2>&1
if $PY -c "import pytest" 2>/dev/null; then
  $PY -m pytest -q -rs tests/test_gpu.py > "$OUT/pytest-gpu.txt" 2>&1
fi
$PY -m alexnet_pipe benchmark -b gpu -o "$OUT/bench.jsonl" > "$OUT/bench.md" 2>&1
$PY -m alexnet_pipe benchmark -b gpu --compile -o "$OUT/bench.jsonl" >> "$OUT/bench.md" 2>&1
$PY tools/make_shapes.py "$WORK/raw" --train 300 --val 50 --size 500x375 > "$OUT/data.txt" 2>&1
$PY -m alexnet_pipe convert "$WORK/raw" "$WORK/data" --format both --no-progress >> "$OUT/data.txt" 2>&1
$PY -m alexnet_pipe benchmark -b gpu -w "$WORK/data" --throughput-steps 20 -o "$OUT/bench.jsonl" >> "$OUT/bench.md" 2>&1
$PY -m alexnet_pipe train -w "$WORK/data" -b gpu -e 3 -z 128 --lr 0.003 --init kaiming --no_progress_bar \
  -s "$WORK/w.pt" -o "$OUT/train.jsonl" > "$OUT/train.txt" 2>&1
$PY -m alexnet_pipe train -w "$WORK/data" -b gpu -e 2 --reader recordio --no_progress_bar >> "$OUT/train.txt" 2>&1
tail -n 3 "$OUT"/*.txt "$OUT/bench.md"
