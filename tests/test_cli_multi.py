"""`cones merge` and `cones refine` end to end, on a tiny model folder (and, marked slow, the world model)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cones.cli import main
from cones.neurons import ConceptNeurons
from cones.refine import concatenate
from cones.storage import load_concept_file, save_concept
from cones.targets import parameter_shapes


def random_concept(shapes, density, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    mask = {name: torch.rand(shape, generator=g) < density for name, shape in shapes.items()}
    return ConceptNeurons.from_mask(mask, **kw)


def as_sets(concept):
    return {name: set(idx.tolist()) for name, idx in concept.indices.items()}


@pytest.fixture
def concept_files(tiny_pipe, tmp_path):
    """Two .cones files for the tiny model: a dog (sks) and a cat (xqz), 20% of the cross-attention K/V."""
    shapes = parameter_shapes(tiny_pipe.unet, "cross")
    dog = random_concept(shapes, 0.2, 0, token="sks", class_word="dog")
    cat = random_concept(shapes, 0.2, 1, token="xqz", class_word="cat")
    paths = [str(tmp_path / "dog.cones"), str(tmp_path / "cat.cones")]
    save_concept(dog, paths[0])
    save_concept(cat, paths[1])
    return paths, dog, cat


def picture_folder(path, seed, n=3):
    os.makedirs(path)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            os.path.join(path, f"{i}.png")
        )
    return str(path)


# -- merge ------------------------------------------------------------------------------------------------


def test_merge_writes_the_union_with_every_identifier(concept_files, tmp_path, capsys):
    paths, dog, cat = concept_files
    out, plot = str(tmp_path / "pets.cones"), str(tmp_path / "overlap.png")
    assert main(["merge", *paths, "-o", out, "--plot", plot, "--format", "json"]) == 0
    merged = load_concept_file(out)
    for name, got in as_sets(merged).items():
        assert got == as_sets(dog)[name] | as_sets(cat)[name]
    assert [(p["token"], p["class_word"]) for p in merged.metadata["parts"]] == [
        ("sks", "dog"),
        ("xqz", "cat"),
    ]
    summary = json.loads(capsys.readouterr().out)
    shared = sum(len(as_sets(dog)[n] & as_sets(cat)[n]) for n in dog.shapes)
    assert summary["neurons"] == merged.num_neurons and summary["overlaps"][0]["shared"] == shared
    assert [p["file"] for p in summary["parts"]] == ["dog.cones", "cat.cones"]
    assert Image.open(plot).size[0] > 100
    # Never overwrites without --overwrite; a one-line error instead.
    assert main(["merge", *paths, "-o", out]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["merge", *paths, "-o", out, "--overwrite"]) == 0
    assert "wrote" in capsys.readouterr().out


def test_merge_refuses_other_models_single_files_and_warns_on_shared_identifiers(
    concept_files, tmp_path, capsys
):
    paths, dog, _ = concept_files
    name = next(iter(dog.shapes))
    alien = ConceptNeurons({}, {name: (3, 3)}, token="vlt", class_word="mug")
    save_concept(alien, tmp_path / "alien.cones")
    assert main(["merge", paths[0], str(tmp_path / "alien.cones"), "-o", str(tmp_path / "x.cones")]) == 1
    err = capsys.readouterr().err
    assert "different base models" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x.cones")
    assert main(["merge", paths[0], "-o", str(tmp_path / "x.cones")]) == 1
    assert "give two or more" in capsys.readouterr().err
    twin = random_concept(dog.shapes, 0.1, 7, token="sks", class_word="cat")
    save_concept(twin, tmp_path / "twin.cones")
    assert main(["merge", paths[0], str(tmp_path / "twin.cones"), "-o", str(tmp_path / "y.cones")]) == 0
    assert "identifier 'sks' is used by several concepts" in capsys.readouterr().err


def test_generate_with_a_merged_file_draws_what_both_concepts_draw(concept_files, tiny_pipe_path, tmp_path):
    paths, dog, cat = concept_files
    merged = str(tmp_path / "pets.cones")
    assert main(["merge", *paths, "-o", merged]) == 0
    common = ["--model", tiny_pipe_path, "--seeds", "0", "1", "--steps", "3"]
    prompt = "a sks dog with a xqz cat"
    assert main(["generate", prompt, *common, "--concept", merged, "--out", str(tmp_path / "one")]) == 0
    assert (
        main(
            [
                "generate",
                prompt,
                *common,
                "--concept",
                paths[0],
                "--concept",
                paths[1],
                "--out",
                str(tmp_path / "two"),
            ]
        )
        == 0
    )
    assert main(["generate", prompt, *common, "--out", str(tmp_path / "base")]) == 0
    for seed in (0, 1):
        one, two, base = (
            np.asarray(Image.open(tmp_path / d / f"prompt0-seed{seed}.png")) for d in ("one", "two", "base")
        )
        assert np.array_equal(one, two)  # shutting the union is shutting both
        assert not np.array_equal(one, base)


# -- refine -----------------------------------------------------------------------------------------------


def test_refine_with_picture_folders_and_a_joint_search(concept_files, tiny_pipe_path, tmp_path, capsys):
    paths, dog, cat = concept_files
    dogs, cats = picture_folder(tmp_path / "dogs", 0), picture_folder(tmp_path / "cats", 1)
    out, joint, plot = (str(tmp_path / f) for f in ("refined.cones", "joint.cones", "overlap.png"))
    args = ["refine", *paths, "--images", dogs, "--images", cats, "-o", out, "--model", tiny_pipe_path]
    args += ["--steps", "2", "--batch-size", "1", "--num-class-images", "2", "--quiet", "--format", "json"]
    assert main([*args, "--joint", joint, "--joint-steps", "2", "--plot", plot]) == 0
    summary = json.loads(capsys.readouterr().out)

    refined, union = load_concept_file(out), concatenate(dog, cat)
    for name, got in as_sets(refined).items():
        assert got <= as_sets(union)[name]  # the refinement stays inside the union
    assert 0 < refined.num_neurons <= union.num_neurons
    parts = refined.metadata["parts"]
    assert [(p["token"], p["class_word"]) for p in parts] == [("sks", "dog"), ("xqz", "cat")]
    assert [p["kept"] for p in parts] == [
        sum(len(as_sets(c)[n] & as_sets(refined)[n]) for n in c.shapes) for c in (dog, cat)
    ]
    assert refined.metadata["search"]["steps"] == 2 and refined.metadata["search"]["restricted"]
    assert summary["union_neurons"] == union.num_neurons and summary["refined_neurons"] == refined.num_neurons
    joint_concept = load_concept_file(joint)
    assert joint_concept.num_neurons <= union.num_neurons and joint_concept.metadata["combined"] == "joint"
    assert summary["joint_vs_concatenation"]["size_b"] == joint_concept.num_neurons
    assert Image.open(plot).size[0] > 100


def test_refine_keep_selects_a_share_of_the_union(concept_files, tiny_pipe_path, tmp_path, capsys):
    paths, dog, cat = concept_files
    merged = str(tmp_path / "pets.cones")
    assert main(["merge", *paths, "-o", merged]) == 0
    dogs, cats = picture_folder(tmp_path / "dogs", 0), picture_folder(tmp_path / "cats", 1)
    out = str(tmp_path / "refined.cones")
    args = ["refine", merged, "--images", dogs, "--images", cats, "-o", out, "--model", tiny_pipe_path]
    args += ["--steps", "2", "--batch-size", "1", "--prior-weight", "0", "--keep", "0.5", "--quiet"]
    assert main(args) == 0
    union = concatenate(dog, cat)
    assert 0 < load_concept_file(out).num_neurons <= round(0.5 * union.num_neurons)
    assert "kept" in capsys.readouterr().out


def test_refine_errors_are_one_line_and_come_before_the_model_loads(concept_files, tmp_path, capsys):
    paths, _, _ = concept_files
    dogs = picture_folder(tmp_path / "dogs", 0)
    missing_model = ["--model", str(tmp_path / "no-such-model")]  # never reached: the checks come first
    cases = [
        (["--images", dogs], "2 subjects [sks (dog), xqz (cat)] but 1"),
        (["--images", dogs, "--world-subject", "nope"], "'nope' is not a world subject"),
        (
            ["--images", dogs, "--world-subject", "sunset-sea"],
            "is a sea, but subject 2 of the concepts (xqz) is a cat",
        ),
        (["--images", dogs, "--images", str(tmp_path / "none")], "is not a folder"),
        (["--images", dogs, "--images", dogs, "--keep", "1.5"], "`--keep` must be a share in (0, 1]"),
    ]
    for extra, message in cases:
        assert main(["refine", *paths, *extra, "-o", str(tmp_path / "r.cones"), *missing_model]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["refine", paths[0], "--images", dogs, "-o", str(tmp_path / "r.cones")]) == 1
    assert "needs two or more" in capsys.readouterr().err


@pytest.mark.slow
def test_refine_world_subjects_on_the_embedded_model(tmp_path, capsys):
    import cones_world as world
    from cones.pipeline import load_pipeline

    shapes = parameter_shapes(load_pipeline(world.model_path()).unet, "cross")
    circle = random_concept(shapes, 0.01, 0, token="sks", class_word="circle")
    sea = random_concept(shapes, 0.01, 1, token="vlt", class_word="sea")
    save_concept(circle, tmp_path / "circle.cones")
    save_concept(sea, tmp_path / "sea.cones")
    out = str(tmp_path / "refined.cones")
    args = ["refine", str(tmp_path / "circle.cones"), str(tmp_path / "sea.cones"), "-o", out]
    args += ["--world-subject", "striped-circle", "--world-subject", "sunset-sea", "--steps", "2"]
    args += ["--batch-size", "1", "--num-class-images", "1", "--quiet", "--format", "json"]
    assert main(args) == 0
    refined, union = load_concept_file(out), concatenate(circle, sea)
    assert all(got <= as_sets(union)[n] for n, got in as_sets(refined).items())
    assert [p["token"] for p in refined.metadata["parts"]] == ["sks", "vlt"]
    assert json.loads(capsys.readouterr().out)["refined_neurons"] == refined.num_neurons
