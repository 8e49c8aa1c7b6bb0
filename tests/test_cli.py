"""The command line, end to end on a tiny model saved to disk, as a user would run it."""

import json
import os

import pytest
from PIL import Image

from cones.cli import main
from cones.neurons import ConceptNeurons


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, colour in enumerate([(200, 30, 30), (190, 40, 20), (210, 20, 40)]):
        Image.new("RGB", (32 + 8 * i, 32), colour).save(folder / f"{i}.png")
    return str(folder)


def find(args, tiny_pipe_path, tmp_path):
    return main(
        [
            "find",
            "--model",
            tiny_pipe_path,
            "--steps",
            "3",
            "--num-class-images",
            "2",
            "--batch-size",
            "1",
            "--cache-dir",
            str(tmp_path / "cache"),
            *args,
        ]
    )


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("find", "generate", "demo", "env", "train-world"):
        assert command in out


def test_every_help_ends_with_an_example(capsys):
    """Each command's --help keeps its prose on top and ends with runnable examples of that command."""
    from cones.cli import _commands

    for name in [None, *_commands()]:
        with pytest.raises(SystemExit):
            main(["--help"] if name is None else [name, "--help"])
        lines = capsys.readouterr().out.rstrip().splitlines()
        start = lines.index("examples:")
        assert lines[start + 1].lstrip().startswith(("cones", "torchrun")), name
        assert all(line.startswith("  ") for line in lines[start + 1 :]), name
        if name is not None:
            assert any(f"cones {name}" in line or f"cli {name}" in line for line in lines[start:]), name


def test_find_then_generate(tiny_pipe_path, photos, tmp_path, capsys):
    out = str(tmp_path / "dog.cones")
    assert (
        find(
            [
                "--images",
                photos,
                "--token",
                "sks",
                "--class-word",
                "dog",
                "--out",
                out,
                "--class-guidance",
                "3",
                "--format",
                "json",
            ],
            tiny_pipe_path,
            tmp_path,
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    concept = ConceptNeurons.load(out)
    assert concept.token == "sks" and concept.class_word == "dog"
    assert summary["neurons"] == concept.num_neurons > 0
    assert concept.metadata["base_model"] == os.path.abspath(tiny_pipe_path)
    # the file says how its prior was made: which class images, at which guidance
    search = concept.metadata["search"]
    assert search["class_images"] == {"source": "base model", "guidance_scale": 3.0, "steps": 25}
    objective = search["objective"]
    assert (objective["subject_images"], objective["class_images"]) == (3, 2)
    assert objective["subject_prompts"] == ["a sks dog"] and objective["class_prompts"] == ["a dog"]

    images = str(tmp_path / "images")
    assert (
        main(
            [
                "generate",
                "--model",
                tiny_pipe_path,
                "--concept",
                out,
                "--seeds",
                "0",
                "1",
                "--steps",
                "2",
                "a sks dog",
                "--out",
                images,
            ]
        )
        == 0
    )
    assert sorted(os.listdir(images)) == ["grid.png", "prompt0-seed0.png", "prompt0-seed1.png"]
    # a second run refuses to overwrite the images
    assert (
        main(
            [
                "generate",
                "--model",
                tiny_pipe_path,
                "--seeds",
                "0",
                "--steps",
                "2",
                "a sks dog",
                "--out",
                images,
            ]
        )
        == 1
    )
    assert "--overwrite" in capsys.readouterr().err


def test_find_resuming_another_search_is_one_clear_line(tiny_pipe_path, photos, tmp_path, capsys):
    checkpoint = str(tmp_path / "search.safetensors")
    args = ["--images", photos, "--token", "sks", "--class-word", "dog", "--checkpoint", checkpoint]
    assert find([*args, "--out", str(tmp_path / "a.cones")], tiny_pipe_path, tmp_path) == 0
    capsys.readouterr()
    assert find([*args, "--out", str(tmp_path / "b.cones"), "--seed", "1"], tiny_pipe_path, tmp_path) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "another search" in err and "pass a new path or the same settings" in err
    assert not (tmp_path / "b.cones").exists()


def test_find_refuses_to_overwrite_before_searching(tiny_pipe_path, photos, tmp_path, capsys):
    out = tmp_path / "dog.cones"
    out.write_bytes(b"precious")
    assert (
        find(
            ["--images", photos, "--token", "sks", "--class-word", "dog", "--out", str(out)],
            tiny_pipe_path,
            tmp_path,
        )
        == 1
    )
    assert out.read_bytes() == b"precious"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--token": "notaword"}, "one token"),
        ({"--images": "EMPTY"}, "holds no images"),
        ({"--model": "MISSING"}, "does not exist"),
    ],
)
def test_find_bad_input_is_one_clear_line(tiny_pipe_path, photos, tmp_path, capsys, change, message):
    (tmp_path / "empty").mkdir()
    args = {"--images": photos, "--token": "sks", "--class-word": "dog", "--out": str(tmp_path / "x.cones")}
    args.update(change)
    args = {
        k: (str(tmp_path / "empty") if v == "EMPTY" else str(tmp_path / "nope") if v == "MISSING" else v)
        for k, v in args.items()
    }
    argv = [x for kv in args.items() for x in kv]
    model = args.pop("--model", tiny_pipe_path)
    assert main(["find", "--model", model, "--steps", "2", "--num-class-images", "2", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not os.path.exists(tmp_path / "x.cones")


def test_env_prints_versions(capsys):
    assert main(["env", "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cones"] and info["torch"] and info["diffusers"]


@pytest.mark.slow
def test_demo_runs_end_to_end_on_the_embedded_model(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out, "--steps", "4", "--seeds", "1"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert set(report["with"]) == {"image_alignment", "text_alignment", "subject_rate"}
    assert os.path.exists(os.path.join(out, "grid.png"))
    assert os.path.exists(os.path.join(out, f"{report['subject']}.cones"))
    printed = capsys.readouterr().out  # it ends by saying where the picture is and what to look for
    assert f"picture: {os.path.join(out, 'grid.png')}" in printed and "Look for" in printed
    assert main(["demo", "--out", out, "--steps", "4", "--seeds", "1"]) == 1  # refuses to overwrite


def test_the_base_model_on_disk_is_never_modified(tiny_pipe_path, photos, tmp_path):
    import hashlib

    def fingerprint():
        out = {}
        for root, _, files in os.walk(tiny_pipe_path):
            for f in files:
                path = os.path.join(root, f)
                out[path] = (hashlib.sha256(open(path, "rb").read()).hexdigest(), os.path.getmtime(path))
        return out

    before = fingerprint()
    out = str(tmp_path / "c.cones")
    assert (
        find(
            ["--images", photos, "--token", "sks", "--class-word", "dog", "--out", out],
            tiny_pipe_path,
            tmp_path,
        )
        == 0
    )
    assert (
        main(
            [
                "generate",
                "--model",
                tiny_pipe_path,
                "--concept",
                out,
                "--seeds",
                "0",
                "--steps",
                "2",
                "a sks dog",
                "--out",
                str(tmp_path / "img"),
            ]
        )
        == 0
    )
    assert fingerprint() == before
