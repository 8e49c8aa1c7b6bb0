"""The embedded world: a procedural scene renderer, its vocabulary and subjects, and the small
Stable-Diffusion-format model (and evaluation CLIP) trained on it.

A client of the `cones` library like any user's model and data: it registers itself as the default model
(`default_model`, through the `cones.default_model` entry point) and adds the `demo` and `train-world`
subcommands (`cones_world.commands`). The library never imports it.
"""

from __future__ import annotations

import os

WEIGHTS = os.path.join(os.path.dirname(__file__), "weights")
NAME = "cones-world"


def model_path() -> str:
    """The embedded Stable Diffusion folder (diffusers format)."""
    return os.path.join(WEIGHTS, "sd")


def clip_path() -> str:
    """The embedded evaluation CLIP folder (transformers format)."""
    return os.path.join(WEIGHTS, "clip")


def default_model():
    """The world as `cones`' default model: its weights, its CLIP, its caption words and its subjects."""
    from cones.registry import DefaultModel

    def vocabulary():
        from cones_world.scene import caption_words

        return caption_words()

    def subjects():
        from cones_world.concepts import example_subjects

        return example_subjects()

    return DefaultModel(NAME, model_path(), clip_path(), vocabulary=vocabulary, subjects=subjects)
