"""Exports: the LoRA-style diff read back by an independent reader, and baked single-file checkpoints.

The reader below applies a file the way ComfyUI's and AUTOMATIC1111's LoRA loaders treat full-weight
differences, from the published convention alone, without cones' key function: a module key is
`lora_unet_` + the diffusers module path with dots made underscores (ComfyUI `model_lora_keys_unet`),
`<key>.diff` is a tensor added to that module's weight at the LoRA's strength (ComfyUI `load_lora`'s
"diff" patch, A1111 `network_full`).
"""

import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cones.cli import main
from cones.export import ExportError, bake_checkpoint, concept_diff, export_diff, lora_key
from cones.generate import generate
from cones.loaders import load_concept
from cones.neurons import ConceptNeurons
from cones.patches import applied
from cones.pipeline import load_pipeline
from cones.targets import target_parameters


def read_lora_diffs(unet_state: dict, lora: dict, strength: float = 1.0) -> dict:
    """A UNet state dict with a LoRA file's full-weight differences added, per the loaders' convention."""
    modules = {
        "lora_unet_" + key[: -len(".weight")].replace(".", "_"): key
        for key in unet_state
        if key.endswith(".weight")
    }
    patched = dict(unet_state)
    for key, value in lora.items():
        module, _, kind = key.rpartition(".")
        assert kind == "diff", f"unexpected key {key}"
        target = modules[module]  # a KeyError here: a key no loader would map
        weight = patched[target]
        assert value.shape == weight.shape
        patched[target] = weight + strength * value.to(weight.dtype)
    return patched


def random_concept(unet, share: float = 0.05, seed: int = 0, token: str = "sks") -> ConceptNeurons:
    generator = torch.Generator().manual_seed(seed)
    params = target_parameters(unet, "cross")
    mask = {name: torch.rand(p.shape, generator=generator) < share for name, p in params.items()}
    return ConceptNeurons.from_mask(mask, token=token, class_word="dog", metadata={"base_model": "tiny"})


def test_lora_keys_follow_the_kohya_naming():
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert lora_key(name) == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    with pytest.raises(ExportError, match="not a weight"):
        lora_key("down_blocks.1.attentions.0.proj_in.bias")


def test_a_diff_read_back_reproduces_the_shut_weights_exactly(tiny_pipe, tmp_path):
    unet = tiny_pipe.unet
    concept = random_concept(unet)
    path = str(tmp_path / "dog.safetensors")
    export_diff(concept, unet, path)
    lora = load_file(path)
    assert all(k.startswith("lora_unet_") and k.endswith(".diff") for k in lora)
    assert len(lora) == sum(1 for idx in concept.indices.values() if idx.numel())
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    patched = read_lora_diffs(base, lora)
    with applied(unet, concept):
        expected = unet.state_dict()
        for key in expected:
            assert torch.equal(patched[key], expected[key]), key  # bit for bit, shut and unshut weights alike
    with safe_open(path, framework="pt") as f:
        about = f.metadata()
    assert about["cones_export"] == "diff" and about["cones_token"] == "sks"
    assert about["cones_neurons"] == str(concept.num_neurons)


def test_a_diff_needs_the_base_weights(tiny_pipe):
    concept = random_concept(tiny_pipe.unet)
    with applied(tiny_pipe.unet, concept), pytest.raises(ExportError, match="shut in this UNet"):
        concept_diff(concept, tiny_pipe.unet)
    half = concept_diff(concept, tiny_pipe.unet, torch.float16)
    assert {v.dtype for v in half.values()} == {torch.float16}


def test_export_refuses_to_overwrite_and_leaves_no_temporary(tiny_pipe, tmp_path):
    concept = random_concept(tiny_pipe.unet)
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "dog.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_diff(concept, tiny_pipe.unet, str(path))
    assert path.read_bytes() == b"precious"
    export_diff(concept, tiny_pipe.unet, str(path), overwrite=True)
    assert load_file(str(path)) and os.listdir(tmp_path / "out") == ["dog.safetensors"]
    with pytest.raises(ExportError, match="should end in .safetensors"):
        export_diff(concept, tiny_pipe.unet, str(tmp_path / "dog.bin"))


def test_cli_export_and_its_messages(tiny_pipe_path, tmp_path, capsys):
    pipe = load_pipeline(tiny_pipe_path)
    concept = random_concept(pipe.unet)
    concept_path = str(tmp_path / "dog.cones")
    concept.save(concept_path)
    out = str(tmp_path / "dog.safetensors")
    args = ["export", concept_path, "--format", "diff", "--out", out, "--model", tiny_pipe_path]
    assert main(args) == 0
    patched = read_lora_diffs(pipe.unet.state_dict(), load_file(out))
    with applied(pipe.unet, concept):
        assert all(torch.equal(patched[k], v) for k, v in pipe.unet.state_dict().items())
    capsys.readouterr()
    assert main(args) == 1  # exists
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    # a concept of another model: one line, nothing written
    other = str(tmp_path / "other.safetensors")
    assert main(["export", concept_path, "--out", other]) == 1  # the embedded model, not the tiny one
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another base model" in err[0] and not os.path.exists(other)


def images_equal_within(a, b, tolerance: int = 1) -> bool:
    for row_a, row_b in zip(a, b, strict=True):
        for x, y in zip(row_a, row_b, strict=True):
            diff = np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int))
            if diff.max() > tolerance:
                return False
    return True


@pytest.mark.parametrize("model", ["tiny", "embedded"])
def test_a_baked_checkpoint_draws_what_the_applied_concept_draws(model, tiny_pipe_path, tmp_path):
    folder = tiny_pipe_path if model == "tiny" else None
    pipe = load_pipeline(folder)
    concepts = [random_concept(pipe.unet, 0.03, seed=1), random_concept(pipe.unet, 0.03, seed=2, token="xqz")]
    out = str(tmp_path / "baked.safetensors")
    zeroed = bake_checkpoint(pipe, concepts, out)
    assert zeroed == concepts[0].union(concepts[1]).num_neurons
    from cones.pipeline import resolve_model

    baked = load_pipeline(out, config=resolve_model(folder))
    prompts, seeds = ["a sks dog"] if model == "tiny" else ["a sks star on a sea background"], [0, 1]
    for c in concepts:
        load_concept(pipe, c)
    expected = generate(pipe, prompts, seeds, steps=4)
    got = generate(baked, prompts, seeds, steps=4)
    assert images_equal_within(expected, got, 1)  # within 1/255
    # the shut weights are zero in the checkpoint, and every other weight is the base model's
    with applied(pipe.unet):
        assert all(torch.equal(v, baked.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())


def test_baking_a_single_file_keeps_its_tensors_and_zeroes_the_concept(tiny_pipe_path, tmp_path, capsys):
    pipe = load_pipeline(tiny_pipe_path)
    concept = random_concept(pipe.unet)
    first = str(tmp_path / "plain.safetensors")
    bake_checkpoint(pipe, [ConceptNeurons({}, concept.shapes)], first)  # an empty concept: the model as is
    concept_path = str(tmp_path / "dog.cones")
    concept.save(concept_path)
    out = str(tmp_path / "dog-model.safetensors")
    argv = ["bake", concept_path, "--out", out, "--model", first, "--config", tiny_pipe_path]
    assert main(argv) == 0
    plain, baked = load_file(first), load_file(out)
    assert plain.keys() == baked.keys()
    changed = {k for k in plain if not torch.equal(plain[k], baked[k])}
    assert changed and all(".attn2.to_" in k for k in changed)
    assert sum(int((plain[k] != baked[k]).sum()) for k in changed) <= concept.num_neurons
    assert all(int(baked[k].eq(0).sum()) >= int(plain[k].eq(0).sum()) for k in changed)
    capsys.readouterr()
    assert main(argv) == 1 and "--overwrite" in capsys.readouterr().err


def test_folders_of_sd2_are_refused_in_one_line(tiny_pipe):
    from types import SimpleNamespace

    from cones.export import to_ldm

    sd2 = SimpleNamespace(unet=SimpleNamespace(config={"cross_attention_dim": 1024}), text_encoder=None)
    with pytest.raises(ExportError, match="SD 2.x model.*single .safetensors checkpoint"):
        to_ldm(sd2)
    other = SimpleNamespace(unet=tiny_pipe.unet, text_encoder=torch.nn.Linear(2, 2))
    with pytest.raises(ExportError, match="with a CLIP text encoder"):
        to_ldm(other)
