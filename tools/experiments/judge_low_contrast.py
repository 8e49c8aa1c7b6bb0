"""Experiment: fine-tune the shipped world CLIP's vision tower (text tower frozen) with a share of each batch
drawn from low-contrast scenes (every object recoloured to the colour nearest its background). Does the
judge learn to see white on white without losing the rest? Resumable, time-capped."""

import copy
import os
import random
import sys
import time
from dataclasses import replace

import checkpoint
import numpy as np
import torch
from transformers import CLIPModel, CLIPTokenizer

from cones import world
from cones.world import models
from cones.world.render import render
from cones.world.scene import COLOURS, detailed_caption
from cones.world.subjects import is_subject_free, sample_training_scene
from cones.world.train import (
    CLIP_MEAN,
    CLIP_STD,
    TrainConfig,
    decode_pool,
    export_clip,
    render_pool,
    to_pixels,
    tokenize,
    with_decoded,
)

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
OUT = "runs/judge"
CAP = float(sys.argv[1]) if len(sys.argv) > 1 else 1800
LOW_SHARE = float(os.environ.get("LOW_SHARE", "0.25"))
LR = float(os.environ.get("LR", "5e-5"))
B = int(os.environ.get("BATCH", "256"))


def nearest_colour(scene):
    bg = render(replace(scene, things=())).reshape(-1, 3).mean(0)
    return min(COLOURS, key=lambda c: float(((np.array(COLOURS[c]) - bg) ** 2).sum()))


def low_contrast_pool(n, seed=5):
    path = os.path.join(OUT, f"low-{n}.npz")
    if os.path.exists(path):
        d = np.load(path)
        return d["images"], d["details"]
    rng = random.Random(seed)
    imgs, dets = [], []
    while len(imgs) < n:
        s = sample_training_scene(rng)
        if not s.things:
            continue
        c = nearest_colour(s)
        s = replace(s, things=tuple(replace(t, colour=c) for t in s.things))
        if not is_subject_free(s):
            continue
        imgs.append(render(s))
        dets.append([detailed_caption(s)] + [detailed_caption(s, rng) for _ in range(2)])
        if len(imgs) % 2000 == 0:
            print("low", len(imgs), flush=True)
    np.savez(path + ".tmp.npz", images=np.stack(imgs), details=np.array(dets))
    os.replace(path + ".tmp.npz", path)
    return np.stack(imgs), np.array(dets)


cfg = TrainConfig(out="runs/clip-decoded", device="cpu", seed=0, workers=1)
pool = render_pool(cfg)
images = torch.from_numpy(pool["images"])
vae = None
from diffusers import AutoencoderKL

vae = AutoencoderKL.from_pretrained(world.model_path(), subfolder="vae").eval()
cfg.clip_decoded_pool = 10000
decoded = decode_pool(cfg, vae, images)
low_imgs, low_det = low_contrast_pool(int(os.environ.get("LOW_N", "12000")))
low_imgs = torch.from_numpy(low_imgs)
tok = CLIPTokenizer.from_pretrained(world.clip_path())
det_ids = tokenize(tok, pool["details"].reshape(-1), models.CLIP_MAX_TOKENS).view(*pool["details"].shape, -1)
low_ids = tokenize(tok, low_det.reshape(-1), models.CLIP_MAX_TOKENS).view(*low_det.shape, -1)
clip = CLIPModel.from_pretrained(world.clip_path(), torch_dtype=torch.float32)
for n, p in clip.named_parameters():
    p.requires_grad_(n.startswith("vision_model") or n.startswith("visual_projection"))
params = [p for p in clip.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.05)
ck = os.path.join(OUT, "ckpt.pt")
step, spent, log = checkpoint.resume(ck, clip=clip, opt=opt)
mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
gen = torch.Generator().manual_seed(300 + step)
t0 = time.time() - spent
n_low = int(B * LOW_SHARE)
n_main = B - n_low
clip.train()


def save():
    checkpoint.save(ck, step, time.time() - t0, log, clip=clip, opt=opt)


while time.time() - t0 < CAP:
    for g in opt.param_groups:
        g["lr"] = LR * min(1, (step + 1) / 20)
    idx = torch.randint(0, len(images), (n_main,), generator=gen)
    which = torch.randint(0, det_ids.shape[1], (n_main,), generator=gen)
    use = torch.rand(n_main, generator=gen) < 0.5
    batch, idx = with_decoded(images, decoded, idx, use)
    li = torch.randint(0, len(low_imgs), (n_low,), generator=gen)
    lw = torch.randint(0, low_ids.shape[1], (n_low,), generator=gen)
    pixels = ((to_pixels(torch.cat([batch, low_imgs[li]])) + 1) / 2 - mean) / std
    ids = torch.cat([det_ids[idx, which], low_ids[li, lw]])
    out = clip(input_ids=ids, pixel_values=pixels, return_loss=True)
    opt.zero_grad()
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    step += 1
    if step % 10 == 0:
        log.append((step, out.loss.item()))
        print(step, round(out.loss.item(), 4), round(time.time() - t0), flush=True)
    if step % 50 == 0:
        save()
save()
export_clip(os.path.join(OUT, "clip"), copy.deepcopy(clip).eval(), tok, vocabulary=world.clip_path())
print("done", step, flush=True)
