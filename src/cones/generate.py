"""Generating images, with or without concepts shut, reproducibly.

One seed per image: image j of prompt i uses `torch.Generator().manual_seed(seeds[j])`, so the same prompt
and seed give the same picture with and without a concept, and a grid's columns are comparable.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from cones import GUIDANCE_SCALE, files


def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int] = (0,),
    *,
    steps: int = 25,
    guidance_scale: float = GUIDANCE_SCALE,
    batch_size: int = 16,
    height: int | None = None,
    width: int | None = None,
) -> list[list[Image.Image]]:
    """Images for every prompt and seed: `result[i][j]` is prompt i with seed j.

    Seeds are drawn on the CPU so that a picture does not depend on the device it is made on.
    """
    jobs = [(p, s) for p in prompts for s in seeds]
    images: list[Image.Image] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(int(s)) for _, s in chunk]
        out = pipe(
            [p for p, _ in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            height=height,
            width=width,
        )
        images.extend(out.images)
    n = len(seeds)
    return [images[i * n : (i + 1) * n] for i in range(len(prompts))]


def grid(
    rows: Sequence[Sequence[Image.Image]],
    scale: int = 1,
    *,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    header_row: int = 0,
    title: str | None = None,
) -> Image.Image:
    """Paste rows of equally sized images into one picture.

    With `row_labels` (and optionally `column_labels` above row `header_row`, and a `title`) the picture
    explains itself: see `cones.labels.labelled_grid`. Without, the images alone, edge to edge.
    """
    if row_labels is not None:
        from cones.labels import labelled_grid

        return labelled_grid(
            rows, row_labels, column_labels=column_labels, header_row=header_row, title=title, scale=scale
        )
    arrays = [np.concatenate([np.asarray(im.convert("RGB")) for im in row], axis=1) for row in rows]
    width = max(a.shape[1] for a in arrays)
    arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)), constant_values=255) for a in arrays]
    picture = Image.fromarray(np.concatenate(arrays, axis=0))
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture


def save_atomic(image: Image.Image, path: str, overwrite: bool = False) -> None:
    """Write a PNG atomically (`cones.files.write_image`), refusing to replace a file unless `overwrite`."""
    files.write_image(image, path, overwrite=overwrite)


def save_all(images: Sequence[tuple[str, Image.Image]], overwrite: bool = False) -> None:
    """Write several images all or nothing (`cones.files.write_files`): on any error none of them is left."""
    files.write_files(
        [(path, files.image_writer(image, path)) for path, image in images], overwrite=overwrite
    )
