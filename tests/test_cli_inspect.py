"""`cones inspect`: what a .cones file holds, checked against a concept whose numbers are worked out by hand."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cones.cli import main
from cones.neurons import ConceptNeurons
from cones.precision import TunedConcept

K = "blocks.0.attn2.to_k.weight"
V = "blocks.0.attn2.to_v.weight"


@pytest.fixture
def concept_file(tmp_path):
    # to_k: 3 of 4 x 8 = 32 weights; to_v: none of 2 x 5 = 10. In all 3 of 42 weights.
    concept = ConceptNeurons(
        {K: torch.tensor([0, 3, 31]), V: torch.tensor([], dtype=torch.int64)},
        {K: (4, 8), V: (2, 5)},
        token="sks",
        class_word="dog",
        metadata={"search": {"steps": 7, "objective": {"seed": 3, "prompts": ["a sks dog"]}}},
    )
    path = tmp_path / "dog.cones"
    concept.save(path)
    return concept, path


def test_json_report_by_hand(concept_file, capsys):
    _, path = concept_file
    assert main(["inspect", str(path), "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["neurons"] == 3 and info["weights"] == 42
    assert info["sparsity"] == pytest.approx(3 / 42)
    assert (info["token"], info["class_word"], info["metadata"]) == (
        "sks",
        "dog",
        {"search": {"steps": 7, "objective": {"seed": 3, "prompts": ["a sks dog"]}}},
    )
    assert info["bytes"] == path.stat().st_size
    assert info["encoding"] == "rice" and info["format_version"] == 1
    assert info["entropy_bound_bytes"] == math.ceil(math.log2(math.comb(32, 3)) / 8)  # = 2
    assert [(p["name"], p["neurons"], p["weights"]) for p in info["parameters"]] == [(K, 3, 32), (V, 0, 10)]
    assert info["parameters"][0]["sparsity"] == pytest.approx(3 / 32)


def test_text_report(concept_file, capsys):
    _, path = concept_file
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 of 42 target weights (sparsity 7.1429%), in 1 of 2 parameters" in out
    assert f"{path.stat().st_size:,} bytes" in out
    # nested metadata, one leaf per line
    assert "search.steps: 7" in out and "search.objective.seed: 3" in out
    assert 'search.objective.prompts: ["a sks dog"]' in out
    lines = out.splitlines()
    assert any(line.split() == ["3", "32", "9.375%", K] for line in lines)
    assert any(line.split() == ["0", "10", "0.000%", V] for line in lines)


def test_plot_draws_a_bar_per_parameter(concept_file, tmp_path, capsys):
    _, path = concept_file
    plot = tmp_path / "layers.png"
    assert main(["inspect", str(path), "--plot", str(plot)]) == 0
    pixels = np.asarray(Image.open(plot).convert("RGB")).astype(int)
    red = np.abs(pixels - [214, 96, 77]).sum(-1) == 0
    blue = np.abs(pixels - [67, 147, 195]).sum(-1) == 0
    assert red.sum() > 100  # the to_k bar, the longest: the full span
    assert blue.sum() == 0  # the to_v parameter has no neurons: no bar
    assert main(["inspect", str(path), "--plot", str(plot)]) == 1  # never overwrites without --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_damaged_or_missing_files_are_one_line_errors(concept_file, tmp_path, capsys):
    _, path = concept_file
    data = path.read_bytes()
    (tmp_path / "cut.cones").write_bytes(data[:-3])
    assert main(["inspect", str(tmp_path / "cut.cones")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("cones inspect: error: cannot read") and "\n" not in err
    assert main(["inspect", str(tmp_path / "nothing.cones")]) == 1
    err = capsys.readouterr().err
    assert "nothing.cones': it does not exist; pass the path of a .cones file" in err


def test_values_file_is_recognised(concept_file, tmp_path, capsys):
    concept, _ = concept_file
    tuned = TunedConcept(concept, "quaternary", {K: torch.tensor([0, 1, 3], dtype=torch.uint8)})
    tuned.save(tmp_path / "dog.cones-values")
    assert main(["inspect", str(tmp_path / "dog.cones-values"), "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["precision"], info["neurons"], info["values_bytes"]) == (
        "cones-values",
        "quaternary",
        3,
        1,
    )
