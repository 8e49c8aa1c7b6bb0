"""Reading a user's reference images: any common format, any size, grayscale or with transparency.

Each image is converted to RGB (transparency composited on white), centre-cropped to a square and resized
to the model's resolution. What cannot be used stops with one line that names the file and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cones.errors import InputError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MIN_SIDE = 16  # pixels; below this there is nothing left of a subject to find
MAX_PIXELS = 50_000_000  # refuse decompression bombs instead of exhausting memory


class ImageError(InputError):
    """A reference image (or folder) that cannot be used; the message says what to do."""


def image_files(folder: str) -> list[str]:
    """The image files in `folder` (by extension, hidden files left out), sorted by name; [] when none."""
    return sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if f.lower().endswith(EXTENSIONS) and not f.startswith(".")
    )


def list_images(folder: str) -> list[str]:
    """The image files in `folder`, sorted by name; `ImageError` when it is no folder or holds none."""
    if not os.path.isdir(folder):
        raise ImageError(
            f"`--images` {folder!r} is not a folder; pass a folder holding 3-5 photos of the subject."
        )
    files = image_files(folder)
    if not files:
        raise ImageError(
            f"`--images` {folder!r} holds no images ({', '.join(EXTENSIONS)}); put 3-5 photos of the subject there."
        )
    return files


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white (what a transparent product photo shows)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def square(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to `size` x `size`."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((size, size), Image.BICUBIC if side < size else Image.LANCZOS)


def open_image(path: str) -> Image.Image:
    """Open one image fully, or raise `ImageError` naming the file."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageError(
                    f"{path} is {im.width}x{im.height}, over {MAX_PIXELS // 1_000_000} megapixels; downscale it first."
                )
            im.load()
            image = to_rgb(im)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(
            f"cannot read {path} as an image ({type(e).__name__}); remove or re-save it."
        ) from None
    if min(image.size) < MIN_SIDE:
        raise ImageError(
            f"{path} is {image.width}x{image.height}; use images at least {MIN_SIDE} px on each side."
        )
    return image


def load_pictures(paths: Sequence[str], size: int) -> list[Image.Image]:
    """The images at `paths` as RGB PIL pictures of `size` x `size` (`open_image`, then `square`).

    `to_tensor` turns them into the (n, 3, size, size) tensor in [-1, 1] the objective takes; `find_concept`
    and `SubjectImages` take the pictures as they are.
    """
    if not paths:
        raise ImageError("no reference images given; pass a folder with 3-5 photos of the subject.")
    return [square(open_image(p), size) for p in paths]


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL RGB images of one size -> (n, 3, H, W) float in [-1, 1]."""
    arrays = np.stack([np.asarray(im.convert("RGB"), np.float32) for im in images])  # (n, H, W, 3)
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


def model_resolution(pipe) -> int:
    """The image size a Stable Diffusion pipeline generates by default."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
