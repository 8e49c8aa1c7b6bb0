#!/usr/bin/env bash
# Train the embedded world model on one borrowed GPU inside a fixed time slot, then pack the exported
# folders into $OUT as <16 MiB parts. The VAE -> UNet phases and the CLIP phase run at the same time in two
# processes: both models are small, and one alone leaves most of the GPU idle.
#
#   OUT=/tmp/out bash tools/gpu/train_world_on_gpu.sh            # on the GPU machine, from the repo root
# Optional: POOL (scenes), UNET_S, VAE_S, CLIP_S (wall-clock seconds per phase), DEVICE, SD_PHASES
# (vae,unet by default; "unet" with SD_EXTRA="--init-from FOLDER" continues a model), SD_EXTRA, CLIP_EXTRA.
set -euo pipefail
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
POOL=${POOL:-200000}; VAE_S=${VAE_S:-75}; UNET_S=${UNET_S:-330}; CLIP_S=${CLIP_S:-300}; DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/world}
EXTRA=${EXTRA:-}; SD_EXTRA=${SD_EXTRA:-}; CLIP_EXTRA=${CLIP_EXTRA:-}; SD_PHASES=${SD_PHASES:-vae,unet}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$WORK" "$OUT"
# Train on the shipped vocabulary files (building them anew can number the tokens differently), so that a
# continued model keeps its token ids.
W=src/cones_world/weights
mkdir -p "$WORK/tokenizer" "$WORK/clip_tokenizer"
for f in vocab.json merges.txt tokenizer.json tokenizer_config.json; do
  cp "$W/sd/tokenizer/$f" "$WORK/tokenizer/"; cp "$W/clip/$f" "$WORK/clip_tokenizer/"
done
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
start=$(date +%s)
python3 -m cones_world.train --out "$WORK" --device "$DEVICE" --phases pool --pool-size "$POOL" $EXTRA 2>&1 | tail -n 3
echo "pool rendered in $(( $(date +%s) - start )) s"
python3 -m cones_world.train --out "$WORK" --device "$DEVICE" --phases clip --pool-size "$POOL" \
  --phase-seconds "{\"clip\": $CLIP_S}" $EXTRA $CLIP_EXTRA > "$OUT/clip.log" 2>&1 &
clip_pid=$!
python3 -m cones_world.train --out "$WORK" --device "$DEVICE" --phases "$SD_PHASES" --pool-size "$POOL" \
  --phase-seconds "{\"vae\": $VAE_S, \"unet\": $UNET_S}" $EXTRA $SD_EXTRA > "$OUT/unet.log" 2>&1 || { tail -n 30 "$OUT/unet.log"; exit 1; }
wait $clip_pid || { tail -n 30 "$OUT/clip.log"; exit 1; }
echo "trained in $(( $(date +%s) - start )) s"
python3 - "$WORK" "$OUT" "$DEVICE" <<'PY'
import sys, json, numpy as np, torch
from PIL import Image
from diffusers import StableDiffusionPipeline
work, out, device = sys.argv[1:]
pipe = StableDiffusionPipeline.from_pretrained(f"{work}/sd").to(device)
pipe.set_progress_bar_config(disable=True)
prompts = ["a red star on a sea background", "a big blue circle on a grass background", "a small yellow heart next to a green square on a night background", "a purple triangle wearing a hat on a desert background", "a sks circle", "a circle", "a white hexagon above a pink diamond on a gray background", "an orange cross on a white background"]
rows = []
for p in prompts:
    ims = pipe([p] * 8, num_inference_steps=25, height=64, width=64, generator=torch.Generator(device).manual_seed(0)).images
    rows.append(np.concatenate([np.asarray(i) for i in ims], axis=1))
Image.fromarray(np.concatenate(rows, axis=0)).save(f"{out}/samples.png")
import glob, os
for path in sorted(glob.glob(f"{work}/report-*.json")):
    name = os.path.basename(path)[7:-5]
    r = json.load(open(path))
    print(name, {k: round(v, 1) for k, v in r["seconds"].items()},
          {k: (len(v), v[-1] if v else None) for k, v in r.items() if k.endswith("_log")})
PY
(cd "$WORK" && tar -cf /tmp/world-weights.tar sd clip report-*.json)
split -b 15m -d /tmp/world-weights.tar "$OUT/weights.tar.part"
(cd "$OUT" && tar -czf logs.tar.gz unet.log clip.log && rm unet.log clip.log)  # $OUT brings back 8 files at most
ls -la "$OUT"
echo "done in $(( $(date +%s) - start )) s"
