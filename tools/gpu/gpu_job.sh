#!/usr/bin/env bash
# The one job to send to a borrowed GPU (about 9 minutes): install the carried wheels; run the full-size
# GPU check first, alone on the GPU so that its timings are clean; then continue training the shipped world
# model (UNet + text encoder, and the CLIP, which also learns renders as the VAE returns them) from its
# current weights, and pack the result into $OUT. MODE=scratch trains everything anew instead.
# MODE=recondition continues the UNet on the world CLIP's text tower, frozen, in place of its own text
# encoder (Stable Diffusion's recipe; the shipped encoder gives every word the same state, README "Inside"),
# so that its cross-attention learns to read words; a model made so is continued with MODE=frozen. The
# tower's tokenizer is cut to the caption words, so the CLIP's detail words ("stripes") name nothing.
#
#   run: bash tools/gpu/gpu_job.sh      carry: .whl (the diffusers 0.42.1 and importlib_metadata wheels)
# Afterwards, here: cat $FILES/weights.tar.part* | tar -x -C /tmp/new && compare with benchmarks/bench_world.py.
# Dry run on a CPU: DEVICE=cpu CHECK_ARGS=--smoke POOL=600 UNET_S=10 CLIP_S=10 OUT=/tmp/out bash tools/gpu/gpu_job.sh
set -uo pipefail
job_start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv || true
if [ "${CHECK_S:-90}" != 0 ]; then
  timeout $(( ${CHECK_S:-90} + 60 )) python3 benchmarks/gpu_check.py --max-seconds "${CHECK_S:-90}" --out "$OUT" ${CHECK_ARGS:-} \
    || echo "gpu_check exited with $?"
fi
if [ "${MODE:-continue}" = scratch ]; then
  VAE_S=${VAE_S:-75} UNET_S=${UNET_S:-330} CLIP_S=${CLIP_S:-280} bash tools/gpu/train_world_on_gpu.sh
else
  # The training phases get what is left of BUDGET seconds (the device call's limit, less a margin) after
  # the check, less about 110 s for rendering the pool, encoding it, sampling and packing.
  left=$(( ${BUDGET:-540} - ($(date +%s) - job_start) - 110 ))
  UNET_S=${UNET_S:-$(( left < 300 ? left : 300 ))}; CLIP_S=${CLIP_S:-$(( UNET_S - 20 ))}
  echo "training for $UNET_S s (UNet) and $CLIP_S s (CLIP)"
  W=src/cones_world/weights
  case "${MODE:-continue}" in
    recondition) TEXT="--text-encoder-from $W/clip" ;;
    frozen) TEXT="--freeze-text-encoder 1" ;;
    *) TEXT="" ;;
  esac
  SD_PHASES=unet SD_EXTRA="--init-from $W/sd --unet-lr ${UNET_LR:-2e-4} --unet-steps 1000000 $TEXT" \
    CLIP_EXTRA="--clip-init-from $W/clip --init-from $W/sd --clip-lr ${CLIP_LR:-2e-4} --clip-steps 1000000 --clip-decoded-share 0.5" \
    POOL=${POOL:-120000} UNET_S=$UNET_S CLIP_S=$CLIP_S bash tools/gpu/train_world_on_gpu.sh
fi
