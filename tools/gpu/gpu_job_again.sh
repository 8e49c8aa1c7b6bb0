#!/usr/bin/env bash
# A second, shorter slot on the same warm GPU machine, right after tools/gpu/gpu_job.sh: continue the UNet +
# text encoder and the CLIP that it left in /tmp/world, on the same pool (its latents and decoded copies are
# reused, so nothing is rendered or encoded again), at half the learning rate, and pack the result into $OUT.
#
#   run (same machine, still warm): bash tools/gpu/gpu_job_again.sh      carry: nothing more
# Optional: UNET_S (130), CLIP_S (120), POOL (120000, as the first job's).
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
UNET_S=${UNET_S:-130}; CLIP_S=${CLIP_S:-120}; POOL=${POOL:-120000}
[ -d /tmp/world/sd ] || { echo "no /tmp/world/sd: run tools/gpu/gpu_job.sh on this machine first"; exit 1; }
mkdir -p /tmp/w2 && ln -f /tmp/world/pool.npz /tmp/world/latents-*.pt /tmp/w2/ && cp -r /tmp/world/tokenizer /tmp/world/clip_tokenizer /tmp/w2/ || exit 1
python3 -m cones_world.train --out /tmp/w2 --phases unet --pool-size "$POOL" --init-from /tmp/world/sd \
  --unet-lr 1e-4 --unet-steps 1000000 --phase-seconds "{\"unet\": $UNET_S}" > "$OUT/unet2.log" 2>&1 &
python3 -m cones_world.train --out /tmp/w2 --phases clip --pool-size "$POOL" --clip-init-from /tmp/world/clip \
  --init-from /tmp/world/sd --clip-lr 1e-4 --clip-steps 1000000 --clip-decoded-share 0.5 \
  --phase-seconds "{\"clip\": $CLIP_S}" > "$OUT/clip2.log" 2>&1
wait
cd /tmp/w2 && tar -cf - sd clip report-*.json | split -b 15m -d - "$OUT/w2.tar.part"
ls -la "$OUT"
