"""Continuous colours and the words that name them.

A colour is any RGB triple; a caption names it by the nearest of a dozen colour words, measured in CIELAB
(where distance roughly follows what the eye sees), as a person writing alt text would. So "a red circle"
covers a whole region of reds, and one particular red (a subject's) is never pinned down by a word.
"""

from __future__ import annotations

import colorsys
import random

import numpy as np

RGB = tuple[int, int, int]

# The colour words and their prototypes. Captions use only these words; renders use any colour.
COLOUR_WORDS: dict[str, RGB] = {
    "red": (215, 40, 40),
    "orange": (240, 135, 30),
    "yellow": (240, 215, 40),
    "green": (50, 165, 60),
    "cyan": (40, 195, 210),
    "blue": (40, 80, 215),
    "purple": (135, 60, 185),
    "pink": (240, 130, 190),
    "brown": (125, 80, 40),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
}


def to_lab(rgb) -> np.ndarray:
    """sRGB (0-255, (..., 3)) to CIELAB (D65), (..., 3)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_WORD_LAB = to_lab(list(COLOUR_WORDS.values()))


def distance(a: RGB, b: RGB) -> float:
    """Perceptual distance between two colours (CIE76 delta E: about 2.3 is just noticeable)."""
    return float(np.linalg.norm(to_lab(a) - to_lab(b)))


def colour_word(rgb: RGB) -> str:
    """The colour word nearest to `rgb`."""
    return list(COLOUR_WORDS)[int(np.argmin(np.linalg.norm(_WORD_LAB - to_lab(rgb), axis=-1)))]


def colour_margin(rgb: RGB) -> float:
    """How much nearer `rgb` is to its colour word than to the next word (delta E): near 0 on a boundary,
    where "red" or "orange" are both fair names."""
    nearest, second = np.sort(np.linalg.norm(_WORD_LAB - to_lab(rgb), axis=-1))[:2]
    return float(second - nearest)


def sample_colour(rng: random.Random) -> RGB:
    """A colour from the whole gamut: mostly saturated hues of any angle, sometimes a gray level."""
    if rng.random() < 0.15:
        level = rng.choice((rng.uniform(15, 60), rng.uniform(100, 160), rng.uniform(215, 250)))
        return (round(level),) * 3
    if rng.random() < 0.08:  # browns and other dark, muted hues
        r, g, b = colorsys.hsv_to_rgb(rng.uniform(0.02, 0.12), rng.uniform(0.5, 0.8), rng.uniform(0.35, 0.55))
    else:
        r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.55, 0.95), rng.uniform(0.7, 0.97))
    return (round(255 * r), round(255 * g), round(255 * b))


def sample_contrasting(rng: random.Random, *others: RGB, min_distance: float = 30.0) -> RGB:
    """A colour at least `min_distance` from each of `others`, so that a pattern or an object stands out."""
    while True:
        colour = sample_colour(rng)
        if all(distance(colour, other) >= min_distance for other in others):
            return colour


def near(rgb: RGB, rng: random.Random, spread: float = 12.0) -> RGB:
    """`rgb` moved by a little noise in each channel: the same colour as a different photo shows it."""
    return tuple(int(np.clip(round(c + rng.gauss(0, spread / 2)), 0, 255)) for c in rgb)  # type: ignore[return-value]
