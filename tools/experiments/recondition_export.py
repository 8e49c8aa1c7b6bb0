"""Export the re-conditioned checkpoint's EMA UNet as a pipeline folder, as train-world exports (fp16)."""

import os

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel, CLIPTokenizer

from cones import world
from cones.world import models
from cones.world.train import export_pipeline

OUT = "runs/recond"
tok = CLIPTokenizer.from_pretrained(world.clip_path(), model_max_length=models.MAX_TOKENS)
tok.save_pretrained(os.path.join(OUT, "tokenizer"))
s = torch.load(os.path.join(OUT, "ckpt.pt"), weights_only=False)
unet = models.build_unet()
unet.load_state_dict(s["ema"])
vae = AutoencoderKL.from_pretrained(world.model_path(), subfolder="vae")
text = CLIPTextModel.from_pretrained(world.clip_path(), torch_dtype=torch.float32)
export_pipeline(os.path.join(OUT, "sd"), vae, unet.eval(), text.eval(), tok)
print("exported step", s["step"], "spent", round(s["spent"]))
