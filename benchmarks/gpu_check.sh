#!/usr/bin/env bash
# One short check for a lent GPU machine, about 3-6 minutes in all (hard limit 8):
#   1. the tests marked `gpu` (pytest -m gpu)
#   2. the coco_gpu preset on a COCO-sized synthetic cache (118,287 images at 64 x 64, 5 captions each,
#      made on the GPU in a second) with bf16 and the cache resident on the GPU: samples/s, peak GPU
#      memory, projected minutes per epoch (118k images; all 591k caption pairs)
#   3. naive vs course pipeline on the GPU, alternating, on 1000 synthetic 640 x 480 JPEGs
# Usage: bash benchmarks/gpu_check.sh            (from anywhere; extra arguments go to step 2-3's command)
# The same Python runs tiny on a CPU: python benchmarks/train_throughput.py gpu --device cpu --smoke
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi not found"
status=0

echo "== 1. pytest -m gpu"
timeout 180 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider || status=$?

echo "== 2-3. coco_gpu preset at COCO size; naive vs course"
timeout 300 "$PY" benchmarks/train_throughput.py gpu --device cuda --check-steps 100 \
    --synthetic-images 1000 --rounds 3 --steps 3 "$@" || status=$?

echo "gpu_check.sh: exit status $status"
exit $status
