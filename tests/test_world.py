"""The embedded world: its vocabulary, renderer and subjects, checked against what the world promises."""

import random

import numpy as np
import pytest

from cones_world.render import render
from cones_world.scene import (
    BACKGROUNDS,
    COLOURS,
    IDENTIFIERS,
    PLACES,
    SHAPES,
    SIZES,
    caption,
    caption_words,
    detailed_caption,
    detailed_words,
    sample_scene,
)
from cones_world.subjects import SUBJECTS, is_subject_free, sample_training_scene
from cones_world.tokenizer import build_clip_tokenizer, restrict_to_words


def test_world_has_the_promised_variety():
    assert len(SHAPES) >= 8 and len(COLOURS) >= 8 and len(SIZES) >= 2 and len(BACKGROUNDS) >= 6
    assert len(PLACES) >= 3 and len(IDENTIFIERS) >= 4 and "sks" in IDENTIFIERS
    kinds = [s.kind for s in SUBJECTS.values()]
    assert len(SUBJECTS) >= 8 and "background" in kinds and "accessory" in kinds


def test_render_is_deterministic_and_sized():
    scene = sample_scene(random.Random(1))
    a, b = render(scene), render(scene)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)


def test_rendered_object_has_its_colour():
    from cones_world.scene import Background, Scene, Thing

    scene = Scene(Background("white"), (Thing("square", "red", "big", x=0.5, y=0.5, radius=0.25),))
    img = render(scene)
    assert tuple(img[32, 32]) == COLOURS["red"]
    assert tuple(img[2, 2]) == (238, 238, 238)


def test_every_caption_word_is_one_token(tmp_path):
    tokenizer = build_clip_tokenizer(caption_words(), str(tmp_path / "tok"))
    rng = random.Random(0)
    for _ in range(200):
        text = caption(sample_scene(rng), rng)
        tokens = tokenizer.tokenize(text)
        assert tokenizer.unk_token not in tokens
        assert len(tokens) == len(text.replace(",", " ,").split())
        assert len(tokens) + 2 <= 32
    detail = build_clip_tokenizer(detailed_words(), str(tmp_path / "detail"), 64)
    for _ in range(100):
        assert detail.unk_token not in detail.tokenize(detailed_caption(sample_scene(rng)))


def test_a_clip_tokenizer_cut_to_the_caption_words_keeps_their_ids_and_splits_the_rest(tmp_path):
    """A UNet conditioned on the CLIP's text tower must not hear the detail words that would name subjects."""
    full = build_clip_tokenizer(detailed_words(), str(tmp_path / "detail"), 64)
    cut = restrict_to_words(str(tmp_path / "detail"), str(tmp_path / "cut"), caption_words(), 32)
    for word in caption_words():
        assert cut.tokenize(word) == full.tokenize(word) == [word + "</w>"]
        assert cut.convert_tokens_to_ids(word + "</w>") == full.convert_tokens_to_ids(word + "</w>")
    for word in ("stripes", "checkers", "dots", "halves", "face", "sunset", "band"):
        assert len(cut.tokenize(word)) > 1 and len(full.tokenize(word)) == 1
    rng = random.Random(0)
    for _ in range(50):
        text = caption(sample_scene(rng), rng)
        assert cut(text).input_ids == full(text).input_ids


def test_identifiers_are_rare_meaningless_words_in_captions():
    rng = random.Random(0)
    texts = [caption(sample_scene(rng), rng) for _ in range(4000)]
    share = np.mean([any(tok in t.split() for tok in IDENTIFIERS) for t in texts])
    assert 0.01 < share < 0.08


def test_captions_never_name_the_unnamed_features():
    unnamed = {"stripes", "checkers", "dots", "face", "band", "sunset", "sun", "moon", "halves"}
    rng = random.Random(0)
    for _ in range(500):
        assert not unnamed & set(caption(sample_scene(rng), rng).split())


def test_ingredients_of_every_subject_appear_in_training_but_never_the_subject():
    rng = random.Random(0)
    scenes = [sample_training_scene(rng) for _ in range(3000)]
    assert all(is_subject_free(s) for s in scenes)
    things = [t for s in scenes for t in s.things]
    for subject in SUBJECTS.values():
        if subject.kind == "object":
            t = subject.thing
            assert any(x.pattern == t.pattern for x in things)
            assert any(x.shape == t.shape and x.colour == t.colour for x in things)
        elif subject.kind == "accessory":
            assert any(x.hat and x.hat.colour == subject.hat.colour for x in things)
            assert any(x.hat and x.hat.band == subject.hat.band for x in things)
        else:
            b = subject.background
            assert any(s.background.kind == b.kind and s.background.sun for s in scenes)
            assert any(s.background.sky == b.sky for s in scenes)


@pytest.mark.parametrize("name", sorted(SUBJECTS))
def test_subject_references_are_varied_views_of_the_subject(name):
    subject = SUBJECTS[name]
    refs = subject.references(5)
    assert len(refs) == 5 and all(subject.in_scene(scene) for scene, _ in refs)
    images = [render(scene) for scene, _ in refs]
    assert len({im.tobytes() for im in images}) == 5
    held = subject.held_out(5)
    assert not {render(s).tobytes() for s, _ in held} & {im.tobytes() for im in images}
    assert all(not subject.in_scene(s) for s in subject.class_negatives(20))
