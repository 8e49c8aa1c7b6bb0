#!/usr/bin/env bash
# The one job for a borrowed GPU: world v2's training phases (tools/train_world_v2.sh) on the GPU inside one
# call, then samples and the weights packed into $OUT as parts under 16 MiB.
#
#   here, once: bash tools/gpu/fetch_wheels.sh
#   run:  bash tools/gpu/train_world_v2.sh          carry: .whl          (about 9 minutes)
#   back here: cat FILES/weights.tar.part* | tar -x -C training/world-v2-new
#
# Where a committed run exists (training/world-v2 with sd/ and clip/), it is continued: its VAE, CLIP and
# UNet go on. Once it holds a UNet (sd/unet), the UNet keeps reading the tower it learnt on (sd/'s text
# encoder) and the CLIP phase trains the judge alone; before that, the CLIP trains first and is the tower.
# FREEZE_TOWER=0 or 1 overrides that choice. Otherwise everything starts from the shipped world v1 weights.
#
# While world v1's weights and training/world-v2 are both tracked, the tree is over the 64 MiB a call
# carries: `bash tools/gpu/travel_light.sh on` before the call, `... off` after it (commit nothing between).
# Phase caps in seconds: VAE_S, CLIP_S, UNET_S.
# Dry run on a CPU: DEVICE=cpu POOL=600 WORKERS=2 VAE_S=10 CLIP_S=10 UNET_S=10 OUT=/tmp/out bash tools/gpu/train_world_v2.sh
set -uo pipefail
start=$(date +%s)
if [ "${DEVICE:-cuda}" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
  nvidia-smi --query-gpu=name,memory.total --format=csv || true
else
  export PYTHONPATH=$PWD/src
fi
WORK=${WORK:-/tmp/world-v2}
if [ -d training/world-v2/clip ]; then
  export VAE_FROM=training/world-v2/sd CLIP_FROM=training/world-v2/clip
  freeze=0
  [ -d training/world-v2/sd/unet ] && export UNET_FROM=training/world-v2/sd && freeze=1
  [ "${FREEZE_TOWER:-$freeze}" = 1 ] && export TOWER=training/world-v2/sd
fi
DEVICE=${DEVICE:-cuda} OUT=$WORK POOL=${POOL:-200000} WORKERS=${WORKERS:-15} CHECKPOINT=500 TQDM_MININTERVAL=20 \
  VAE_S=${VAE_S:-60} CLIP_S=${CLIP_S:-150} UNET_S=${UNET_S:-270} VAE_STEPS=100000 CLIP_STEPS=100000 UNET_STEPS=1000000 \
  VAE_BATCH=${VAE_BATCH:-128} CLIP_BATCH=${CLIP_BATCH:-512} UNET_BATCH=${UNET_BATCH:-256} \
  VAE_LR=${VAE_LR:-3e-4} CLIP_LR=${CLIP_LR:-3e-4} UNET_LR=${UNET_LR:-2e-4} \
  bash tools/train_world_v2.sh > "$OUT/train.log" 2>&1 || { tail -n 40 "$OUT/train.log"; exit 1; }
echo "trained in $(( $(date +%s) - start )) s"
python3 tools/sample_world_v2.py "$WORK/sd" "$OUT/samples.png" --seeds 8 --device "${DEVICE:-cuda}"
(cd "$WORK" && tar -cf /tmp/world-v2-weights.tar sd clip report-*.json)
split -b 15m -d /tmp/world-v2-weights.tar "$OUT/weights.tar.part"
gzip -c "$OUT/train.log" > "$OUT/train.log.gz" && rm "$OUT/train.log"
ls -la "$OUT"
echo "done in $(( $(date +%s) - start )) s"
