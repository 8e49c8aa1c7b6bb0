"""`cones evaluate` and the standard prompt sets.

Alignment is checked against its definition (cosines computed here from the scorer's embeddings, and known
answers: an image scored against itself has image alignment 1), the command end to end on the tiny
pipeline with the embedded world CLIP, and the prompt sets against the world's closed vocabulary.
"""

import json
import os
import string

import numpy as np
import pytest
import torch

from cones.cli import main
from cones.evaluate import ClipScorer, score, shifted_views
from cones.neurons import ConceptNeurons
from cones.prompts import (
    KINDS,
    SD,
    WORLD,
    SubjectWords,
    composition_prompts,
    prompt_set,
    unknown_words,
)
from cones.storage import save_concept
from cones.targets import parameter_shapes
from cones_world import concepts
from cones_world.scene import caption_words, training_captions
from cones_world.subjects import SUBJECTS


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scorer():
    return ClipScorer()


class Recording:
    """The real scorer, noting which texts it was asked to embed."""

    def __init__(self, inner):
        self.inner, self.texts_seen = inner, []

    def images(self, images):
        return self.inner.images(images)

    def texts(self, texts):
        self.texts_seen += list(texts)
        return self.inner.texts(texts)


# -- scoring against the definitions ----------------------------------------------------------------------


def test_shifted_views_move_the_image_by_the_shift_and_repeat_its_edges():
    pixels = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    views = shifted_views(pixels, 2)
    assert len(views) == 5 and torch.equal(views[0], pixels)
    by_hand = np.pad(pixels.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="edge")
    for view, (dx, dy) in zip(views, ((0, 0), (-2, 0), (2, 0), (0, -2), (0, 2)), strict=True):
        assert np.array_equal(view.numpy(), by_hand[..., 2 + dy : 8 + dy, 2 + dx : 8 + dx])
    assert torch.equal(
        views[1][..., 2:], pixels[..., :-2]
    )  # the content moved right, the left column repeated
    assert torch.equal(views[1][..., 0], pixels[..., 0])
    assert shifted_views(pixels, 0) == [pixels]


def test_grid_shifts_embed_the_mean_of_the_shifted_images(scorer):
    from PIL import Image

    from cones_world.render import render
    from cones_world.scene import Background, Scene, Thing

    image = render(Scene(Background("sea"), (Thing("hexagon", "red", "small", x=0.4, y=0.6, radius=0.1),)))
    shift = scorer.model.config.vision_config.patch_size // 4
    padded = np.pad(image, ((shift, shift), (shift, shift), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    moved = [
        Image.fromarray(
            np.ascontiguousarray(padded[shift + dy : shift + dy + h, shift + dx : shift + dx + w])
        )
        for dx, dy in ((0, 0), (-shift, 0), (shift, 0), (0, -shift), (0, shift))
    ]
    by_hand = torch.nn.functional.normalize(scorer.images(moved).sum(0), dim=-1)
    together = scorer.images([Image.fromarray(image)], grid_shifts=True)[0]
    assert torch.allclose(together, by_hand, atol=1e-5)
    assert not torch.allclose(together, scorer.images([Image.fromarray(image)])[0], atol=1e-3)


def test_score_is_the_mean_of_cosines(scorer):
    circle = concepts.references(SUBJECTS["striped-circle"])[1]
    sea = concepts.references(SUBJECTS["sunset-sea"])[1]
    rows = [circle[:2], sea[:3]]
    prompts = ["a sks circle on a xqz sea background", "a big red circle"]
    refs = {"striped-circle": scorer.images(circle), "sunset-sea": scorer.images(sea)}
    recording = Recording(scorer)

    result = score(recording, rows, prompts, refs, tokens=["sks", "xqz"])

    assert recording.texts_seen == ["a circle on a sea background", "a big red circle"]
    t = scorer.texts(recording.texts_seen).numpy()
    e = [scorer.images(r).numpy() for r in rows]
    per_prompt_text = [np.mean([float(x @ t[i]) for x in e[i]]) for i in range(2)]
    assert result["text_alignment"] == pytest.approx(np.mean(per_prompt_text), abs=1e-6)
    every = np.concatenate(e)
    for name, ref in refs.items():
        expected = np.mean([float(x @ y) for x in every for y in ref.numpy()])
        assert result["image_alignment_per_subject"][name] == pytest.approx(expected, abs=1e-6)
    assert result["image_alignment"] == pytest.approx(
        np.mean(list(result["image_alignment_per_subject"].values())), abs=1e-9
    )
    assert result["num_images"] == 5 and [p["images"] for p in result["per_prompt"]] == [2, 3]


def test_an_image_is_perfectly_aligned_with_itself(scorer):
    circle = concepts.references(SUBJECTS["striped-circle"])[1][0]
    result = score(scorer, [[circle]], ["a sks circle"], {"s": scorer.images([circle])}, tokens=["sks"])
    assert result["image_alignment"] == pytest.approx(1.0, abs=1e-5)
    # two subjects: the mean of the two, one of which is this perfect 1
    other = concepts.references(SUBJECTS["sunset-sea"])[1][0]
    result = score(
        scorer,
        [[circle]],
        ["a circle"],
        {"s": scorer.images([circle]), "t": scorer.images([other])},
        tokens=[],
    )
    cos = float(scorer.images([circle])[0] @ scorer.images([other])[0])
    assert result["image_alignment"] == pytest.approx((1 + cos) / 2, abs=1e-5)


# -- the command ---------------------------------------------------------------------------------------------


def write_concept(pipe_path, path, token="sks"):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(pipe_path, "unet"))
    g = torch.Generator().manual_seed(0)
    mask = {n: torch.rand(s, generator=g) < 0.05 for n, s in parameter_shapes(unet, "cross").items()}
    save_concept(ConceptNeurons.from_mask(mask, token=token, class_word="dog"), path)


def test_generate_score_and_rescore_the_folder(tiny_pipe_path, tmp_path, capsys):
    concept = tmp_path / "dog.cones"
    write_concept(tiny_pipe_path, concept)
    out = tmp_path / "eval"
    argv = [
        "evaluate",
        "--model",
        tiny_pipe_path,
        "--concept",
        str(concept),
        "--reference",
        "striped-circle",
        "--reference",
        "sunset-sea",
        "--token",
        "sks",
        "--token",
        "xqz",
        "--prompt",
        "a sks dog",
        "--prompt",
        "a red sks dog on beach",
        "--seeds",
        "0",
        "1",
        "2",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| **all prompts** | 6 |" in printed
    result = json.loads((out / "evaluation.json").read_text())
    assert result["num_images"] == 6 and result["num_prompts"] == 2
    assert set(result["image_alignment_per_subject"]) == {"striped-circle", "sunset-sea"}
    assert [p["stripped"] for p in result["per_prompt"]] == ["a dog", "a red dog on beach"]
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == sorted(
        f"prompt{i}-seed{s}.png" for i in range(2) for s in range(3)
    )
    assert (out / "evaluation.md").read_text().startswith("| prompt (identifiers removed) |")

    # the written folder, scored again, gives the same numbers
    assert (
        main(
            [
                "evaluate",
                "--images",
                str(out),
                "--reference",
                "striped-circle",
                "--reference",
                "sunset-sea",
                "--token",
                "sks",
                "--token",
                "xqz",
                "--format",
                "json",
            ]
        )
        == 0
    )
    again = json.loads(capsys.readouterr().out)
    assert again["text_alignment"] == pytest.approx(result["text_alignment"], abs=1e-6)
    assert again["image_alignment_per_subject"] == pytest.approx(
        result["image_alignment_per_subject"], abs=1e-6
    )

    # and a folder in `cones generate`'s layout, with the prompts given again
    (out / "prompts.json").unlink()
    assert (
        main(
            [
                "evaluate",
                "--images",
                str(out),
                "--reference",
                "striped-circle",
                "--reference",
                "sunset-sea",
                "--token",
                "sks",
                "--token",
                "xqz",
                "--prompt",
                "a sks dog",
                "--prompt",
                "a red sks dog on beach",
                "--format",
                "json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["image_alignment"] == pytest.approx(
        result["image_alignment"], abs=1e-6
    )

    # nothing is overwritten without --overwrite
    assert main(argv) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_prompt_set_and_baseline_weights(tiny_pipe_path, tmp_path, capsys):
    from cones.baselines import BaselineWeights, save

    weights = tmp_path / "ti.safetensors"
    save(BaselineWeights("textual_inversion", tokens={"sks": torch.full((32,), 0.1)}), weights)
    argv = [
        "evaluate",
        "--model",
        tiny_pipe_path,
        "--weights",
        str(weights),
        "--reference",
        "striped-circle",
        "--prompt-set",
        "world",
        "--images-per-prompt",
        "1",
        "--steps",
        "1",
        "--format",
        "json",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [p["prompt"] for p in result["per_prompt"]] == prompt_set("object", "sks", "circle")
    assert result["settings"]["identifiers"] == ["sks"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--images", "x", "--concept", "c.cones"], "drop --concept/--weights"),
        (
            ["--prompt", "a dog", "--token", "sks", "--token", "xqz"],
            "`--token` is given 2 times for 1 --reference",
        ),
        (["--prompt", "a dog", "--prompt-set", "world"], "give prompts one way"),
        (["--prompt-set", "world", "--reference", "nowhere"], "neither a world subject"),
        (["--prompt", "a dog", "--images-per-prompt", "0"], "at least 1"),
    ],
)
def test_user_errors_are_one_line(capsys, extra, message):
    assert main(["evaluate", "--reference", "striped-circle", *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


# -- prompt sets -------------------------------------------------------------------------------------------------


def placeholders(template):
    return [key for _, key, _, _ in string.Formatter().parse(template) if key is not None]


@pytest.mark.parametrize("family", [WORLD, SD])
def test_each_set_has_20_distinct_prompts_naming_the_subject_once(family):
    assert set(family) == set(KINDS)
    for templates in family.values():
        assert len(templates) == 20 and len(set(templates)) == 20
        for t in templates:
            assert placeholders(t).count("token") == 1 and placeholders(t).count("class_word") == 1


def test_world_prompts_use_only_the_world_vocabulary():
    known = set(caption_words())
    word_for = {"object": "circle", "background": "sea", "accessory": "hat"}
    for kind in KINDS:
        for prompt in prompt_set(kind, "sks", word_for[kind]):
            assert set(prompt.replace(",", " , ").split()) <= known, prompt
    assert unknown_words(["a sks dog in the snow"], known) == ["dog", "in", "the", "snow"]
    assert unknown_words(training_captions(50), known) == []
    assert not any(
        t in c.split() for c in training_captions(200) for t in ("sks", "xqz", "vlt", "pqm", "zrb")
    )


def test_composition_prompts_name_every_subject_once_in_world_words():
    slots = [
        SubjectWords("object", "sks", "circle"),
        SubjectWords("background", "xqz", "sea"),
        SubjectWords("accessory", "vlt", "hat"),
        SubjectWords("object", "pqm", "star"),
    ]
    assert composition_prompts(slots[:1]) == prompt_set("object", "sks", "circle")
    assert composition_prompts(slots[:2])[0] == "a sks circle on a xqz sea background"
    assert composition_prompts(slots[:3])[0] == "a sks circle wearing a vlt hat on a xqz sea background"
    assert (
        composition_prompts(slots)[0]
        == "a sks circle wearing a vlt hat next to a pqm star on a xqz sea background"
    )
    known = set(caption_words())
    for n in range(2, 5):
        prompts = composition_prompts(slots[:n])
        assert len(prompts) == 20 and len(set(prompts)) == 20
        for prompt in prompts:
            words = prompt.replace(",", " , ").split()
            assert set(words) <= known, prompt
            assert all(words.count(s.token) == 1 for s in slots[:n]), prompt
            assert (
                sum(
                    w in ("circle", "star", "square", "triangle", "cross", "heart", "diamond", "hexagon")
                    for w in words
                )
                <= 3
            )
            assert "a a" not in prompt and " a o" not in prompt  # articles agree: "an orange"
    with pytest.raises(ValueError, match="one background"):
        composition_prompts([slots[1], SubjectWords("background", "zrb", "grass")])
