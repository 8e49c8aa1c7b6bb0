#!/usr/bin/env bash
# Train world v2 in the order its parts depend on each other, each phase resumable from its checkpoint:
#   1. the pool of renders and alt-text captions;
#   2. the VAE, continued from VAE_FROM's on the new colours;
#   3. the CLIP (the judge, and the text tower until one is frozen), continued from CLIP_FROM on alt text;
#   4. the UNet, continued from UNET_FROM's, conditioned on the text tower, frozen.
# Run it again after an interruption and it goes on where it stopped (at most CHECKPOINT steps lost).
#
#   bash tools/train_world_v2.sh                                   # CPU, into ~/.cache/cones/world-v2
#   VAE_FROM=training/world-v2/sd CLIP_FROM=training/world-v2/clip UNET_FROM=training/world-v2/sd \
#     TOWER=training/world-v2/sd VAE_STEPS=0 bash tools/train_world_v2.sh
#       # continue a committed run: the judge CLIP and the UNet go on, the UNet on the tower it has read
#
# TOWER freezes a text tower: a CLIP folder, or a Stable Diffusion folder (its text_encoder and tokenizer).
# Once a UNet has learnt to read a tower, that tower stays, and the CLIP phase trains the judge alone (as
# Stable Diffusion's text encoder stays while other CLIPs judge its images). Without TOWER, the CLIP the
# phase trains is the tower.
#
# Every setting is an environment variable; the defaults are sized for a 2-core CPU. VAE_S, CLIP_S and
# UNET_S cap a phase's wall-clock seconds (a GPU slot); a capped phase counts as finished.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-60}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$HOME/.cache/cones/world-v2}
DEVICE=${DEVICE:-cpu}
POOL=${POOL:-40000}
WORKERS=${WORKERS:-2}
CHECKPOINT=${CHECKPOINT:-100}
SD_FROM=${SD_FROM:-src/cones_world/weights/sd}
VAE_FROM=${VAE_FROM:-$SD_FROM}     # where the VAE continues from
UNET_FROM=${UNET_FROM:-$SD_FROM}   # where the UNet continues from
CLIP_FROM=${CLIP_FROM:-src/cones_world/weights/clip}
TOWER=${TOWER:-}
VAE_STEPS=${VAE_STEPS:-600}; VAE_BATCH=${VAE_BATCH:-48}; VAE_LR=${VAE_LR:-3e-4}
CLIP_STEPS=${CLIP_STEPS:-1500}; CLIP_BATCH=${CLIP_BATCH:-128}; CLIP_LR=${CLIP_LR:-3e-4}
UNET_STEPS=${UNET_STEPS:-20000}; UNET_BATCH=${UNET_BATCH:-64}; UNET_LR=${UNET_LR:-2e-4}
common=(--world v2 --out "$OUT" --device "$DEVICE" --pool-size "$POOL" --workers "$WORKERS"
        --checkpoint-every "$CHECKPOINT")
cap() { [ -n "${1:-}" ] && echo "{\"$2\": $1}" || echo "{}"; }
train() { "$PYTHON" -m cones_world.train "${common[@]}" "$@"; }
mkdir -p "$OUT"
echo "$(date -u +%FT%TZ) world v2 training into $OUT on $DEVICE"
train --phases pool
train --phases vae --init-from "$VAE_FROM" --vae-steps "$VAE_STEPS" --vae-batch "$VAE_BATCH" --vae-lr "$VAE_LR" \
  --phase-seconds "$(cap "${VAE_S:-}" vae)"
train --phases clip --init-from "$VAE_FROM" --clip-init-from "$CLIP_FROM" --clip-steps "$CLIP_STEPS" \
  --clip-batch "$CLIP_BATCH" --clip-lr "$CLIP_LR" --clip-decoded-share 0.3 --clip-decoded-pool 6000 \
  --phase-seconds "$(cap "${CLIP_S:-}" clip)"
tower="$OUT/clip"
if [ -n "$TOWER" ]; then  # a tower a UNet has read before: kept as it is, in a folder of its own
  tower="$OUT/tower"
  rm -rf "$tower" && mkdir -p "$tower"
  if [ -d "$TOWER/text_encoder" ]; then
    cp "$TOWER"/text_encoder/* "$TOWER"/tokenizer/* "$tower"/
  else
    cp -r "$TOWER"/. "$tower"/
  fi
fi
train --phases unet --init-from "$UNET_FROM" --text-encoder-from "$tower" --unet-steps "$UNET_STEPS" \
  --unet-batch "$UNET_BATCH" --unet-lr "$UNET_LR" --phase-seconds "$(cap "${UNET_S:-}" unet)"
echo "$(date -u +%FT%TZ) done"
