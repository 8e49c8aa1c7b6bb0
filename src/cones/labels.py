"""Image grids that explain themselves: a title, a label left of every row, the columns named above.

Every grid cones writes goes through `labelled_grid` (via `cones.generate.grid` when labels are given), so
that a reader of the PNG alone knows which row holds the references, which prompt each row shows, whether
its concept was shut, and which seed each column used:

    labelled_grid(
        [refs, without, with_],
        row_labels=["references", '"a sks star"\\nwithout concept', '"a sks star"\\nwith concept'],
        column_labels=["seed 0", "seed 1", "seed 2"],
        header_row=1,                     # the seeds name the generated rows, not the references
        title="smiling-star: 5% of cross-attention K/V shut",
    )

Text is drawn with Pillow's built-in scalable font (no font files needed); long labels are wrapped to the
label column's width. Nothing here writes files.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = ["labelled_grid", "wrap"]

WHITE, BLACK, GREY = (255, 255, 255), (20, 20, 20), (110, 110, 110)
PAD, GAP = 8, 2  # pixels around blocks, and between images


def _font(size: int):
    return ImageFont.load_default(size=size)


def _width(font, text: str) -> int:
    return int(round(font.getlength(text)))


def wrap(text: str, font, width: int) -> list[str]:
    """`text` broken into lines no wider than `width` pixels (at spaces; a longer word stays whole).

    Newlines in `text` always break.
    """
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and _width(font, candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def labelled_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    *,
    column_labels: Sequence[str] | None = None,
    header_row: int = 0,
    title: str | None = None,
    scale: int = 2,
    font_size: int = 12,
    label_width: int = 190,
) -> Image.Image:
    """Rows of images with a label left of each row, optional column names and a title.

    Args:
        rows: images per row (rows may differ in length); each image is scaled by `scale` (nearest
            neighbour, so pixels stay sharp).
        row_labels: one label per row; "\\n" starts a new line, long lines wrap to `label_width` pixels.
        column_labels: names of the columns (e.g. the seeds), drawn above row `header_row`.
        header_row: the row above which the column names stand (rows before it, like the references,
            are not columns of that kind).
        title: a line (wrapped) above everything.
    """
    if len(rows) != len(row_labels):
        raise ValueError(f"{len(rows)} rows but {len(row_labels)} `row_labels`; give one label per row.")
    if column_labels is not None and not 0 <= header_row < max(len(rows), 1):
        raise ValueError(f"`header_row` {header_row} is not a row index of the {len(rows)} rows.")
    font, bold = _font(font_size), _font(font_size + 2)
    line = font_size + 4
    scaled = [
        [im.convert("RGB").resize((im.width * scale, im.height * scale), Image.NEAREST) for im in row]
        for row in rows
    ]
    cell_w = max((im.width for row in scaled for im in row), default=0)
    # a column is as wide as its widest image or its name, whichever is wider; images are centred in it
    pitch = max(cell_w, max((_width(font, c) + 2 * GAP for c in column_labels or []), default=0))
    widest = max((_width(font, part) for label in row_labels for part in label.split("\n")), default=0)
    label_w = min(label_width, widest) + PAD
    wrapped = [wrap(label, font, label_w - PAD) for label in row_labels]
    heights = [
        max(max((im.height for im in row), default=0), len(lines) * line)
        for row, lines in zip(scaled, wrapped, strict=True)
    ]
    widths = [len(row) * (pitch + GAP) for row in scaled]
    content_w = PAD + label_w + max(widths, default=0) + PAD
    title_lines = wrap(title, bold, max(content_w - 2 * PAD, 200)) if title else []
    title_h = len(title_lines) * (line + 2) + (PAD // 2 if title_lines else 0)
    header_h = line + 2 if column_labels else 0
    height = PAD + title_h + header_h + sum(h + GAP for h in heights) + PAD
    width = max(content_w, max((_width(bold, t) for t in title_lines), default=0) + 2 * PAD)
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    y = PAD
    for text in title_lines:
        draw.text((PAD, y), text, fill=BLACK, font=bold)
        y += line + 2
    y += PAD // 2 if title_lines else 0
    x0 = PAD + label_w
    for i, (row, lines, row_h) in enumerate(zip(scaled, wrapped, heights, strict=True)):
        if column_labels and i == header_row:
            for j, name in enumerate(column_labels):
                cx = x0 + j * (pitch + GAP) + (pitch - _width(font, name)) // 2
                draw.text((cx, y), name, fill=GREY, font=font)
            y += header_h
        ty = y + (row_h - len(lines) * line) // 2
        for text in lines:
            draw.text((PAD, ty), text, fill=BLACK, font=font)
            ty += line
        for j, im in enumerate(row):
            image.paste(im, (x0 + j * (pitch + GAP) + (pitch - im.width) // 2, y))
        y += row_h + GAP
    return image
