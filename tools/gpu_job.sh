#!/usr/bin/env bash
# The one job sent to a borrowed GPU: install the carried wheels, a smoke run of the whole training script
# at toy size (so that a mistake costs seconds, not the slot), then the real run.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv
mkdir -p /tmp/smoke-out
OUT=/tmp/smoke-out WORK=/tmp/smoke POOL=3000 VAE_S=4 UNET_S=6 CLIP_S=6 bash tools/train_world_on_gpu.sh > "$OUT/smoke.log" 2>&1 \
  || { echo "smoke run failed"; tail -n 40 "$OUT/smoke.log"; tail -n 30 /tmp/smoke-out/*.log; exit 1; }
echo "smoke ok"; grep -E "pool rendered|trained in|done in" "$OUT/smoke.log"
VAE_S=${VAE_S:-75} UNET_S=${UNET_S:-300} CLIP_S=${CLIP_S:-280} bash tools/train_world_on_gpu.sh
