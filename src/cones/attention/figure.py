"""The picture of attention maps: per row, the image and each token's map as a heatmap over it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from cones.attention.maps import AttentionMaps
from cones.attention.record import resample

__all__ = ["attention_figure", "heatmap"]

# Anchor colours of a perceptually ordered dark-to-bright ramp (close to matplotlib's "inferno").
_RAMP = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)


def heatmap(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours of a dark-to-bright ramp."""
    x = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    frac = (x - lo)[..., None]
    return np.rint(_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).astype(np.uint8)


def _overlay(image: Image.Image, attention: torch.Tensor, size: int, alpha: float) -> Image.Image:
    """The map, stretched to [0, 1] between its minimum and maximum, as a heatmap over the image."""
    a = resample(attention[None].float(), size)[0].numpy()
    spread = a.max() - a.min()
    a = (a - a.min()) / spread if spread > 0 else np.zeros_like(a)
    base = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float64)
    mixed = (1 - alpha) * base + alpha * heatmap(a)
    return Image.fromarray(np.rint(mixed).astype(np.uint8))


def attention_figure(
    rows: Sequence[AttentionMaps],
    labels: Sequence[str] | None = None,
    *,
    over: str = "prompt",
    panel: int = 128,
    alpha: float = 0.6,
) -> Image.Image:
    """One picture: per row, its image, then each token's map as a heatmap over that image.

    `over="prompt"` (default) shows `prompt_maps` (each token's share among the prompt's tokens),
    `over="text"` the raw `maps` (share of all text positions). Each map is stretched between its own
    minimum and maximum (dark: least, bright: most attention), so the caption above it gives the token and
    its mean share over the pixels: maps of a flat attention look as contrasted as sharp ones, the share
    tells them apart. `labels` name the rows (e.g. "before", "after").
    """
    if not rows:
        raise ValueError("`rows` is empty; pass at least one AttentionMaps")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"`labels` has {len(labels)} entries for {len(rows)} rows; give one per row")
    font = ImageFont.load_default()
    caption, gap = 14, 4
    label_w = 0 if labels is None else 8 + max(int(font.getlength(str(t))) for t in labels)
    columns = 1 + max(len(r.tokens) for r in rows)
    width = label_w + columns * (panel + gap) + gap
    height = len(rows) * (caption + panel + gap) + gap
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    for i, row in enumerate(rows):
        top = gap + i * (caption + panel + gap)
        if labels is not None:
            draw.text((4, top + caption + panel // 2 - 6), str(labels[i]), fill="black", font=font)
        x = label_w + gap
        draw.text((x, top), "image", fill="black", font=font)
        picture.paste(row.image.convert("RGB").resize((panel, panel), Image.BICUBIC), (x, top + caption))
        maps = row.maps_over(over)
        for j, token in enumerate(row.tokens):
            x = label_w + gap + (j + 1) * (panel + gap)
            share = float(maps[j].mean())
            draw.text((x, top), f"{token} {share:.3f}", fill="black", font=font)
            picture.paste(_overlay(row.image, maps[j], panel, alpha), (x, top + caption))
    return picture
