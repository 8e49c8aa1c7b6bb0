"""The concept-implanting loss L_con = L_sub + λ·L_pr (paper eqs. 2-4), for any Stable-Diffusion-style model.

The concept-neuron search (`cones.search`) only ever asks an objective for one number per step:
`objective.loss(step)`, a differentiable scalar of the UNet's current weights. This module builds that
number the way DreamBooth does, on a diffusers `UNet2DConditionModel` with its frozen text encoder,
tokenizer, VAE and a DDPM-family noise scheduler:

    L_sub = E_{x, ε, t} ‖x̂θ(x_t, t, c_subject) − target‖²     x: subject images, c: "a photo of a sks dog"
    L_pr  = E_{x, ε, t} ‖x̂θ(x_t, t, c_class) − target‖²       x: class images,   c: "a photo of a dog"

with x_t = scheduler.add_noise(x, ε, t), and `target` what the model was trained to predict
(`scheduler.config.prediction_type`): ε, the velocity v = √ᾱ·ε − √(1−ᾱ)·x, or x itself. The weight ω_t
of the paper is 1, as in DreamBooth and the Stable Diffusion training scripts.

The VAE and the text encoder are frozen, so images are encoded to latents and prompts to embeddings once,
when the objective is built. Latents are the *mean* of the VAE posterior (scaled by
`vae.config.scaling_factor`): deterministic, and the posterior's spread is far below the noise the
diffusion loss adds anyway.

Each `loss(step)` draws its batch (which images, which prompt templates), timesteps and noise from a
`torch.Generator` seeded from `(seed, step)`: the loss at a step depends on nothing but the seed and the
step number. A search that resumes at step k therefore sees exactly the noise an uninterrupted search would
have seen, and two calls of `loss(k)` at the same weights return the same value. Random numbers are drawn
on the CPU and then moved, so the draw does not depend on the device.

The module is longer than most because one class, `ConceptObjective`, is most of it: encoding the images
and prompts once, drawing a step's batch, and the per-row loss share its state and are read together. Its
settings, `ObjectiveConfig`, live in `cones.config` with the search's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cones.config import ObjectiveConfig

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline, SchedulerMixin
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ConceptObjective",
    "Objective",
    "ObjectiveBatch",
    "ObjectiveConfig",
    "SumObjective",
    "step_generator",
]

_ENCODE_CHUNK = 8  # images per VAE call when encoding once at construction


class Objective(Protocol):
    """What the concept-neuron search needs: a differentiable scalar for each step.

    `loss(step)` must evaluate the UNet handed to the search (the search writes candidate weights into it)
    and must be a deterministic function of `step` and the current weights. An objective may also have
    `describe()`, a JSON-able dict of what determines it; the search then records it in the concept and
    refuses to resume a checkpoint made with another.
    """

    def loss(self, step: int) -> torch.Tensor: ...


def _per_image(prompts: Sequence[str], n: int, name: str) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != n:
        raise ValueError(f"`{name}` has {len(prompts)} prompts for {n} images; give one prompt per image.")
    return prompts


def _digest(*tensors: torch.Tensor | None) -> str:
    """A short hash of the pixels: the same pictures give the same digest on any machine."""
    h = hashlib.sha256()
    for t in tensors:
        if isinstance(t, torch.Tensor):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        else:
            h.update(b"none")
    return h.hexdigest()[:16]


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded from `(seed, step)` alone, so a step's random draw never depends on history."""
    mixed = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(mixed) & (2**63 - 1))


@dataclass
class ObjectiveBatch:
    """One step's draw: subject rows first, then class rows. All tensors on the objective's device."""

    latents: torch.Tensor  # (rows, C, h, w) clean latents x (scaled VAE means)
    noise: torch.Tensor  # (rows, C, h, w) ε ~ N(0, I)
    timesteps: torch.Tensor  # (rows,) int64 in [0, num_train_timesteps)
    prompt_embeds: torch.Tensor  # (rows, tokens, dim) text-encoder output for each row's prompt
    num_subject: int  # rows [0, num_subject) are subject rows, the rest class rows


class ConceptObjective:
    """L_con = L_sub + λ·L_pr on a diffusers UNet; `loss(step)` is deterministic in (seed, step).

    Args:
        unet: the `UNet2DConditionModel` whose weights the search varies; it is called, never modified.
        text_encoder: frozen text encoder (e.g. `CLIPTextModel`); called once per prompt template.
        tokenizer: its tokenizer; prompts are padded to `tokenizer.model_max_length`.
        noise_scheduler: a DDPM-family scheduler with `add_noise` (and `get_velocity` for v-prediction).
        vae: frozen `AutoencoderKL`, or None for pixel-space models (then the images are the samples).
        subject_images: (N, 3, H, W) in [-1, 1], the few pictures of the subject.
        token: the identifier word bound to the subject, e.g. "sks".
        class_word: the subject's class, e.g. "dog".
        class_images: (M, 3, H, W) in [-1, 1], pictures of other members of the class, or None for no
            prior-preservation term (L_con = L_sub).
        config: templates, batch size, λ and seed.
        subject_prompts: one prompt per subject image, used instead of the templates when the images need
            different words (an accessory on different carriers: "a circle wearing a sks hat", ...).
        class_prompts: likewise, one prompt per class image.
        device: where latents, embeddings and the loss live; defaults to the UNet's device.
        dtype: dtype of latents and embeddings fed to the UNet; defaults to the UNet's dtype. The loss
            itself is reduced in float32 (float64 for a float64 model).
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        noise_scheduler: SchedulerMixin,
        vae: nn.Module | None,
        subject_images: torch.Tensor,
        *,
        token: str,
        class_word: str,
        class_images: torch.Tensor | None = None,
        config: ObjectiveConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        subject_prompts: Sequence[str] | None = None,
        class_prompts: Sequence[str] | None = None,
    ) -> None:
        self.config = config if config is not None else ObjectiveConfig()
        self.unet = unet
        self.noise_scheduler = noise_scheduler
        self.token = token
        self.class_word = class_word
        self.device = torch.device(device) if device is not None else unet.device
        self.dtype = dtype if dtype is not None else unet.dtype
        self.prediction_type = noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"`noise_scheduler` predicts {self.prediction_type!r}; expected 'epsilon', 'v_prediction' or 'sample'."
            )
        if self.prediction_type == "v_prediction" and not hasattr(noise_scheduler, "get_velocity"):
            raise ValueError(
                f"`noise_scheduler` ({type(noise_scheduler).__name__}) has no `get_velocity` for v-prediction; "
                "pass a DDPMScheduler built with `DDPMScheduler.from_config(scheduler.config)`."
            )
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
        self.data_digest = _digest(subject_images, class_images)

        # 1. Encode the images once: the VAE is frozen, so their latents never change.
        self.subject_latents = self._encode_images(vae, subject_images, "subject_images")  # (N, C, h, w)
        self.class_latents = (
            None if class_images is None else self._encode_images(vae, class_images, "class_images")
        )  # (M, C, h, w) or None
        if self.class_latents is not None and self.class_latents.shape[1:] != self.subject_latents.shape[1:]:
            raise ValueError(
                f"`class_images` give latents of shape {tuple(self.class_latents.shape[1:])} but `subject_images` "
                f"{tuple(self.subject_latents.shape[1:])}; resize both to the same height and width."
            )

        # 2. Encode the prompts once: one embedding per template.
        cfg = self.config
        self.subject_prompts = (
            _per_image(subject_prompts, len(self.subject_latents), "subject_prompts")
            if subject_prompts is not None
            else [t.format(token=token, class_word=class_word) for t in cfg.subject_templates]
        )
        n_class = 0 if self.class_latents is None else len(self.class_latents)
        self.class_prompts = (
            _per_image(class_prompts, n_class, "class_prompts")
            if class_prompts is not None
            else [t.format(class_word=class_word) for t in cfg.class_templates]
        )
        self.per_image_subject = subject_prompts is not None
        self.per_image_class = class_prompts is not None
        self.subject_embeds = self._encode_prompts(
            text_encoder, tokenizer, self.subject_prompts
        )  # (Ts, L, D)
        self.class_embeds = self._encode_prompts(text_encoder, tokenizer, self.class_prompts)  # (Tc, L, D)

    @classmethod
    def from_pipeline(
        cls,
        pipe: DiffusionPipeline,
        subject_images: torch.Tensor,
        *,
        token: str,
        class_word: str,
        class_images: torch.Tensor | None = None,
        config: ObjectiveConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        subject_prompts: Sequence[str] | None = None,
        class_prompts: Sequence[str] | None = None,
    ) -> ConceptObjective:
        """Build the objective from a `StableDiffusionPipeline`-like object.

        The noise scheduler is a `DDPMScheduler` made from the pipeline scheduler's config (same betas and
        prediction type), as the diffusers training scripts do: sampling schedulers need not add noise.
        """
        from diffusers import DDPMScheduler

        return cls(
            pipe.unet,
            pipe.text_encoder,
            pipe.tokenizer,
            DDPMScheduler.from_config(pipe.scheduler.config),
            pipe.vae,
            subject_images,
            token=token,
            class_word=class_word,
            class_images=class_images,
            config=config,
            device=device,
            dtype=dtype,
            subject_prompts=subject_prompts,
            class_prompts=class_prompts,
        )

    def describe(self) -> dict:
        """What determines this loss besides the model: images (counted, and a digest of their pixels),
        prompts, batch size, λ and seed."""
        cfg = self.config
        return {
            "subject_images": len(self.subject_latents),
            "class_images": 0 if self.class_latents is None else len(self.class_latents),
            "subject_prompts": list(dict.fromkeys(self.subject_prompts)),
            "class_prompts": list(dict.fromkeys(self.class_prompts))
            if self.class_latents is not None
            else [],
            "batch_size": cfg.batch_size,
            "prior_weight": cfg.prior_weight,
            "seed": cfg.seed,
            "data": self.data_digest,
        }

    @torch.no_grad()
    def _encode_images(self, vae: nn.Module | None, images: torch.Tensor, name: str) -> torch.Tensor:
        """(n, 3, H, W) in [-1, 1] -> (n, C, h, w) scaled latent means on `self.device` in `self.dtype`."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"`{name}` must be a (N, 3, H, W) tensor with N >= 1, got {shape}.")
        lo, hi = images.min().item(), images.max().item()
        if lo < -1.001 or hi > 1.001:
            raise ValueError(
                f"`{name}` must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; map x to 2*x/255 - 1."
            )
        if vae is None:
            return images.to(self.device, self.dtype)
        if images.shape[1] != vae.config.in_channels:
            raise ValueError(
                f"`{name}` has {images.shape[1]} channels; the VAE expects {vae.config.in_channels}."
            )
        chunks = []
        for chunk in images.split(_ENCODE_CHUNK):
            mean = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist.mean  # (n, C, h, w)
            chunks.append(mean)
        latents = torch.cat(chunks)  # (n, C, h, w)
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return (latents * vae.config.scaling_factor).to(self.device, self.dtype)

    @torch.no_grad()
    def _encode_prompts(
        self, text_encoder: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]
    ) -> torch.Tensor:
        """Prompts -> (len(prompts), tokenizer.model_max_length, dim) on `self.device` in `self.dtype`."""
        max_length = tokenizer.model_max_length
        for prompt in prompts:
            n = len(tokenizer(prompt).input_ids)
            if n > max_length:
                raise ValueError(
                    f"prompt {prompt!r} is {n} tokens, over the tokenizer's {max_length}; shorten the template."
                )
        ids = tokenizer(
            list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids  # (T, L)
        embeds = text_encoder(ids.to(text_encoder.device))[0]  # (T, L, D)
        return embeds.to(self.device, self.dtype)

    def draw(self, step: int) -> ObjectiveBatch:
        """The batch, timesteps and noise of `step`: a function of `(config.seed, step)` only (not of λ)."""
        cfg, gen = self.config, step_generator(self.config.seed, step)
        b = cfg.batch_size

        # 1. Which subject images and which identifier prompts (uniform, with replacement).
        image_idx = torch.randint(len(self.subject_latents), (b,), generator=gen)
        prompt_idx = torch.randint(len(self.subject_embeds), (b,), generator=gen)
        if self.per_image_subject:
            prompt_idx = image_idx
        latents = [self.subject_latents[image_idx.to(self.device)]]  # (b, C, h, w)
        embeds = [self.subject_embeds[prompt_idx.to(self.device)]]  # (b, L, D)

        # 2. The same number of class images with class prompts, for the prior-preservation term.
        if self.class_latents is not None:
            image_idx = torch.randint(len(self.class_latents), (b,), generator=gen)
            prompt_idx = torch.randint(len(self.class_embeds), (b,), generator=gen)
            if self.per_image_class:
                prompt_idx = image_idx
            latents.append(self.class_latents[image_idx.to(self.device)])  # (b, C, h, w)
            embeds.append(self.class_embeds[prompt_idx.to(self.device)])  # (b, L, D)
        x = torch.cat(latents)  # (rows, C, h, w)

        # 3. Timesteps uniform in [0, T) and standard Gaussian noise.
        timesteps = torch.randint(self.num_train_timesteps, (len(x),), generator=gen)  # (rows,)
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32)  # (rows, C, h, w)
        return ObjectiveBatch(
            latents=x,
            noise=noise.to(self.device, self.dtype),
            timesteps=timesteps.to(self.device),
            prompt_embeds=torch.cat(embeds),
            num_subject=b,
        )

    def row_losses(self, batch: ObjectiveBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The diffusion loss of each row of `batch`, or of the rows `rows` ((r,) int64) only.

        ‖x̂θ(x_t, t, c) − target‖² averaged over each row's latent: (rows,) float32 (float64 for a float64
        model), differentiable in the UNet's weights.
        """
        latents, noise, timesteps, embeds = batch.latents, batch.noise, batch.timesteps, batch.prompt_embeds
        if rows is not None:
            idx = rows.to(latents.device)
            latents, noise, timesteps, embeds = latents[idx], noise[idx], timesteps[idx], embeds[idx]
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)  # (rows, C, h, w)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        pred = self.unet(noisy, timesteps, embeds).sample  # (rows, C, h, w)
        dtype = torch.promote_types(
            pred.dtype, torch.float32
        )  # reduce in float32, or float64 for float64 models
        return F.mse_loss(pred.to(dtype), target.to(dtype), reduction="none").flatten(1).mean(1)  # (rows,)

    def loss(self, step: int) -> torch.Tensor:
        """L_sub + λ·L_pr at `step`: a float32 (or float64) scalar, differentiable in the UNet's weights."""
        batch = self.draw(step)
        per_row = self.row_losses(batch)  # (rows,)
        loss = per_row[: batch.num_subject].mean()
        if len(per_row) > batch.num_subject:
            loss = loss + self.config.prior_weight * per_row[batch.num_subject :].mean()
        return loss


class SumObjective:
    """The sum of several objectives, e.g. one per subject (the multi-concept loss of paper sec. 3.3).

    Every part must evaluate the same UNet. `token` and `class_word` are the parts' common value, or None
    when they differ (as for a union of `ConceptNeurons`).
    """

    def __init__(self, objectives: Sequence[Objective]) -> None:
        if len(objectives) == 0:
            raise ValueError("`objectives` is empty; pass at least one objective to sum.")
        self.objectives = list(objectives)
        tokens = {getattr(o, "token", None) for o in self.objectives}
        class_words = {getattr(o, "class_word", None) for o in self.objectives}
        self.token = tokens.pop() if len(tokens) == 1 else None
        self.class_word = class_words.pop() if len(class_words) == 1 else None

    def describe(self) -> dict:
        """The parts' descriptions, in order (a part without `describe` is named by its type)."""
        return {
            "parts": [
                o.describe() if hasattr(o, "describe") else {"type": type(o).__name__}
                for o in self.objectives
            ]
        }

    def loss(self, step: int) -> torch.Tensor:
        """Σ_i objectives[i].loss(step)."""
        total = self.objectives[0].loss(step)
        for objective in self.objectives[1:]:
            total = total + objective.loss(step)
        return total
