"""The embedded world: a procedural scene renderer, its vocabulary and subjects, and the small
Stable-Diffusion-format model (and evaluation CLIP) trained on it that cones ships as its defaults."""

from __future__ import annotations

import os

WEIGHTS = os.path.join(os.path.dirname(__file__), "weights")


def model_path() -> str:
    """The embedded Stable Diffusion folder (diffusers format)."""
    return os.path.join(WEIGHTS, "sd")


def clip_path() -> str:
    """The embedded evaluation CLIP folder (transformers format)."""
    return os.path.join(WEIGHTS, "clip")
