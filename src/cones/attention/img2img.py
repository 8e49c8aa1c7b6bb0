"""Attention maps of a given picture: noise it part of the way and denoise it with a prompt, recording.

As img2img does, written out here (`denoise_from`), so that the picture's layout, and with it the masks of its
objects, stays valid for the maps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image

from cones import GUIDANCE_SCALE
from cones.attention.maps import AttentionMaps, record_maps
from cones.attention.record import Size
from cones.images import model_resolution, square, to_tensor

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from cones.neurons import ConceptNeurons

__all__ = ["attention_maps_for_image", "denoise_from"]


@torch.no_grad()
def denoise_from(
    pipe: StableDiffusionPipeline,
    prompt: str,
    image: Image.Image,
    *,
    seed: int,
    strength: float,
    steps: int,
    guidance_scale: float,
) -> Image.Image:
    """Noise `image` to the timestep `strength` of the way up the schedule and denoise it with `prompt`."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    pixels = to_tensor([square(image.convert("RGB"), model_resolution(pipe))]).to(device, pipe.vae.dtype)

    # 1. The clean latents (the mean of the VAE posterior) and the schedule's tail from `strength`.
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor  # (1, C, h, w)
    latents = latents.to(dtype)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # leaves the pipeline's own untouched
    scheduler.set_timesteps(steps, device=device)
    start = steps - min(steps, max(1, int(round(steps * strength))))
    order = getattr(scheduler, "order", 1)
    timesteps = scheduler.timesteps[start * order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * order)

    # 2. Noise them to the first remaining timestep (noise drawn on the CPU, as `generate` does).
    noise = torch.randn(
        latents.shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32
    )
    latents = scheduler.add_noise(latents, noise.to(device, dtype), timesteps[:1])

    # 3. Text embeddings: [unconditional, conditional] under classifier-free guidance.
    guided = guidance_scale > 1.0
    cond, uncond = pipe.encode_prompt(prompt, device, 1, guided)  # (1, text, dim) each
    embeds = torch.cat([uncond, cond]) if guided else cond

    # 4. The denoising loop.
    for t in timesteps:
        model_in = torch.cat([latents] * 2) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        pred = pipe.unet(model_in, t, encoder_hidden_states=embeds).sample
        if guided:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
        latents = scheduler.step(pred, t, latents).prev_sample

    # 5. Decode.
    decoded = pipe.vae.decode(
        latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
    ).sample  # (1, 3, H, W)
    array = ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def attention_maps_for_image(
    pipe: StableDiffusionPipeline,
    prompt: str,
    image: Image.Image,
    *,
    strength: float = 0.6,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = GUIDANCE_SCALE,
    resolution: Size | None = None,
    concept: ConceptNeurons | None = None,
) -> AttentionMaps:
    """Noise `image` part of the way and denoise it with `prompt`, recording the cross-attention maps.

    `image` is centre-cropped to a square at the model's resolution. `strength` in (0, 1] is the share of
    the `steps` sampling steps that are run: 1 starts from (nearly) pure noise, small values keep the
    picture's layout, so its objects' masks stay valid for the maps. The returned `image` is the denoised
    picture. `concept`, when given, is shut during the call.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"`strength` must be in (0, 1], got {strength}; e.g. 0.6")
    if steps < 1:
        raise ValueError(f"`steps` must be at least 1, got {steps}; e.g. 25")

    def draw() -> Image.Image:
        return denoise_from(
            pipe, prompt, image, seed=seed, strength=strength, steps=steps, guidance_scale=guidance_scale
        )

    return record_maps(pipe, prompt, draw, resolution=resolution, concept=concept)
