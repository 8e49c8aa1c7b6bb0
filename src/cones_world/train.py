"""Train the embedded model on renders of the world: VAE, then UNet + text encoder, and the evaluation CLIP.

Reads top to bottom: render a pool of scenes once, train each model in its own phase, export in the
formats users already have (a diffusers Stable Diffusion folder, a transformers CLIPModel folder).

Every phase is seeded, checkpoints every `checkpoint_every` steps into `out/` and resumes from there, so an
interrupted run loses at most one interval. Phases can be bounded by wall-clock seconds as well as steps,
which is how a fixed slot on a borrowed GPU is spent. The CLIP phase needs nothing from the others and can
run in a second process at the same time (`--phases clip`).

One file, longer than the others, on purpose: a training run is easiest to follow when its loops read top
to bottom in one place (nanoGPT's habit). Its settings and flags are in `train_config.py`.

    python -m cones_world.train --out runs/world --device cuda
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from multiprocessing import get_context

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from cones import files
from cones.fingerprint import weights_fingerprint  # the one fingerprint; its hash keys the caches
from cones_world import models
from cones_world.render import render
from cones_world.scene import caption, caption_words, detailed_caption, detailed_words
from cones_world.subjects import sample_training_scene
from cones_world.tokenizer import build_clip_tokenizer, restrict_to_words
from cones_world.train_config import TrainConfig, parse_args

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------------------
# 1. The pool of renders


def _render_one(args: tuple[int, int, int, str]) -> tuple[np.ndarray, list[str], list[str]]:
    """A scene's render, its diffusion captions, and its CLIP captions (the full one, then partial ones)."""
    seed, index, n_captions, world = args
    rng = random.Random(f"{seed}/scene/{index}")
    if world == "v2":  # alt text for both: the CLIP reads what the UNet reads, and the full caption too
        from cones_world.v2 import render as render_v2
        from cones_world.v2 import scene as scene_v2
        from cones_world.v2.subjects import sample_training_scene as sample_v2

        scene = sample_v2(rng)
        captions = [scene_v2.caption(scene, rng) for _ in range(n_captions)]
        return render_v2.render(scene), captions, [scene_v2.caption(scene), *captions]
    scene = sample_training_scene(rng)
    details = [detailed_caption(scene)] + [detailed_caption(scene, rng) for _ in range(n_captions)]
    return render(scene), [caption(scene, rng) for _ in range(n_captions)], details


def render_pool(cfg: TrainConfig) -> dict:
    """Render (or load) `cfg.pool_size` training scenes with their captions; cached in `out/pool.npz`."""
    path = os.path.join(cfg.out, "pool.npz")
    if os.path.exists(path):
        data = np.load(path, allow_pickle=False)
        return {k: data[k] for k in data.files}
    jobs = [(cfg.seed, i, cfg.captions_per_scene, cfg.world) for i in range(cfg.pool_size)]
    images = np.empty((cfg.pool_size, models.IMAGE_SIZE, models.IMAGE_SIZE, 3), np.uint8)
    captions, details = [], []
    bar = tqdm(total=cfg.pool_size, desc="render", unit="img")
    if cfg.workers > 1:
        with get_context("fork").Pool(cfg.workers) as pool:
            results = pool.imap(_render_one, jobs, chunksize=256)
            for i, (img, caps, det) in enumerate(results):
                images[i] = img
                captions.append(caps)
                details.append(det)
                bar.update()
    else:
        for i, (img, caps, det) in enumerate(map(_render_one, jobs)):
            images[i] = img
            captions.append(caps)
            details.append(det)
            bar.update()
    bar.close()
    pool = {"images": images, "captions": np.array(captions), "details": np.array(details)}
    files.write_bytes(path, lambda f: np.savez(f, **pool), overwrite=True)
    return pool


def world_tokenizers(
    out: str, sd_from: str | None = None, clip_from: str | None = None, text_encoder_from: str | None = None
):
    """The diffusion model's tokenizer (caption words) and the evaluation CLIP's (every detail word).

    A model that is continued keeps its own vocabulary files (`sd_from`: a pipeline folder, `clip_from`: a
    CLIP folder): building them anew could number the same words differently. A text encoder taken from a
    CLIP (`text_encoder_from`) comes with that CLIP's tokenizer and ids, cut to the diffusion model's length and
    words (`restrict_to_words`: the CLIP's detail words would name what captions never name)."""
    made = []
    sd_source = text_encoder_from or (sd_from and os.path.join(sd_from, "tokenizer"))
    for name, words, length, source in (
        ("tokenizer", caption_words(), models.MAX_TOKENS, sd_source),
        ("clip_tokenizer", detailed_words(), models.CLIP_MAX_TOKENS, clip_from),
    ):
        path = os.path.join(out, name)
        tower_defines_ids = name == "tokenizer" and text_encoder_from  # whatever files `out` held before
        if tower_defines_ids:
            shutil.rmtree(path, ignore_errors=True)
            restrict_to_words(text_encoder_from, path, words, length)
        elif source and not os.path.exists(os.path.join(path, "tokenizer.json")):
            CLIPTokenizer.from_pretrained(source, model_max_length=length).save_pretrained(path)
            copy_bpe_files(source, path)
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            made.append(CLIPTokenizer.from_pretrained(path))
        else:
            made.append(build_clip_tokenizer(words, path, length))
    return tuple(made)


def v2_tokenizers(out: str, text_encoder_from: str | None = None):
    """World v2's one tokenizer, for the CLIP and the diffusion model alike (the UNet reads the CLIP's text
    tower, so it reads the CLIP's words): every caption word whole, the identifiers included. Taken from
    `text_encoder_from` when the tower comes from an exported CLIP, so that the ids are the tower's."""
    from cones_world.v2.scene import caption_words as v2_words

    clip_path, sd_path = os.path.join(out, "clip_tokenizer"), os.path.join(out, "tokenizer")
    if text_encoder_from:
        shutil.rmtree(clip_path, ignore_errors=True)
        CLIPTokenizer.from_pretrained(text_encoder_from).save_pretrained(clip_path)
        copy_bpe_files(text_encoder_from, clip_path)
    elif not os.path.exists(os.path.join(clip_path, "tokenizer.json")):
        build_clip_tokenizer(v2_words(), clip_path, models.CLIP_MAX_TOKENS)
    tokenizer = CLIPTokenizer.from_pretrained(clip_path, model_max_length=models.CLIP_MAX_TOKENS)
    shutil.rmtree(sd_path, ignore_errors=True)
    tokenizer.save_pretrained(sd_path)
    copy_bpe_files(clip_path, sd_path)
    return tokenizer, tokenizer


def warm_start_clip(clip: CLIPModel, source: str, tokenizer) -> CLIPModel:
    """Start `clip` from the CLIP in folder `source`, which may read another vocabulary: every weight of the
    same shape is copied, and each token's embedding row is taken from the source's row for the same
    token, where it has one (new words keep their fresh rows). Returns `clip`."""
    old = CLIPModel.from_pretrained(source, torch_dtype=torch.float32)
    state, old_state = clip.state_dict(), old.state_dict()
    key = "text_model.embeddings.token_embedding.weight"
    for name, value in old_state.items():
        if name != key and name in state and state[name].shape == value.shape:
            state[name] = value
    old_ids = CLIPTokenizer.from_pretrained(source).get_vocab()
    for token, i in tokenizer.get_vocab().items():
        if token in old_ids:
            state[key][i] = old_state[key][old_ids[token]]
    clip.load_state_dict(state)
    return clip


def copy_bpe_files(source: str, folder: str) -> None:
    """Copy a tokenizer's BPE files (vocab.json, merges.txt) from `source` into `folder`, where they exist:
    `save_pretrained` writes only tokenizer.json, and older transformers read these instead."""
    for name in ("vocab.json", "merges.txt"):
        if os.path.exists(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))


def tokenize(tokenizer, texts, length: int) -> torch.Tensor:
    return tokenizer(
        list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids


# ---------------------------------------------------------------------------------------------------------
# 2. Shared training machinery


class Phase:
    """Step counting, wall-clock cap, checkpoints and resume for one training phase."""

    def __init__(self, cfg: TrainConfig, name: str, steps: int, modules: dict, optimizer):
        self.cfg, self.name, self.steps = cfg, name, steps
        self.modules, self.optimizer = modules, optimizer
        self.path = os.path.join(cfg.out, f"checkpoint-{name}.pt")
        self.step = 0
        self.log: list[dict] = []
        self.started = time.time()
        self.seconds = cfg.phase_seconds.get(name)
        self.seconds_before = 0.0  # wall-clock seconds spent in earlier runs of this phase
        self.done = False  # finished earlier: by steps or by its wall-clock cap
        if os.path.exists(self.path):
            state = torch.load(self.path, map_location=cfg.device, weights_only=False)
            for key, module in modules.items():
                module.load_state_dict(state["modules"][key])
            optimizer.load_state_dict(state["optimizer"])
            self.step, self.log, self.done = state["step"], state["log"], state["finished"]
            self.seconds_before = state.get("seconds", 0.0)
            torch.set_rng_state(state["cpu_rng"].cpu())

    def elapsed(self) -> float:
        """Wall-clock seconds spent in this phase, over every run of it: a resumed run goes on where the
        interrupted one stopped, on the wall-clock cap and on the learning-rate schedule alike."""
        return self.seconds_before + time.time() - self.started

    def progress(self) -> float:
        """Fraction of the phase done, by steps or by wall clock, whichever is further along."""
        by_time = self.elapsed() / self.seconds if self.seconds else 0.0
        return min(1.0, max(self.step / self.steps, by_time))

    def lr(self, base: float, warmup: int = 200) -> float:
        """Linear warm-up, then cosine decay to zero at the end of the phase."""
        if self.step < warmup:
            return base * (self.step + 1) / warmup
        return base * 0.5 * (1 + math.cos(math.pi * self.progress()))

    def update(self, loss: torch.Tensor, params, bar, after_step=None) -> None:
        """One optimiser step on `loss` (gradients clipped to norm 1), `after_step()` (an EMA, say), then
        the bookkeeping: progress bar, loss log every 50 steps, checkpoint every `checkpoint_every`."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.optimizer.step()
        if after_step is not None:
            after_step()
        self.step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if self.step % 50 == 0:
            self.log.append({"step": self.step, "loss": loss.item()})
        if self.step % self.cfg.checkpoint_every == 0:
            self.save()

    def finish(self, bar) -> None:
        """Close the bar and mark the phase finished, so that a later run does not train it again."""
        bar.close()
        if not self.done:
            self.save(finished=True)

    def should_continue(self) -> bool:
        if self.step >= self.steps:
            return False
        return self.seconds is None or self.elapsed() < self.seconds

    def save(self, finished: bool = False) -> None:
        state = {
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "log": self.log,
            "cpu_rng": torch.get_rng_state(),
            "finished": finished,
            "seconds": self.elapsed(),
        }
        files.write_bytes(self.path, lambda f: torch.save(state, f), overwrite=True)


def autocast(cfg: TrainConfig):
    enabled = cfg.mixed_precision and cfg.device.startswith("cuda")
    return (
        torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)
        if enabled
        else torch.autocast("cpu", enabled=False)
    )


def to_pixels(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return images_u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8: the inverse of `to_pixels`."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


@torch.no_grad()
def vae_roundtrip(vae, images_u8: torch.Tensor) -> torch.Tensor:
    """Images (B, H, W, 3) uint8 as the VAE returns them (encoded to the latent mean, decoded): what a UNet
    that drew them exactly would produce."""
    pixels = to_pixels(images_u8).to(vae.device, vae.dtype)
    return to_uint8(vae.decode(vae.encode(pixels).latent_dist.mean).sample)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1 - decay)


# ---------------------------------------------------------------------------------------------------------
# 3. The phases


def train_vae(cfg: TrainConfig, images: torch.Tensor):
    """The VAE, new or (with `init_from`) continued from that pipeline's, so that a world with new colours
    keeps what the old VAE knew of edges and shapes."""
    torch.manual_seed(cfg.seed)
    vae = models.build_vae().to(cfg.device)
    if cfg.init_from:
        vae.load_state_dict(AutoencoderKL.from_pretrained(cfg.init_from, subfolder="vae").state_dict())
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    phase = Phase(cfg, "vae", cfg.vae_steps, {"vae": vae}, opt)
    gen = torch.Generator(cfg.device).manual_seed(cfg.seed + phase.step)
    bar = tqdm(total=cfg.vae_steps, initial=phase.step, desc="vae")
    while not phase.done and phase.should_continue():
        for g in opt.param_groups:
            g["lr"] = phase.lr(cfg.vae_lr)
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=gen, device=cfg.device)
        x = to_pixels(images[idx])  # (B, 3, 64, 64)
        with autocast(cfg):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=gen)).sample
        recon = recon.float()
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean()
        phase.update(loss, vae.parameters(), bar)
    phase.finish(bar)
    vae.eval()
    # SD's scaling factor: latents scaled to unit variance, measured on the pool.
    with torch.no_grad(), autocast(cfg):
        sample = vae.encode(to_pixels(images[: min(2048, len(images))])).latent_dist.mean.float()
    vae.register_to_config(scaling_factor=float(1.0 / sample.std()))
    return vae, phase.log


def cached(path: str, compute) -> torch.Tensor:
    """`compute()`, saved at `path` (atomically) the first time and loaded from there after, so that a
    resumed run does not spend its first minutes redoing it."""
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    value = compute()
    files.write_bytes(path, lambda f: torch.save(value, f), overwrite=True)
    return value


@torch.no_grad()
def encode_pool(cfg: TrainConfig, vae, images: torch.Tensor) -> torch.Tensor:
    """Latent means of every pool image, scaled as SD scales them: (N, 4, 16, 16); cached in `out/`."""

    def compute() -> torch.Tensor:
        out = []
        for i in tqdm(range(0, len(images), 1024), desc="encode", unit="batch"):
            with autocast(cfg):
                out.append(vae.encode(to_pixels(images[i : i + 1024])).latent_dist.mean.float().cpu())
        return torch.cat(out) * vae.config.scaling_factor

    path = os.path.join(cfg.out, f"latents-{len(images)}-{weights_fingerprint(vae)}.pt")
    return cached(path, compute).to(cfg.device)


@torch.no_grad()
def decode_pool(cfg: TrainConfig, vae, images: torch.Tensor) -> torch.Tensor:
    """The first `clip_decoded_pool` pool images as the VAE returns them, uint8 (R, H, W, 3); cached in
    `out/`. Generated images are decoded latents: slightly soft edges the CLIP must not mistake for
    another shape."""
    n = min(cfg.clip_decoded_pool, len(images))

    def compute() -> torch.Tensor:
        out = []
        for i in tqdm(range(0, n, 512), desc="decode", unit="batch"):
            with autocast(cfg):
                out.append(vae_roundtrip(vae, images[i : min(n, i + 512)]).cpu())
        return torch.cat(out)

    path = os.path.join(cfg.out, f"decoded-{n}-{weights_fingerprint(vae)}.pt")
    return cached(path, compute).to(cfg.device)


def text_encoder_for(cfg: TrainConfig, tokenizer) -> CLIPTextModel:
    """The text encoder a UNet phase starts from: a CLIP's text tower, the continued pipeline's, or a new one."""
    if cfg.text_encoder_from:
        return CLIPTextModel.from_pretrained(cfg.text_encoder_from, torch_dtype=torch.float32)
    if cfg.init_from:
        return CLIPTextModel.from_pretrained(
            cfg.init_from, subfolder="text_encoder", torch_dtype=torch.float32
        )
    return models.build_text_encoder(tokenizer)


def check_text_encoder_source(folder: str) -> None:
    """Fail before any slow work when `--text-encoder-from` is not a CLIP whose width the UNet reads."""
    from transformers import CLIPTextConfig

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"--text-encoder-from {folder!r} has no config.json; pass a transformers CLIPModel "
            "folder, such as src/cones_world/weights/clip."
        )
    width = CLIPTextConfig.from_pretrained(folder).hidden_size
    if width != models.TEXT_DIM:
        raise ValueError(
            f"--text-encoder-from {folder!r} has text width {width}, but the world UNet's "
            f"cross-attention reads {models.TEXT_DIM}; pass a CLIP with a {models.TEXT_DIM}-wide text tower."
        )


def freezes_text_encoder(cfg: TrainConfig) -> bool:
    return bool(cfg.freeze_text_encoder or cfg.text_encoder_from)


def train_unet(
    cfg: TrainConfig, latents: torch.Tensor, caption_ids: torch.Tensor, empty_ids: torch.Tensor, tokenizer
):
    """UNet and (unless frozen) text encoder together, epsilon prediction, min-SNR weighting, EMA of both."""
    torch.manual_seed(cfg.seed + 1)
    unet = models.build_unet().to(cfg.device)
    text_encoder = text_encoder_for(cfg, tokenizer).to(cfg.device)
    if cfg.init_from:
        unet.load_state_dict(
            UNet2DConditionModel.from_pretrained(cfg.init_from, subfolder="unet").state_dict()
        )
    frozen = freezes_text_encoder(cfg)
    text_encoder.requires_grad_(not frozen)
    ema_unet = models.build_unet().to(cfg.device)
    ema_text = copy.deepcopy(text_encoder)
    ema_unet.load_state_dict(unet.state_dict())
    for m in (ema_unet, ema_text):
        m.requires_grad_(False)
    params = list(unet.parameters()) + ([] if frozen else list(text_encoder.parameters()))
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    scheduler = models.build_train_scheduler()
    alphas = scheduler.alphas_cumprod.to(cfg.device)
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # min-SNR-gamma for epsilon prediction
    phase = Phase(
        cfg,
        "unet",
        cfg.unet_steps,
        {"unet": unet, "text": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text},
        opt,
    )
    gen = torch.Generator(cfg.device).manual_seed(cfg.seed + 10 + phase.step)
    n, variants = caption_ids.shape[:2]

    def update_ema() -> None:  # called after each optimiser step, before the step is counted
        decay = min(cfg.ema_decay, (1 + phase.step) / (10 + phase.step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)

    bar = tqdm(total=cfg.unet_steps, initial=phase.step, desc="unet")
    while not phase.done and phase.should_continue():
        for g in opt.param_groups:
            g["lr"] = phase.lr(cfg.unet_lr)
        b = cfg.unet_batch
        idx = torch.randint(0, n, (b,), generator=gen, device=cfg.device)
        which = torch.randint(0, variants, (b,), generator=gen, device=cfg.device)
        ids = caption_ids[idx, which]  # (B, T)
        drop = torch.rand(b, generator=gen, device=cfg.device) < cfg.caption_dropout
        ids = torch.where(drop[:, None], empty_ids[None], ids)
        x0 = latents[idx]  # (B, 4, 16, 16)
        noise = torch.randn(x0.shape, generator=gen, device=cfg.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen, device=cfg.device)
        xt = scheduler.add_noise(x0, noise, t)
        with autocast(cfg), torch.set_grad_enabled(not frozen):
            cond = text_encoder(ids)[0]  # (B, T, D)
        with autocast(cfg):
            pred = unet(xt, t, cond).sample
        per_sample = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * weights[t]).mean()
        phase.update(loss, params, bar, after_step=update_ema)
    phase.finish(bar)
    return ema_unet.eval(), ema_text.eval(), phase.log


def with_decoded(images: torch.Tensor, decoded: torch.Tensor, idx: torch.Tensor, use: torch.Tensor):
    """A batch of pool images `idx` where the `use` ones are shown decoded instead. A decoded image only
    exists for the first `len(decoded)` pool images, so those picks move there; the returned indices say
    which pool image (and so which captions) each batch image is."""
    idx = torch.where(use, idx % len(decoded), idx)
    return torch.where(use[:, None, None, None], decoded[idx % len(decoded)], images[idx]), idx


def train_clip(
    cfg: TrainConfig,
    images: torch.Tensor,
    detail_ids: torch.Tensor,
    tokenizer,
    decoded: torch.Tensor | None = None,
):
    """A small CLIP, contrastive on renders and their detailed captions; with `decoded` (the first pool
    images as the VAE returns them), a `clip_decoded_share` of each batch is shown in that form instead."""
    torch.manual_seed(cfg.seed + 2)
    clip = models.build_clip(tokenizer).to(cfg.device)
    if cfg.clip_init_from:
        warm_start_clip(clip, cfg.clip_init_from, tokenizer)
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.clip_lr, weight_decay=0.05)
    phase = Phase(cfg, "clip", cfg.clip_steps, {"clip": clip}, opt)
    gen = torch.Generator(cfg.device).manual_seed(cfg.seed + 20 + phase.step)
    mean = torch.tensor(CLIP_MEAN, device=cfg.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=cfg.device).view(1, 3, 1, 1)
    bar = tqdm(total=cfg.clip_steps, initial=phase.step, desc="clip")
    while not phase.done and phase.should_continue():
        for g in opt.param_groups:
            g["lr"] = phase.lr(cfg.clip_lr)
        idx = torch.randint(0, len(images), (cfg.clip_batch,), generator=gen, device=cfg.device)
        which = torch.randint(0, detail_ids.shape[1], (cfg.clip_batch,), generator=gen, device=cfg.device)
        batch = images[idx]
        if decoded is not None:
            use = torch.rand(cfg.clip_batch, generator=gen, device=cfg.device) < cfg.clip_decoded_share
            batch, idx = with_decoded(images, decoded, idx, use)
        pixels = ((to_pixels(batch) + 1) / 2 - mean) / std
        ids = detail_ids[idx, which]  # (B, T): the full caption or a partial one
        with autocast(cfg):
            out = clip(input_ids=ids, pixel_values=pixels, return_loss=True)
        loss = out.loss.float()
        phase.update(loss, clip.parameters(), bar)
    phase.finish(bar)
    return clip.eval(), phase.log


# ---------------------------------------------------------------------------------------------------------
# 4. Export


def declare_float32(config_path: str) -> None:
    """Weights are stored in fp16 to keep the package small; declare float32 so that transformers loads
    them in full precision by default, as diffusers does for the UNet and VAE."""

    def fix(node):
        if isinstance(node, dict):
            return {
                k: ("float32" if k in ("dtype", "torch_dtype") and v else fix(v)) for k, v in node.items()
            }
        return node

    with open(config_path) as f:
        config = fix(json.load(f))
    files.write_json(config_path, config, overwrite=True)


def export_pipeline(path: str, vae, unet, text_encoder, tokenizer, dtype=torch.float16) -> None:
    """Save a Stable Diffusion folder that `StableDiffusionPipeline.from_pretrained(path)` loads offline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae.to("cpu", dtype),
        text_encoder=text_encoder.to("cpu", dtype),
        tokenizer=tokenizer,
        unet=unet.to("cpu", dtype),
        scheduler=models.build_sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    declare_float32(os.path.join(path, "text_encoder", "config.json"))
    copy_bpe_files(os.path.join(os.path.dirname(path), "tokenizer"), os.path.join(path, "tokenizer"))


def export_clip(path: str, clip, tokenizer, dtype=torch.float16, vocabulary: str | None = None) -> None:
    """Save a transformers CLIPModel folder with its tokenizer and preprocessing config; `vocabulary` is the
    folder of the tokenizer's BPE files (default: the run's `clip_tokenizer`)."""
    clip.to("cpu", dtype).save_pretrained(path, safe_serialization=True)
    declare_float32(os.path.join(path, "config.json"))
    tokenizer.save_pretrained(path)
    copy_bpe_files(vocabulary or os.path.join(os.path.dirname(path), "clip_tokenizer"), path)
    size = clip.config.vision_config.image_size
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
        "resample": 3,
    }
    files.write_json(os.path.join(path, "preprocessor_config.json"), preprocessor, overwrite=True)


# ---------------------------------------------------------------------------------------------------------
# 5. The whole run


def train(cfg: TrainConfig, phases: tuple[str, ...] = ("vae", "unet", "clip")) -> dict:
    """Run the requested phases; exports `out/sd` and/or `out/clip`. Returns timings and loss logs.

    The pool of renders and the tokenizers are made first, whatever the phases ("pool" alone makes just
    them, so that two processes can then train different phases from the same pool at once)."""
    if cfg.text_encoder_from:
        check_text_encoder_source(cfg.text_encoder_from)
    if cfg.world not in ("v1", "v2"):
        raise ValueError(f"--world {cfg.world!r} is not one of 'v1', 'v2'.")
    if cfg.world == "v2" and "unet" in phases and not cfg.text_encoder_from:
        raise ValueError(
            "world v2 conditions the UNet on a frozen CLIP text tower: pass --text-encoder-from "
            "a CLIP folder trained on it first (--world v2 --phases clip exports OUT/clip)."
        )
    if cfg.clip_captions not in ("detailed", "diffusion"):
        raise ValueError(f"--clip-captions {cfg.clip_captions!r} is not one of 'detailed', 'diffusion'.")
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report: dict = {"config": asdict(cfg), "seconds": {}}
    t0 = time.time()
    if cfg.world == "v2":
        sd_tokenizer, clip_tokenizer = v2_tokenizers(cfg.out, cfg.text_encoder_from)
    else:
        sd_tokenizer, clip_tokenizer = world_tokenizers(
            cfg.out, cfg.init_from, cfg.clip_init_from, cfg.text_encoder_from
        )
    pool = render_pool(cfg)
    report["seconds"]["render"] = time.time() - t0
    if phases == ("pool",):
        return report
    images = torch.from_numpy(pool["images"]).to(cfg.device)
    clip_sees_decoded = "clip" in phases and cfg.clip_decoded_share > 0
    uses_vae = "unet" in phases or "export" in phases or clip_sees_decoded  # a trained VAE, not a new one
    trains_own_vae = "vae" in phases or os.path.exists(os.path.join(cfg.out, "checkpoint-vae.pt"))
    if cfg.init_from and uses_vae and not trains_own_vae:
        vae = AutoencoderKL.from_pretrained(cfg.init_from, subfolder="vae").to(cfg.device).eval()
    elif "vae" in phases or uses_vae:
        t = time.time()
        vae, report["vae_log"] = train_vae(cfg, images)
        report["seconds"]["vae"] = time.time() - t
    if "unet" in phases:
        t = time.time()
        latents = encode_pool(cfg, vae, images)
        caps = pool["captions"]  # (N, variants)
        length = sd_tokenizer.model_max_length
        ids = tokenize(sd_tokenizer, caps.reshape(-1), length).view(*caps.shape, -1).to(cfg.device)
        empty = tokenize(sd_tokenizer, [""], length)[0].to(cfg.device)
        unet, text_encoder, report["unet_log"] = train_unet(cfg, latents, ids, empty, sd_tokenizer)
        report["seconds"]["unet"] = time.time() - t
        export_pipeline(os.path.join(cfg.out, "sd"), vae, unet, text_encoder, sd_tokenizer)
    elif (
        "export" in phases
    ):  # the UNet phase as it stands in its last checkpoint: a long run looked at midway
        checkpoint = os.path.join(cfg.out, "checkpoint-unet.pt")
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(
                f"no UNet checkpoint to export in {cfg.out}: give the --out of a run that trained the unet phase."
            )
        state = torch.load(checkpoint, map_location=cfg.device, weights_only=False)
        unet, text_encoder = models.build_unet(), text_encoder_for(cfg, sd_tokenizer)
        unet.load_state_dict(state["modules"]["ema_unet"])
        text_encoder.load_state_dict(state["modules"]["ema_text"])
        report["unet_log"], report["unet_step"] = state["log"], state["step"]
        export_pipeline(os.path.join(cfg.out, "sd"), vae, unet.eval(), text_encoder.eval(), sd_tokenizer)
    if "clip" in phases:
        t = time.time()
        if cfg.clip_captions == "diffusion":  # the diffusion captions, read with the diffusion vocabulary
            vocabulary, texts = os.path.join(cfg.out, "tokenizer"), pool["captions"]
            tokenizer = CLIPTokenizer.from_pretrained(vocabulary, model_max_length=models.CLIP_MAX_TOKENS)
        else:  # every detail named: the evaluation CLIP
            vocabulary, texts, tokenizer = (
                os.path.join(cfg.out, "clip_tokenizer"),
                pool["details"],
                clip_tokenizer,
            )
        ids = tokenize(tokenizer, texts.reshape(-1), models.CLIP_MAX_TOKENS)
        ids = ids.view(*texts.shape, -1).to(cfg.device)
        decoded = decode_pool(cfg, vae, images) if clip_sees_decoded else None
        clip, report["clip_log"] = train_clip(cfg, images, ids, tokenizer, decoded)
        report["seconds"]["clip"] = time.time() - t
        export_clip(os.path.join(cfg.out, "clip"), clip, tokenizer, vocabulary=vocabulary)
    report["seconds"]["total"] = time.time() - t0
    files.write_json(
        os.path.join(cfg.out, f"report-{'-'.join(phases)}.json"), report, overwrite=True, indent=1
    )
    return report


if __name__ == "__main__":
    config, chosen = parse_args()
    train(config, chosen)
