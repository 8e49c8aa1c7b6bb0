"""Reference images as users bring them: any mode, any size, sometimes broken."""

import numpy as np
import pytest
from PIL import Image

from cones.images import ImageError, list_images, load_pictures, to_tensor


def save(path, mode="RGB", size=(40, 30), colour=(200, 10, 10)):
    Image.new(mode, size, colour if mode != "L" else 128).save(path)
    return str(path)


def test_empty_folder_says_what_to_do(tmp_path):
    with pytest.raises(ImageError, match="holds no images.*put 3-5 photos"):
        list_images(str(tmp_path))


def test_missing_folder(tmp_path):
    with pytest.raises(ImageError, match="is not a folder"):
        list_images(str(tmp_path / "nope"))


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageError, match="broken.png.*remove or re-save"):
        load_pictures([str(bad)], 16)


def test_grayscale_and_rgba_become_rgb(tmp_path):
    gray = save(tmp_path / "g.png", "L")
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(rgba)  # fully transparent red
    pictures = load_pictures([gray, str(rgba)], 16)
    images = to_tensor(pictures)
    assert images.shape == (2, 3, 16, 16)
    assert all(p.mode == "RGB" for p in pictures)
    assert np.allclose(np.asarray(pictures[1]), 255)  # transparency composited on white
    assert images.min() >= -1 and images.max() <= 1


def test_non_square_images_are_centre_cropped(tmp_path):
    im = Image.new("RGB", (60, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))  # a red square on the left third only
    im.save(tmp_path / "wide.png")
    pictures = load_pictures([str(tmp_path / "wide.png")], 20)
    assert np.asarray(pictures[0])[10, 10].tolist() == [0, 0, 255]


def test_tiny_images_are_refused(tmp_path):
    with pytest.raises(ImageError, match="at least 16 px"):
        load_pictures([save(tmp_path / "t.png", size=(8, 8))], 64)


def test_huge_images_are_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (8000, 8000)).save(path)  # 64 megapixels, a small file
    with pytest.raises(ImageError, match="megapixels"):
        load_pictures([str(path)], 64)


def test_hidden_and_other_files_are_ignored(tmp_path):
    save(tmp_path / "a.jpg")
    save(tmp_path / ".hidden.png")
    (tmp_path / "notes.txt").write_text("hi")
    assert [p.split("/")[-1] for p in list_images(str(tmp_path))] == ["a.jpg"]
