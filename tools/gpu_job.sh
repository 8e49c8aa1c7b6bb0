#!/usr/bin/env bash
# The one job to send to a borrowed GPU (about 9 minutes): install the carried wheels, then continue
# training the shipped world model (UNet + text encoder, and the CLIP with partial captions) from its
# current weights, and pack the result into $OUT. MODE=scratch trains everything anew instead.
#
#   run: bash tools/gpu_job.sh      carry: .whl (the diffusers 0.42.1 and importlib_metadata wheels)
# Afterwards, here: cat $FILES/weights.tar.part* | tar -x -C /tmp/new && compare with benchmarks/bench_world.py.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv
if [ "${MODE:-continue}" = scratch ]; then
  VAE_S=${VAE_S:-75} UNET_S=${UNET_S:-330} CLIP_S=${CLIP_S:-280} bash tools/train_world_on_gpu.sh
else
  W=src/cones/world/weights
  SD_PHASES=unet SD_EXTRA="--init-from $W/sd --unet-lr 2e-4" CLIP_EXTRA="--clip-init-from $W/clip --clip-lr 2e-4" \
    POOL=${POOL:-150000} UNET_S=${UNET_S:-420} CLIP_S=${CLIP_S:-300} bash tools/train_world_on_gpu.sh
fi
