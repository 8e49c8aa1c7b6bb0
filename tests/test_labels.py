"""Labelled grids: every image pasted whole, text drawn where the labels go, and the plain grid unchanged."""

import numpy as np
import pytest
from PIL import Image, ImageFont

from cones.generate import grid
from cones.labels import labelled_grid, wrap


def tile(colour, size=8):
    return Image.new("RGB", (size, size), colour)


def find(picture: Image.Image, image: Image.Image) -> list[tuple[int, int]]:
    """Top-left corners where `image` appears in `picture`, pixel for pixel."""
    big, small = np.asarray(picture), np.asarray(image)
    h, w = small.shape[:2]
    ys, xs = np.nonzero(np.all(big == small[0, 0], axis=-1))
    return [
        (int(x), int(y))
        for y, x in zip(ys, xs, strict=True)
        if y + h <= big.shape[0]
        and x + w <= big.shape[1]
        and np.array_equal(big[y : y + h, x : x + w], small)
    ]


def test_plain_grid_is_unchanged_without_labels():
    rows = [[tile((255, 0, 0)), tile((0, 255, 0))], [tile((0, 0, 255))]]
    picture = grid(rows, scale=2)
    assert picture.size == (32, 32)
    assert np.asarray(picture)[0, 0].tolist() == [255, 0, 0]
    assert np.asarray(picture)[16, 16].tolist() == [255, 255, 255]  # the short row is padded white


def test_every_image_is_pasted_whole_right_of_its_label():
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]
    rows = [[tile(colours[0]), tile(colours[1])], [tile(colours[2]), tile(colours[3])]]
    picture = grid(
        rows,
        scale=3,
        row_labels=["references", '"a sks dog"\nwith concept'],
        column_labels=["seed 0", "seed 1"],
        header_row=1,
        title="a title",
    )
    corners = [find(picture, tile(c, 24)) for c in colours]
    assert all(len(c) == 1 for c in corners)
    (x00, y00), (x01, y01), (x10, y10), (x11, y11) = (c[0] for c in corners)
    assert y00 == y01 < y10 == y11 and x00 == x10 < x01 == x11
    # labels: dark text left of the images, in each row's band; the header stands between the rows
    pixels = np.asarray(picture).astype(int)
    assert (pixels[y00 : y00 + 24, :x00].sum(-1) < 200).any()
    assert (pixels[y10 : y10 + 24, :x10].sum(-1) < 200).any()
    assert (pixels[y00 + 24 : y10, x10 : x11 + 24].sum(-1) < 600).any()  # grey "seed" names
    assert (pixels[:y00, :].sum(-1) < 200).any()  # the title


def test_a_header_adds_height_and_a_title_more():
    rows = [[tile((9, 9, 9))]]
    bare = labelled_grid(rows, ["x"])
    header = labelled_grid(rows, ["x"], column_labels=["seed 0"])
    titled = labelled_grid(rows, ["x"], column_labels=["seed 0"], title="t")
    assert bare.height < header.height < titled.height


def test_column_names_wider_than_the_images_do_not_overlap():
    rows = [[tile((200, 0, 0), 4), tile((0, 0, 200), 4)]]
    picture = labelled_grid(rows, ["x"], column_labels=["seed 10000", "seed 20000"], scale=1)
    (x0, _), (x1, _) = find(picture, tile((200, 0, 0), 4))[0], find(picture, tile((0, 0, 200), 4))[0]
    assert x1 - x0 > ImageFont.load_default(size=12).getlength("seed 10000")


def test_long_labels_wrap_to_the_label_width():
    font = ImageFont.load_default(size=12)
    lines = wrap("a sks circle on a grass background next to a blue square", font, 100)
    assert len(lines) > 1 and all(font.getlength(line) <= 100 for line in lines if " " in line)
    assert wrap("one\ntwo", font, 1000) == ["one", "two"]
    tall = labelled_grid([[tile((1, 1, 1))]], ["word " * 30], label_width=80)
    assert tall.height > 8 * 2 + 16 * 5  # the label's lines set the row's height


def test_label_count_must_match_rows():
    with pytest.raises(ValueError, match="one label per row"):
        labelled_grid([[tile((0, 0, 0))]], ["a", "b"])
    with pytest.raises(ValueError, match="header_row"):
        labelled_grid([[tile((0, 0, 0))]], ["a"], column_labels=["s"], header_row=3)
