"""Tiny *real* Stable Diffusion components built from configs, for fast offline tests.

Same classes as a real SD 1.x checkpoint (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTokenizer, a DDPM-family scheduler), a few thousand parameters each.
"""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from cones_world.tokenizer import build_clip_tokenizer

WORDS = "a an the photo of sks xqz dog cat mug red blue green on beach in snow with sunglasses".split()
IMAGE_SIZE = 16  # pixels; the VAE halves it, so latents are 8x8


def make_tiny_pipeline(tmp_dir: str, seed: int = 0) -> StableDiffusionPipeline:
    """Build a tiny SD pipeline; the tokenizer's files are written under `tmp_dir`."""
    tokenizer = build_clip_tokenizer(WORDS, os.path.join(tmp_dir, "tokenizer"), model_max_length=16)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
