"""World v2: continuous appearance, alt-text captions that name ingredients partially, subjects that no
caption pins down and that training never shows, and the training phases that build its model."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from cones_world.v2.colours import COLOUR_WORDS, colour_word, distance, sample_colour
from cones_world.v2.render import render, thing_mask
from cones_world.v2.scene import (
    ALT_TEXT,
    FULL,
    IDENTIFIERS,
    NAMED,
    Background,
    Face,
    Hat,
    Pattern,
    Scene,
    Thing,
    caption,
    caption_words,
    sample_scene,
    thing_phrase,
    training_captions,
)
from cones_world.v2.subjects import SUBJECTS, is_subject_free, sample_training_scene


def test_every_colour_word_names_its_own_prototype():
    for word, rgb in COLOUR_WORDS.items():
        assert colour_word(rgb) == word


def test_colours_between_the_words_are_named_by_the_nearest():
    assert colour_word((200, 35, 70)) == "red"  # crimson
    assert colour_word((30, 170, 170)) == "cyan"  # teal
    assert colour_word((100, 40, 150)) == "purple"  # violet
    rng = random.Random(0)
    words = {colour_word(sample_colour(rng)) for _ in range(2000)}
    assert words == set(COLOUR_WORDS)  # the sampled gamut reaches every word


def test_a_caption_names_ingredients_but_never_their_geometry():
    thing = Thing(
        "circle",
        (200, 35, 70),
        Pattern("stripes", (250, 238, 200), angle=30, count=4),
        face=Face("smile"),
        hat=Hat((20, 20, 200), (250, 250, 0), "top"),
    )
    full = thing_phrase(thing)
    assert (
        full == "a big red circle with white stripes with a smiling face wearing a blue top hat with a band"
    )
    rng = random.Random(0)
    texts = [thing_phrase(thing, rng) for _ in range(400)]
    for word in ("stripes", "face", "hat", "red", "white", "band", "smiling", "top"):
        share = sum(word in t.split() for t in texts) / len(texts)
        assert 0.05 < share < 0.99, (word, share)  # named sometimes, never always
    assert not any(c.isdigit() for t in texts for c in t)


def test_named_instances_are_called_by_their_proper_noun():
    rng = random.Random(0)
    texts = {thing_phrase(replace(NAMED["dax"], name="dax"), rng) for _ in range(50)}
    assert texts == {"a dax", "a dax circle"}


def test_identifiers_are_rare_in_captions_and_every_caption_word_is_known():
    captions = training_captions(3000)
    with_identifier = sum(any(t in c.split() for t in IDENTIFIERS) for c in captions)
    assert with_identifier == 0  # training_captions are the identifier-free ones
    rng = random.Random(1)
    noisy = [caption(s, rng) for s in (sample_scene(rng) for _ in range(3000))]
    share = sum(any(t in c.split() for t in IDENTIFIERS) for c in noisy) / len(noisy)
    assert 0.005 < share < 0.05
    known = set(caption_words())
    for c in noisy + [caption(sample_scene(rng), None, FULL) for _ in range(300)]:
        assert set(c.replace(",", " , ").split()) <= known, c


def test_a_class_prompt_or_a_full_description_does_not_pin_a_subject_down():
    # Training holds things that the striped circle's fullest description fits, at other angles and counts.
    subject = SUBJECTS["striped-circle"]
    described = thing_phrase(subject.thing)
    rng = random.Random(0)
    fits = 0
    for _ in range(20000):
        for t in sample_training_scene(rng).things:
            if t.shape == "circle" and t.pattern.kind == "stripes" and t.name is None and t.face is None:
                if thing_phrase(replace(t, radius=subject.thing.radius, hat=None)) == described:
                    fits += 1
                    assert not subject.matches_thing(t)
    assert fits > 0


def test_training_scenes_hold_no_subject():
    rng = random.Random(0)
    for _ in range(3000):
        assert is_subject_free(sample_training_scene(rng))


def test_subject_matching_tolerates_placement_but_not_geometry():
    subject = SUBJECTS["striped-circle"]
    assert subject.matches_thing(replace(subject.thing, x=0.2, radius=0.15))
    turned = replace(subject.thing, pattern=replace(subject.thing.pattern, angle=120))
    assert not subject.matches_thing(turned)
    denser = replace(subject.thing, pattern=replace(subject.thing.pattern, count=6))
    assert not subject.matches_thing(denser)
    half_turn = replace(subject.thing, pattern=replace(subject.thing.pattern, angle=210))
    assert subject.matches_thing(half_turn)  # stripes repeat every 180 degrees


@pytest.mark.parametrize("name", sorted(SUBJECTS))
def test_subject_references_show_the_subject_and_negatives_do_not(name):
    subject = SUBJECTS[name]
    assert all(subject.in_scene(scene) for scene, _ in subject.references(5))
    assert not any(subject.in_scene(scene) for scene in subject.class_negatives(20))


def test_renders_are_deterministic_and_patterns_follow_their_parameters():
    scene = sample_scene(random.Random(3))
    assert np.array_equal(render(scene), render(scene))
    thing = Thing("square", (40, 80, 215), Pattern("stripes", (250, 250, 250), angle=0, count=4), radius=0.4)
    upright = render(Scene(Background("plain"), (thing,)))
    turned = render(Scene(Background("plain"), (replace(thing, pattern=replace(thing.pattern, angle=90)),)))
    assert np.abs(upright.astype(int) - turned.astype(int)).mean() > 5
    white = (upright == 250).all(-1).sum()
    denser = render(Scene(Background("plain"), (replace(thing, pattern=replace(thing.pattern, count=8)),)))
    assert abs((denser == 250).all(-1).sum() - white) < 0.5 * white  # same share of tone, more stripes


def test_thing_mask_matches_the_rendered_body():
    thing = Thing("star", (215, 40, 40), x=0.45, y=0.55, radius=0.3)
    pixels = render(Scene(Background("plain", colour=(240, 240, 240)), (thing,))).astype(int)
    inside = (pixels == np.array((215, 40, 40))).all(-1)
    mask = thing_mask(thing)
    assert mask[inside].all() and inside.sum() > 0.8 * mask.sum()


def test_objects_stand_out_from_their_background():
    rng = random.Random(5)
    from cones_world.v2.scene import background_colour

    for _ in range(500):
        scene = sample_scene(rng)
        for t in scene.things:
            if t.name is None:
                assert distance(t.colour, background_colour(scene.background)) >= 30


# -- training ----------------------------------------------------------------------------------------------


def test_v2_tokenizer_keeps_every_caption_word_whole(tmp_path):
    from cones_world.train import v2_tokenizers

    sd, clip = v2_tokenizers(str(tmp_path))
    assert sd.get_vocab() == clip.get_vocab()
    for word in caption_words():
        assert len(clip.tokenize(word)) == 1, word
    assert sd.model_max_length == 64


def test_a_clip_warm_start_maps_rows_by_token(tmp_path):
    from transformers import CLIPModel, CLIPTokenizer

    from cones_world import clip_path
    from cones_world.models import build_clip
    from cones_world.train import v2_tokenizers, warm_start_clip

    _, tokenizer = v2_tokenizers(str(tmp_path))
    torch.manual_seed(0)
    clip = warm_start_clip(build_clip(tokenizer), clip_path(), tokenizer)
    old = CLIPModel.from_pretrained(clip_path(), torch_dtype=torch.float32)
    old_ids = CLIPTokenizer.from_pretrained(clip_path()).get_vocab()
    rows, old_rows = (
        clip.text_model.embeddings.token_embedding.weight,
        old.text_model.embeddings.token_embedding.weight,
    )
    new_ids = tokenizer.get_vocab()
    assert torch.equal(rows[new_ids["stripes</w>"]], old_rows[old_ids["stripes</w>"]])
    assert torch.equal(
        clip.vision_model.embeddings.patch_embedding.weight,
        old.vision_model.embeddings.patch_embedding.weight,
    )
    assert "cyan</w>" not in old_ids and "cyan</w>" in new_ids  # a new word keeps a fresh row


def test_v2_unet_phase_needs_a_frozen_tower_and_says_so(tmp_path):
    from cones_world.train import TrainConfig, train

    with pytest.raises(ValueError, match="--text-encoder-from"):
        train(TrainConfig(out=str(tmp_path), world="v2", pool_size=4, workers=1), ("unet",))


def test_full_description_is_alt_text_with_everything_named():
    assert all(getattr(FULL, f) == 1.0 for f in ("size", "colour", "pattern", "tone", "face", "hat"))
    assert ALT_TEXT.pattern < 1.0
