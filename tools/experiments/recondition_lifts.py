"""Per-word attention lifts and conditioning report: shipped model vs the re-conditioned checkpoint."""

import os
import random
import sys

sys.path.insert(0, "benchmarks")
import numpy as np
import torch
from bench_attention import conditioning_report
from transformers import CLIPTextModel, CLIPTokenizer

from cones import world
from cones.attention import attention_maps_for_image, attention_share, thing_mask
from cones.pipeline import load_pipeline
from cones.world.render import render
from cones.world.scene import Background, Scene, Thing, place, radius_for

torch.set_num_threads(int(os.environ.get("THREADS", "1")))


def recond_pipe():
    pipe = load_pipeline()
    s = torch.load("runs/recond/ckpt.pt", weights_only=False)
    pipe.unet.load_state_dict({k: v.to(pipe.unet.dtype) for k, v in s["ema"].items()})
    pipe.text_encoder = CLIPTextModel.from_pretrained(world.clip_path(), torch_dtype=pipe.text_encoder.dtype)
    tok = CLIPTokenizer.from_pretrained(world.clip_path())
    tok.model_max_length = 32
    pipe.tokenizer = tok
    print("recond step", s["step"])
    return pipe


def lifts(pipe, n=8):
    rng = random.Random(5)
    out = {}
    shapes = ["star", "circle", "square", "heart"]
    colours = ["red", "blue", "yellow", "green"]
    for i in range(n):
        t = Thing(shapes[i % 4], colours[(i // 2) % 4], "big", radius=radius_for("big", rng, False))
        scene = Scene(Background("sea"), place([t], None, rng))
        from PIL import Image

        image = Image.fromarray(render(scene))
        mask = thing_mask(scene.things[0], 64)
        prompt = f"a big {t.colour} {t.shape} on a sea background"
        m = attention_maps_for_image(pipe, prompt, image, strength=0.6, seed=i, steps=25, resolution=64)
        area = float(np.asarray(mask).mean())
        P = m.probabilities
        nt = len(m.tokens)
        for k, w in enumerate(m.tokens):
            role = {t.colour: "colour", t.shape: "shape"}.get(w, w)
            out.setdefault(role, []).append(attention_share(P[1 + k], mask) / area)
        out.setdefault("end", []).append(attention_share(P[1 + nt], mask) / area)
        pm = m.prompt_maps
        for k, w in enumerate(m.tokens):
            if w == t.shape:
                out.setdefault("shape(prompt-norm)", []).append(attention_share(pm[k], mask) / area)
    return {k: round(float(np.mean(v)), 3) for k, v in out.items()}


for name, pipe in (("shipped", load_pipeline()), ("recond", recond_pipe())):
    print(name, conditioning_report(pipe, "a sks circle", "a circle", "a red circle"))
    print(name, lifts(pipe))
