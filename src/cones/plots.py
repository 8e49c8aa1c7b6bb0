"""Small charts drawn with Pillow alone: grouped bars and a heat map (image grids: `cones.labels`).

The project has no plotting library; these cover what benchmarks and commands show (neurons per
layer, overlaps between concepts, generated images side by side). Each returns a `PIL.Image` (RGB) that
the caller saves; nothing here writes files. Text uses Pillow's built-in scalable font.

    bar_chart(["down.0 k", "up.1 v"], {"shared": [0.02, 0.05], "chance": [0.01, 0.01]}, title="overlap")
    heatmap([[1.0, 0.1], [0.1, 1.0]], ["a", "b"], ["a", "b"])
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = ["PALETTE", "bar_chart", "heatmap", "layer_label"]

# Distinguishable colours (Tableau 10), one per series, in order.
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
WHITE, BLACK, GRID = (255, 255, 255), (20, 20, 20), (225, 225, 225)
PAD = 8  # pixels around blocks


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _text_width(font, text: str) -> int:
    return int(round(font.getlength(text)))


def layer_label(name: str) -> str:
    """A short label for a diffusers parameter name.

    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight" -> "down1.0 attn2.k";
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_v.weight" -> "mid.0 attn1.v". Other names are
    returned without a trailing ".weight".
    """
    m = re.fullmatch(
        r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.(attn\d)\.to_([kqv])\.weight",
        name,
    )
    if m:
        side, block, attention, layer, attn, kv = m.groups()
        suffix = f".{layer}" if layer != "0" else ""
        return f"{side}{block}.{attention}{suffix} {attn}.{kv}"
    m = re.fullmatch(
        r"mid_block\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.(attn\d)\.to_([kqv])\.weight", name
    )
    if m:
        attention, layer, attn, kv = m.groups()
        suffix = f".{layer}" if layer != "0" else ""
        return f"mid.{attention}{suffix} {attn}.{kv}"
    return name.removesuffix(".weight")


def bar_chart(
    labels: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str = "",
    maximum: float | None = None,
    value_format: str = "{:.1%}",
    width: int = 360,
    bar_height: int = 10,
    colors: Sequence[tuple[int, int, int]] = PALETTE,
    font_size: int = 12,
) -> Image.Image:
    """Horizontal grouped bars: one group per label, one bar per series, each bar's value written after it.

    Args:
        labels: the groups, top to bottom.
        series: name -> one value >= 0 per label; colours follow `colors` in order, with a legend on top.
        maximum: the value of a full-width bar (default: the largest value, or 1 when all are 0).
        value_format: how values are written next to the bars.
        width: pixels of a full-width bar; a bar of value v is round(width · v / maximum) pixels long.
    Returns:
        An RGB image.
    """
    names = list(series)
    if not names:
        raise ValueError("`series` is empty; pass at least one {name: values} entry.")
    for name in names:
        values = list(series[name])
        if len(values) != len(labels):
            raise ValueError(
                f"`series[{name!r}]` has {len(values)} values for {len(labels)} labels; give one per label."
            )
        if any(not v >= 0 for v in values):
            raise ValueError(f"`series[{name!r}]` holds a negative or NaN value; bar values must be >= 0.")
    if len(names) > len(colors):
        raise ValueError(f"{len(names)} series but {len(colors)} `colors`; pass more colours.")
    top = max((v for name in names for v in series[name]), default=0.0)
    maximum = maximum if maximum is not None else (top if top > 0 else 1.0)
    if not maximum > 0:
        raise ValueError(f"`maximum` must be > 0, got {maximum}.")

    font, bold = _font(font_size), _font(font_size + 2)
    line = font_size + 4
    label_w = max((_text_width(font, label) for label in labels), default=0) + PAD
    value_w = max(_text_width(font, value_format.format(v)) for name in names for v in series[name]) + PAD
    group_h = len(names) * bar_height + PAD
    title_h = line + PAD if title else 0
    x0 = PAD + label_w  # where bars start
    image_w = x0 + width + value_w + PAD
    # The legend entries flow left to right from x0, wrapping to a new line when the image is full.
    entries, x, y = [], x0, PAD + title_h
    for name in names:
        entry_w = bar_height + 4 + _text_width(font, name) + 2 * PAD
        if x > x0 and x + entry_w > image_w:
            x, y = x0, y + line
        entries.append((x, y))
        x += entry_w
    y0 = y + line + PAD // 2  # where the first group starts
    image = Image.new("RGB", (image_w, y0 + len(labels) * group_h + PAD), WHITE)
    draw = ImageDraw.Draw(image)

    # 1. Title and legend.
    if title:
        draw.text((PAD, PAD), title, fill=BLACK, font=bold)
    for i, (name, (x, y)) in enumerate(zip(names, entries, strict=True)):
        draw.rectangle((x, y + 3, x + bar_height - 1, y + 3 + bar_height - 1), fill=colors[i])
        draw.text((x + bar_height + 4, y), name, fill=BLACK, font=font)

    # 2. Grid lines at quarters of the maximum.
    for q in range(5):
        gx = x0 + round(width * q / 4)
        draw.line((gx, y0, gx, y0 + len(labels) * group_h - PAD), fill=GRID)

    # 3. The bars, each with its value.
    for j, label in enumerate(labels):
        gy = y0 + j * group_h
        draw.text((PAD, gy + (group_h - PAD - line) // 2), label, fill=BLACK, font=font)
        for i, name in enumerate(names):
            value = float(series[name][j])
            length = round(width * min(value, maximum) / maximum)
            by = gy + i * bar_height
            if length > 0:
                draw.rectangle((x0, by, x0 + length - 1, by + bar_height - 2), fill=colors[i])
            draw.text(
                (x0 + length + 3, by - 2), value_format.format(value), fill=BLACK, font=_font(bar_height)
            )
    return image


def _shade(value: float, maximum: float) -> tuple[int, int, int]:
    """White at 0 to dark blue at `maximum`, linear per channel."""
    t = min(max(value / maximum, 0.0), 1.0) if maximum > 0 else 0.0
    dark = (8, 48, 107)
    return tuple(round(255 + (d - 255) * t) for d in dark)  # type: ignore[return-value]


def heatmap(
    values: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str = "",
    maximum: float | None = None,
    value_format: str = "{:.1%}",
    cell: int = 56,
    font_size: int = 12,
) -> Image.Image:
    """A matrix as coloured cells (white = 0, dark blue = `maximum`, default the largest value), each
    cell with its value written in it. `values[i][j]` is row i, column j; cells are `cell` pixels square,
    wider when a column label needs it."""
    rows = [list(map(float, row)) for row in values]
    if len(rows) != len(row_labels) or any(len(row) != len(col_labels) for row in rows):
        raise ValueError(
            f"`values` is {len(rows)}x{len(rows[0]) if rows else 0} but the labels are "
            f"{len(row_labels)}x{len(col_labels)}; give one row per row label and one value per column label."
        )
    top = max((v for row in rows for v in row), default=0.0)
    maximum = maximum if maximum is not None else (top if top > 0 else 1.0)
    font, bold = _font(font_size), _font(font_size + 2)
    line = font_size + 4
    label_w = max((_text_width(font, label) for label in row_labels), default=0) + PAD
    cell = max([cell] + [_text_width(font, label) + 6 for label in col_labels])  # room for the column labels
    title_h = line + PAD if title else 0
    x0, y0 = PAD + label_w, PAD + title_h + line
    image = Image.new("RGB", (x0 + cell * len(col_labels) + PAD, y0 + cell * len(rows) + PAD), WHITE)
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((PAD, PAD), title, fill=BLACK, font=bold)
    for j, label in enumerate(col_labels):
        draw.text(
            (x0 + j * cell + (cell - _text_width(font, label)) // 2, PAD + title_h),
            label,
            fill=BLACK,
            font=font,
        )
    for i, row in enumerate(rows):
        draw.text((PAD, y0 + i * cell + (cell - line) // 2), row_labels[i], fill=BLACK, font=font)
        for j, value in enumerate(row):
            colour = _shade(value, maximum)
            box = (x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell - 1, y0 + (i + 1) * cell - 1)
            draw.rectangle(box, fill=colour, outline=WHITE)
            text = value_format.format(value)
            ink = WHITE if sum(colour) < 3 * 128 else BLACK
            tx = box[0] + (cell - _text_width(font, text)) // 2
            draw.text((tx, box[1] + (cell - line) // 2), text, fill=ink, font=font)
    return image
