"""The app's work without a page: seeds, identifiers, a search that reports and cancels, switching."""

import os

import pytest
from PIL import Image

from cones.app.work import Cancelled, Studio, parse_seeds, token_message
from cones.loaders import active_concepts


def test_seeds_are_parsed_or_refused_in_one_line():
    assert parse_seeds("0 1, 2") == [0, 1, 2]
    for text, message in (("", "no seeds"), ("0 x", "not whole numbers"), (" ".join("1" * 17), "too many")):
        with pytest.raises(ValueError, match=message):
            parse_seeds(text)


def test_identifier_message_is_the_command_lines(tiny_pipe):
    assert token_message(tiny_pipe.tokenizer, "sks") is None
    message = token_message(tiny_pipe.tokenizer, "notaword")
    assert "one token" in message and message.startswith("`--token` 'notaword' is")


@pytest.fixture
def studio(tiny_pipe, tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    return Studio(tiny_pipe, str(folder), "tiny")


def pictures(n=3):
    return [Image.new("RGB", (16, 16), (40 * i, 100, 200)) for i in range(n)]


def test_a_search_reports_every_step_then_saves_and_loads_the_concept(studio):
    seen = []
    outcome = studio.find(
        pictures(),
        token="sks",
        class_word="dog",
        sparsity=0.05,
        steps=3,
        num_class_images=2,
        progress=lambda k, n, loss: seen.append((k, n)),
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert outcome.name == "sks" and os.path.exists(outcome.path) and studio.concepts() == ["sks"]
    assert outcome.grid.width > 3 * 32 and "concept neurons" in outcome.summary
    assert active_concepts(studio.pipe) == []  # loaded, not left shut
    again = studio.find(pictures(), token="sks", class_word="dog", sparsity=0.05, steps=1, num_class_images=2)
    assert again.name == "sks_2" and studio.concepts() == ["sks", "sks_2"]


def test_a_cancelled_search_writes_nothing(studio):
    before = sorted(f for f in os.listdir(studio.workdir) if f.endswith(".cones"))

    def cancel_at_two(k, n, loss):
        if k == 2:
            studio.cancel.set()

    with pytest.raises(Cancelled):
        studio.find(
            pictures(),
            token="sks",
            class_word="dog",
            sparsity=0.05,
            steps=50,
            num_class_images=2,
            progress=cancel_at_two,
        )
    assert sorted(f for f in os.listdir(studio.workdir) if f.endswith(".cones")) == before
    assert studio.concepts() == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"token": "notaword"}, "one token"),
        ({"class_word": " "}, "no class word"),
        ({"sparsity": 1.5}, "between 0 and 1"),
        ({"steps": 0}, "positive"),
    ],
)
def test_bad_search_settings_are_one_line(studio, kwargs, message):
    args = {"token": "sks", "class_word": "dog", "sparsity": 0.05, "steps": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        studio.find(pictures(), **args)


def test_references_give_the_command_lines_messages(studio, tmp_path):
    with pytest.raises(ValueError, match="no reference images given"):
        studio.references([], None)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    with pytest.raises(ValueError, match="cannot read .*broken.png as an image"):
        studio.references([str(broken)], None)


def test_generate_switches_concepts_per_request(studio):
    studio.find(pictures(), token="sks", class_word="dog", sparsity=0.05, steps=1, num_class_images=2)
    picture = studio.generate(["sks"], "a sks dog", [0, 1], steps=2)
    single = studio.generate([], "a sks dog", [0, 1], steps=2)
    assert picture.height > single.height  # two rows against one
    assert active_concepts(studio.pipe) == []
    with pytest.raises(ValueError, match="not loaded"):
        studio.generate(["nope"], "a sks dog", [0], steps=2)
    with pytest.raises(ValueError, match="no prompt"):
        studio.generate([], "  ", [0])
