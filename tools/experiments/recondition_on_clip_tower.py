"""Experiment: re-condition the shipped UNet on the world CLIP's frozen text tower (SD's recipe: a frozen,
contrastively trained text encoder). Does the UNet then attend per word? Resumable; time-capped."""

import copy
import os
import sys
import time

import checkpoint
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from cones import world
from cones.world import models
from cones.world.train import TrainConfig, ema_update, encode_pool, render_pool, tokenize

OUT = "runs/recond"
CAP = float(sys.argv[1]) if len(sys.argv) > 1 else 2400
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
cfg = TrainConfig(out=OUT, device="cpu", seed=7, pool_size=30000, workers=1)
sd = world.model_path()
pool = render_pool(cfg)
vae = AutoencoderKL.from_pretrained(sd, subfolder="vae").eval()
lat = encode_pool(cfg, vae, torch.from_numpy(pool["images"]))
tok = CLIPTokenizer.from_pretrained(world.clip_path())
caps = pool["captions"]
ids = tokenize(tok, caps.reshape(-1), 32).view(*caps.shape, -1)
empty = tokenize(tok, [""], 32)[0]
text = (
    CLIPTextModel.from_pretrained(world.clip_path(), torch_dtype=torch.float32).eval().requires_grad_(False)
)
unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet").float().train()
ema = copy.deepcopy(unet).requires_grad_(False)
opt = torch.optim.AdamW(unet.parameters(), lr=2e-4, weight_decay=0.01)
ck = os.path.join(OUT, "ckpt.pt")
step, spent, log = checkpoint.resume(ck, unet=unet, ema=ema, opt=opt)
sched = models.build_train_scheduler()
al = sched.alphas_cumprod
snr = al / (1 - al)
w = torch.clamp(snr, max=5.0) / snr
gen = torch.Generator().manual_seed(100 + step)
t0 = time.time() - spent
B = 32


def save():
    checkpoint.save(ck, step, time.time() - t0, log, unet=unet, ema=ema, opt=opt)


while time.time() - t0 < CAP:
    lr = 2e-4 * min(1, (step + 1) / 100)
    for g in opt.param_groups:
        g["lr"] = lr
    idx = torch.randint(0, len(lat), (B,), generator=gen)
    which = torch.randint(0, caps.shape[1], (B,), generator=gen)
    c = ids[idx, which]
    drop = torch.rand(B, generator=gen) < 0.1
    c = torch.where(drop[:, None], empty[None], c)
    x0 = lat[idx]
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, 1000, (B,), generator=gen)
    with torch.no_grad():
        cond = text(c)[0]
    pred = unet(sched.add_noise(x0, noise, t), t, cond).sample
    loss = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * w[t]).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    ema_update(ema, unet, min(0.995, (1 + step) / (10 + step)))
    step += 1
    if step % 25 == 0:
        log.append((step, loss.item()))
        print(step, round(loss.item(), 4), round(time.time() - t0), flush=True)
    if step % 200 == 0:
        save()
save()
# export a pipeline folder: shipped VAE + scheduler, EMA UNet, the CLIP text tower and tokenizer
pipe = StableDiffusionPipeline.from_pretrained(
    sd, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
)
pipe.unet.load_state_dict(ema.state_dict())
pipe.text_encoder = text
pipe.tokenizer = tok
tok.model_max_length = 32
pipe.save_pretrained(os.path.join(OUT, "sd"), safe_serialization=True)
print("done", step, flush=True)
