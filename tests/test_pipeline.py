"""Loading base models (folders, single original-layout checkpoints) and the precision and memory options.

The single-file tests write the tiny pipeline in the original Stable Diffusion checkpoint layout
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`) with
`cones.export.to_ldm`, the inverse of diffusers' conversion (what `cones bake` writes), and check that
`load_pipeline`, through diffusers' own loader, gives back the same weights. The precision tests measure how far
float16 / bfloat16 searches agree with the float32 one on the tiny model, without forcing it.
"""

import copy
import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from cones.dtypes import LossScaled, resolve_dtype
from cones.export import to_ldm
from cones.memory import attention_processors, gradient_checkpointing, memory_settings, uses_sdpa
from cones.neurons import ConceptNeurons
from cones.objective import ConceptObjective, ObjectiveConfig
from cones.overlap import overlap
from cones.pipeline import ModelError, checkpoint_family, load_pipeline, resolve_model
from cones.search import SearchError, find_concept_neurons
from cones.storage import concept_to_bytes
from cones.targets import target_parameters


def folder_snapshot(path: str) -> dict[str, tuple[int, int, str]]:
    """(size, mtime_ns, sha256) of every file under `path`."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            st = os.stat(full)
            out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns, digest)
    return out


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def single_files(tiny_pipe_path, tmp_path_factory):
    """The tiny pipeline as model.safetensors and model.ckpt in the original layout, next to its folder."""
    root = tmp_path_factory.mktemp("single")
    pipe = load_pipeline(tiny_pipe_path)
    state = to_ldm(pipe)
    save_file(state, str(root / "model.safetensors"))
    torch.save({"state_dict": state, "global_step": 0}, str(root / "model.ckpt"))
    return {"safetensors": str(root / "model.safetensors"), "ckpt": str(root / "model.ckpt"), "state": state}


# ---------------------------------------------------------------------------------------------------
# Folders


def test_loads_a_folder_on_the_device_in_the_dtype(tiny_pipe_path):
    pipe = load_pipeline(tiny_pipe_path, dtype="bf16")
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.bfloat16
    assert pipe.safety_checker is None and pipe.unet.device.type == "cpu"
    assert not pipe.unet.is_gradient_checkpointing
    assert load_pipeline(tiny_pipe_path, gradient_checkpointing=True).unet.is_gradient_checkpointing


def test_default_is_the_embedded_model():
    import cones_world as world

    assert resolve_model(None) == world.model_path()


def test_folder_errors(tmp_path, tiny_pipe_path):
    with pytest.raises(ModelError, match=r"`model` '.*nowhere' does not exist"):
        load_pipeline(str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="has no model_index.json"):
        load_pipeline(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match=r"neither a folder nor a \.safetensors/\.ckpt file"):
        load_pipeline(str(tmp_path / "weights.bin"))
    xl = tmp_path / "sdxl"
    xl.mkdir()
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(
        ModelError,
        match="StableDiffusionXLPipeline folder, which cones does not support; it supports Stable Diffusion 1.x and 2.x",
    ):
        load_pipeline(str(xl))
    with pytest.raises(ModelError, match="`config` .* is only for single-file checkpoints"):
        load_pipeline(tiny_pipe_path, config=tiny_pipe_path)
    with pytest.raises(ValueError, match="`dtype` 'fp8' is not supported"):
        load_pipeline(tiny_pipe_path, dtype="fp8")


# ---------------------------------------------------------------------------------------------------
# Single original-layout checkpoints


@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_single_file_gives_the_folders_weights(single_files, tiny_pipe_path, kind):
    folder = load_pipeline(tiny_pipe_path)
    single = load_pipeline(single_files[kind], config=tiny_pipe_path)
    for name in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(folder, name), getattr(single, name)), name
    assert dict(single.scheduler.config) == dict(folder.scheduler.config)
    assert single.tokenizer("a sks dog").input_ids == folder.tokenizer("a sks dog").input_ids
    assert checkpoint_family(single_files[kind]) == "v1"


def test_loading_never_writes_to_the_model(single_files, tiny_pipe_path):
    files = {p: os.stat(p).st_mtime_ns for p in (single_files["safetensors"], single_files["ckpt"])}
    before = folder_snapshot(tiny_pipe_path)
    load_pipeline(tiny_pipe_path)
    load_pipeline(single_files["safetensors"], config=tiny_pipe_path)
    load_pipeline(single_files["ckpt"], config=tiny_pipe_path)
    assert folder_snapshot(tiny_pipe_path) == before
    assert {p: os.stat(p).st_mtime_ns for p in files} == files


def test_single_file_needs_a_config_folder(single_files, tmp_path, tiny_pipe_path):
    with pytest.raises(ModelError, match=r"`config` is missing: .* pass config=<folder> \(--config\)"):
        load_pipeline(single_files["safetensors"])
    with pytest.raises(ModelError, match="`config` .* is not a folder"):
        load_pipeline(single_files["safetensors"], config=str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="`config` .* has no model_index.json"):
        load_pipeline(single_files["safetensors"], config=str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelError, match="`config` .* has no readable unet/config.json"):
        load_pipeline(single_files["safetensors"], config=str(tmp_path))


def test_config_of_another_variant_is_refused(single_files, tmp_path, tiny_pipe_path):
    state = {
        k: (torch.zeros(v.shape[0], 48) if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) else v)
        for k, v in single_files["state"].items()
    }
    path = str(tmp_path / "other.safetensors")
    save_file(state, path)
    with pytest.raises(ModelError, match="is for cross_attention_dim 32 but .* has 48"):
        load_pipeline(path, config=tiny_pipe_path)


def _write(tmp_path, name: str, state: dict) -> str:
    path = str(tmp_path / name)
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def test_other_families_are_refused_by_name(tmp_path, single_files, tiny_pipe_path):
    state = single_files["state"]
    xl = {**state, "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(4)}
    with pytest.raises(
        ModelError, match="is SDXL, which cones does not support; it supports Stable Diffusion 1.x and 2.x"
    ):
        load_pipeline(_write(tmp_path, "xl.safetensors", xl), config=tiny_pipe_path)
    inpaint = {**state, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(16, 9, 3, 3)}
    with pytest.raises(ModelError, match=r"is SD 1.x inpainting \(9-channel UNet\)"):
        load_pipeline(_write(tmp_path, "inpaint.safetensors", inpaint), config=tiny_pipe_path)
    with pytest.raises(ModelError, match="holds no 4-channel Stable Diffusion UNet"):
        checkpoint_family(_write(tmp_path, "other.safetensors", {"encoder.weight": torch.zeros(3, 3)}))
    unet_only = {k: v for k, v in state.items() if k.startswith("model.")}
    with pytest.raises(ModelError, match=r"holds no VAE \(`first_stage_model.\*` weights\)"):
        checkpoint_family(_write(tmp_path, "unet.safetensors", unet_only))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="is not a readable safetensors file"):
        checkpoint_family(str(tmp_path / "broken.safetensors"))


class _Payload:
    """Unpickling this would create `marker`: the test of never running pickled code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_ckpt_with_code_is_refused_without_running_it(tmp_path, single_files, tiny_pipe_path):
    marker = str(tmp_path / "ran")
    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": single_files["state"], "payload": _Payload(marker)}, path)
    with pytest.raises(
        ModelError, match=r"holds pickled Python objects besides tensors, and cones never unpickles code"
    ):
        load_pipeline(path, config=tiny_pipe_path)
    assert not os.path.exists(marker)


def test_family_from_names_and_shapes_of_full_size_checkpoints():
    key = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    common = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    }
    assert checkpoint_family({**common, key: (320, 768)}) == "v1"
    assert checkpoint_family({**common, key: (320, 1024)}) == "v2"


# ---------------------------------------------------------------------------------------------------
# Precision and memory


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1


def objective(pipe) -> ConceptObjective:
    return ConceptObjective.from_pipeline(
        pipe,
        images(3, 1),
        token="sks",
        class_word="dog",
        class_images=images(4, 2),
        config=ObjectiveConfig(seed=0),
    )


def search(pipe, obj=None, **kwargs):
    kwargs = {"steps": 4, "sparsity": 0.02, "disable": True, **kwargs}
    return find_concept_neurons(obj if obj is not None else objective(pipe), pipe.unet, **kwargs)


def test_resolve_dtype():
    assert resolve_dtype("fp16") is torch.float16 and resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float64) is torch.float64
    with pytest.raises(ValueError, match="`dtype` torch.int8 is not a floating dtype"):
        resolve_dtype(torch.int8)


def test_attention_is_torch_sdpa(tiny_pipe):
    # diffusers' default processor on torch 2 calls F.scaled_dot_product_attention in every layer.
    assert uses_sdpa(tiny_pipe.unet)
    assert attention_processors(tiny_pipe.unet) == {
        "AttnProcessor2_0": 8
    }  # 4 transformer blocks x (attn1, attn2)
    settings = memory_settings(tiny_pipe.unet)
    assert settings["dtype"] == "float32" and settings["gradient_checkpointing"] is False


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_search_keeps_float32_state_and_restores_the_half_weights(tiny_pipe, dtype):
    pipe = tiny_pipe.to(dtype)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = search(pipe)
    assert all(s.dtype == torch.float32 for s in result.scores.values())
    assert all(torch.isfinite(s).all() for s in result.scores.values())
    after = pipe.unet.state_dict()
    assert all(after[k].dtype == dtype and torch.equal(after[k], v) for k, v in before.items())


def test_same_indices_give_the_same_file_whatever_the_dtype(tiny_pipe, tmp_path):
    r32 = search(tiny_pipe)
    half = load_pipeline_like(tiny_pipe, torch.float16)
    r16 = search(half)
    # The same selection, recorded against the float16 model: the file holds indices, names, shapes and the
    # base weights' float16 digest only.
    same = ConceptNeurons(
        r32.concept.indices,
        r16.concept.shapes,
        token="sks",
        class_word="dog",
        metadata=r16.concept.metadata,
        base_sha256=r16.concept.base_sha256,  # the float16 digest, which the float32 model gives too
    )
    assert concept_to_bytes(same) == concept_to_bytes(r32.concept)
    # ... and it shuts the same weights in either model.
    with same.shut(half.unet), r32.concept.shut(tiny_pipe.unet):
        for name, p in target_parameters(half.unet).items():
            assert torch.equal(p == 0, target_parameters(tiny_pipe.unet)[name] == 0)


def load_pipeline_like(pipe, dtype):
    """A second copy of the tiny pipeline in `dtype` (same weights, rounded)."""
    return copy.deepcopy(pipe).to(dtype)


def test_gradient_checkpointing_gives_the_same_search(tiny_pipe):
    calls = []  # forward calls of a nonlinearity behind a target: checkpointing runs it again in the backward
    tiny_pipe.unet.up_blocks[1].resnets[0].nonlinearity.register_forward_hook(lambda *_: calls.append(1))
    plain = search(tiny_pipe, steps=2)
    plain_calls = len(calls)
    with gradient_checkpointing(tiny_pipe.unet):
        assert tiny_pipe.unet.is_gradient_checkpointing
        checkpointed = search(tiny_pipe, steps=2)
    assert len(calls) - plain_calls == 2 * plain_calls
    assert not tiny_pipe.unet.is_gradient_checkpointing
    assert checkpointed.concept == plain.concept
    for name, s in plain.scores.items():
        torch.testing.assert_close(checkpointed.scores[name], s, rtol=1e-5, atol=1e-9)


def test_loss_scaling_is_exact_in_float32(tiny_pipe):
    # Scaling by a power of two is exact, so the loss-scaled search is the plain one bit for bit.
    plain = search(tiny_pipe)
    scaled = LossScaled(objective(tiny_pipe), scale=1024)
    result = search(tiny_pipe, scaled, gradient_hook=scaled.unscale)
    assert result.losses == plain.losses and result.concept == plain.concept
    assert all(torch.equal(result.scores[k], s) for k, s in plain.scores.items())
    assert scaled.token == "sks" and scaled.class_word == "dog"


def test_loss_scaling_overflow_is_a_clear_error(tiny_pipe):
    pipe = tiny_pipe.to(torch.float16)
    scaled = LossScaled(objective(pipe), scale=2.0**60)
    with pytest.raises(SearchError, match="overflowed torch.float16; pass a smaller `scale`"):
        search(pipe, scaled, gradient_hook=scaled.unscale, steps=1)
    with pytest.raises(ValueError, match="`scale` must be a finite number > 0"):
        LossScaled(scaled, scale=0)


HALF_STEPS = 50


@pytest.fixture(scope="module")
def precision_runs(tmp_path_factory):
    """float32, float16 and bfloat16 searches of one tiny model (copies of it, rounded) and objective."""
    from tiny import make_tiny_pipeline

    # One build, copied: two builds can differ in their tokenizer's ids (BPE ties), hence in the objective.
    base = make_tiny_pipeline(str(tmp_path_factory.mktemp("precision")))
    runs = {}
    for label, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        pipe = copy.deepcopy(base).to(dtype)
        runs[label] = search(pipe, steps=HALF_STEPS, sparsity=0.01)
    return runs


# Measured (50 A2 steps, 1% of the 5,120 cross-attention K/V weights, 51 neurons), Jaccard with the float32
# concept at 1% / 2% / 5% / 10%: float16 1.000 / 0.981 / 0.992 / 0.996, bfloat16 1.000 / 0.981 / 0.939 /
# 0.969; at 100 steps bfloat16 0.889 at 1%. Score correlation >= 0.998. The floors leave room for
# the rounding of other CPUs and torch versions.
HALF_FLOORS = {"fp16": (0.9, 0.9), "bf16": (0.75, 0.85)}


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(HALF_FLOORS))
def test_half_precision_concepts_overlap_the_float32_one(precision_runs, label):
    ref, run = precision_runs["fp32"], precision_runs[label]
    at_1 = overlap(ref.select(sparsity=0.01), run.select(sparsity=0.01)).jaccard
    at_10 = overlap(ref.select(sparsity=0.10), run.select(sparsity=0.10)).jaccard
    floor_1, floor_10 = HALF_FLOORS[label]
    assert at_1 >= floor_1 and at_10 >= floor_10, (label, at_1, at_10)
    a = torch.cat([s.flatten() for s in ref.scores.values()])
    b = torch.cat([s.flatten() for s in run.scores.values()])
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99
