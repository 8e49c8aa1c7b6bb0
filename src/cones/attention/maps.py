"""The cross-attention maps of one prompt (paper sec. 3.2, figure 2), and how well a map outlines a mask.

`attention_maps(pipe, prompt, seed=...)` generates an image from noise while `CrossAttentionRecorder`
records; the image is the one `cones.generate.generate` makes with the same seed (the recorder does not change
the computation). `record_maps` records around any way of making the image (`cones.attention.img2img` denoises
a given picture). Where the subject's true mask is known (a rendered scene), `attention_share` and `top_iou`
measure how well a token's map outlines it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from cones import GUIDANCE_SCALE
from cones.attention.record import CrossAttentionRecorder, Size, as_pair

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from cones.neurons import ConceptNeurons

__all__ = ["AttentionMaps", "attention_maps", "attention_share", "record_maps", "top_iou"]


@dataclass
class AttentionMaps:
    """Cross-attention maps of one prompt on one image, averaged over steps, heads and layers.

    `probabilities[k]` is the mean share of attention that text position k (0: the start marker, then the
    prompt's tokens, the end marker and padding) receives at each pixel; over k it sums to 1 everywhere.
    """

    prompt: str
    tokens: list[str]  # the prompt's tokens, in order, without start and end markers
    probabilities: torch.Tensor  # (text positions, H, W) float32
    image: Image.Image  # the image the maps belong to (the generated or denoised picture)
    layers: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (text, h, w), each layer's own
    calls: int = 0  # cross-attention calls averaged: UNet evaluations x cross-attention layers

    @property
    def maps(self) -> torch.Tensor:
        """(tokens, H, W): the maps of the prompt's tokens, in the order of `tokens`."""
        return self.probabilities[1 : 1 + len(self.tokens)]

    @property
    def prompt_maps(self) -> torch.Tensor:
        """(tokens, H, W): `maps` renormalised over the prompt's tokens, summing to 1 at every pixel.

        Each token's share of the attention that the prompt's own tokens receive, leaving out the start and
        end markers and the padding (as Attend-and-Excite does): those take most of the attention in many
        models, and their spatial pattern, shared by every token's raw map, cancels here.
        """
        maps = self.maps
        return maps / maps.sum(0, keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)

    def maps_over(self, over: str) -> torch.Tensor:
        """(tokens, H, W): `maps` for `over="text"`, `prompt_maps` for `over="prompt"`."""
        if over == "text":
            return self.maps
        if over == "prompt":
            return self.prompt_maps
        raise ValueError(f"`over` must be 'text' or 'prompt', got {over!r}")

    def token_map(self, word: str, *, over: str = "text") -> torch.Tensor:
        """(H, W): the map of `word` (the mean over its tokens when it spans several; its first occurrence).

        `over="text"`: from `maps` (share of all text positions); `over="prompt"`: from `prompt_maps`.
        """
        maps = self.maps_over(over)
        target = word.strip().lower()
        for i in range(len(self.tokens)):
            text = ""
            for j in range(i, len(self.tokens)):
                text += self.tokens[j].lower()
                if text == target:
                    return maps[i : j + 1].mean(0)
                if len(text) >= len(target):
                    break
        raise ValueError(
            f"`word` {word!r} is not among the tokens {self.tokens} of {self.prompt!r}; pass one of them"
        )


def _prompt_tokens(pipe: StableDiffusionPipeline, prompt: str) -> list[str]:
    tokenizer = pipe.tokenizer
    ids = tokenizer(prompt).input_ids
    if len(ids) > tokenizer.model_max_length:
        raise ValueError(
            f"`prompt` {prompt!r} is {len(ids)} tokens, over the tokenizer's {tokenizer.model_max_length}; "
            "shorten it"
        )
    return [tokenizer.decode([i]).strip() for i in ids[1:-1]]


def record_maps(
    pipe: StableDiffusionPipeline,
    prompt: str,
    draw: Callable[[], Image.Image],
    *,
    resolution: Size | None = None,
    concept: ConceptNeurons | None = None,
) -> AttentionMaps:
    """The maps of `prompt` recorded while `draw()` makes its image with `pipe` (`concept` shut meanwhile).

    `resolution` is the size of the maps (default: the latent size, e.g. 64 for SD 1.x, 16 for the world).
    """
    tokens = _prompt_tokens(pipe, prompt)
    with ExitStack() as stack:
        if concept is not None:
            stack.enter_context(concept.shut(pipe.unet))
        latent_size = as_pair(pipe.unet.config.sample_size)
        recorder = stack.enter_context(CrossAttentionRecorder(pipe.unet, latent_size))
        image = draw()
    return AttentionMaps(
        prompt=prompt,
        tokens=tokens,
        probabilities=recorder.average(resolution),
        image=image,
        layers=recorder.layer_maps(),
        calls=recorder.calls,
    )


def attention_maps(
    pipe: StableDiffusionPipeline,
    prompt: str,
    *,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = GUIDANCE_SCALE,
    resolution: Size | None = None,
    concept: ConceptNeurons | None = None,
) -> AttentionMaps:
    """Generate one image of `prompt` and return its cross-attention maps.

    The image is the one `cones.generate.generate(pipe, [prompt], [seed], ...)` makes (the recorder does not
    change the computation). `concept`, when given, is shut during the call and restored after it.
    `resolution` is the size of the maps (default: the latent size, e.g. 64 for SD 1.x, 16 for the world).
    """
    from cones.generate import generate

    def draw() -> Image.Image:
        return generate(pipe, [prompt], [seed], steps=steps, guidance_scale=guidance_scale)[0][0]

    return record_maps(pipe, prompt, draw, resolution=resolution, concept=concept)


# -- masks and overlap ----------------------------------------------------------------------------------


def _check_pair(
    attention: torch.Tensor | np.ndarray, mask: np.ndarray | torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(attention, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    if a.shape != m.shape or a.ndim != 2:
        raise ValueError(
            f"`attention` {a.shape} and `mask` {m.shape} must be 2-D of one shape; resample the map to the "
            "mask's size (`resolution=`)"
        )
    if not m.any():
        raise ValueError("`mask` is empty; pass the mask of a visible object")
    return a, m


def attention_share(attention: torch.Tensor | np.ndarray, mask: np.ndarray | torch.Tensor) -> float:
    """Share of the map's mass inside `mask`: Σ a·m / Σ a. A uniform map scores the mask's area share."""
    a, m = _check_pair(attention, mask)
    total = a.sum()
    return float(a[m].sum() / total) if total > 0 else float("nan")


def top_iou(
    attention: torch.Tensor | np.ndarray, mask: np.ndarray | torch.Tensor, q: float | None = None
) -> float:
    """IoU of the map's top-`q` share of pixels with `mask` (`q` defaults to the mask's area share).

    Ties at the cut are broken by position (the first pixels in raster order win).
    """
    a, m = _check_pair(attention, mask)
    q = m.mean() if q is None else q
    if not 0.0 < q <= 1.0:
        raise ValueError(f"`q` must be in (0, 1], got {q}; e.g. 0.1 for the top 10% of pixels")
    k = max(1, int(round(q * a.size)))
    order = np.argsort(-a.reshape(-1), kind="stable")[:k]
    top = np.zeros(a.size, dtype=bool)
    top[order] = True
    top = top.reshape(a.shape)
    return float((top & m).sum() / (top | m).sum())
