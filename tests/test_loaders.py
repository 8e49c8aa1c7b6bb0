import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from cones.loaders import active_concepts, load_concept, loaded_concepts, set_concepts, unload_concept
from cones.neurons import ConceptNeurons
from cones.storage import ConceptFileError, save_concept
from cones.targets import parameter_shapes


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a busy CPU a thread pool waits milliseconds per op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_concept(unet, density, seed, token=None, targets="all"):
    g = torch.Generator().manual_seed(seed)
    mask = {n: torch.rand(s, generator=g) < density for n, s in parameter_shapes(unet, targets).items()}
    return ConceptNeurons.from_mask(mask, token=token)


def snapshot(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters()}


def assert_shut_exactly(unet, original, concepts):
    """Weights are the originals with exactly the union of `concepts` set to zero."""
    expected = {n: t.clone() for n, t in original.items()}
    for concept in concepts:
        for name, idx in concept.indices.items():
            expected[name].view(-1)[idx] = 0
    for name, p in unet.named_parameters():
        assert torch.equal(p, expected[name]), name


def generate(pipe):
    return pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_load_switch_and_unload(tiny_pipe, tmp_path):
    unet = tiny_pipe.unet
    original = snapshot(unet)
    dog = random_concept(unet, 0.1, 0, token="sks")
    mug = random_concept(unet, 0.1, 1, token="xqz", targets="cross")
    save_concept(mug, tmp_path / "mug.cones")

    assert load_concept(tiny_pipe, dog) == "sks"
    assert load_concept(tiny_pipe, tmp_path / "mug.cones", name="mug") == "mug"
    assert active_concepts(tiny_pipe) == ["sks", "mug"]  # loading activates, alongside the others
    assert_shut_exactly(unet, original, [dog, mug])

    set_concepts(tiny_pipe, ["mug"])
    assert active_concepts(tiny_pipe) == ["mug"]
    assert_shut_exactly(unet, original, [mug])
    set_concepts(tiny_pipe, "sks")
    assert_shut_exactly(unet, original, [dog])
    set_concepts(tiny_pipe, ["mug", "sks", "mug"])
    assert sorted(active_concepts(tiny_pipe)) == ["mug", "sks"]
    assert_shut_exactly(unet, original, [dog, mug])
    set_concepts(tiny_pipe, [])
    assert_shut_exactly(unet, original, [])
    assert loaded_concepts(tiny_pipe) == ["sks", "mug"]

    set_concepts(tiny_pipe, ["sks", "mug"])
    unload_concept(tiny_pipe, "sks")
    assert loaded_concepts(tiny_pipe) == ["mug"] and active_concepts(tiny_pipe) == ["mug"]
    assert_shut_exactly(unet, original, [mug])
    unload_concept(tiny_pipe)
    assert_shut_exactly(unet, original, [])
    assert loaded_concepts(tiny_pipe) == [] and active_concepts(tiny_pipe) == []
    assert not hasattr(tiny_pipe, "_cones_concepts") and not hasattr(unet, "_cones_switching")


def test_switching_per_request_changes_the_images_and_back(tiny_pipe):
    base = generate(tiny_pipe)
    dog = random_concept(tiny_pipe.unet, 0.3, 0, token="sks")
    load_concept(tiny_pipe, dog)
    shut = generate(tiny_pipe)
    assert not torch.equal(shut, base)  # the shut weights reach the forward pass
    set_concepts(tiny_pipe, None)
    assert torch.equal(generate(tiny_pipe), base)
    set_concepts(tiny_pipe, ["sks"])
    assert torch.equal(generate(tiny_pipe), shut)
    unload_concept(tiny_pipe)
    assert torch.equal(generate(tiny_pipe), base)


def test_inactive_load_and_default_names(tiny_pipe, tmp_path):
    unet = tiny_pipe.unet
    original = snapshot(unet)
    anonymous = random_concept(unet, 0.1, 0)
    save_concept(anonymous, tmp_path / "teapot.cones")
    assert load_concept(tiny_pipe, tmp_path / "teapot.cones", activate=False) == "teapot"
    assert load_concept(tiny_pipe, anonymous, activate=False) == "concept"
    assert load_concept(tiny_pipe, anonymous, activate=False) == "concept_2"
    assert active_concepts(tiny_pipe) == []
    assert_shut_exactly(unet, original, [])
    with pytest.raises(ValueError, match="`name` 'teapot' is already loaded"):
        load_concept(tiny_pipe, anonymous, name="teapot")


def test_a_concept_for_another_model_is_refused_and_changes_nothing(tiny_pipe, tmp_path):
    other = UNet2DConditionModel(**{**tiny_pipe.unet.config, "cross_attention_dim": 24})
    foreign = random_concept(other, 0.1, 0, token="sks")
    save_concept(foreign, tmp_path / "foreign.cones")
    original = snapshot(tiny_pipe.unet)
    first_cross = next(n for n in foreign.shapes if ".attn2." in n)
    with pytest.raises(ValueError, match=rf"`{first_cross}` has shape \(16, 32\) .* \(16, 24\)"):
        load_concept(tiny_pipe, tmp_path / "foreign.cones")
    assert loaded_concepts(tiny_pipe) == []
    assert_shut_exactly(tiny_pipe.unet, original, [])


def test_bad_names_and_damaged_files(tiny_pipe, tmp_path):
    load_concept(tiny_pipe, random_concept(tiny_pipe.unet, 0.1, 0, token="sks"))
    with pytest.raises(ValueError, match="`names` has 'cat', which is not loaded; loaded: \\['sks'\\]"):
        set_concepts(tiny_pipe, ["sks", "cat"])
    assert active_concepts(tiny_pipe) == ["sks"]  # a refused switch changes nothing
    with pytest.raises(ValueError, match="`name` 'cat' is not loaded"):
        unload_concept(tiny_pipe, "cat")
    (tmp_path / "bad.cones").write_bytes(b"not a cones file")
    with pytest.raises(ConceptFileError, match="bad.cones"):
        load_concept(tiny_pipe, tmp_path / "bad.cones")
    assert loaded_concepts(tiny_pipe) == ["sks"]


def test_concept_made_on_one_instance_loads_into_a_pipeline_from_disk(tiny_pipe_path, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_path)
    concept = random_concept(pipe.unet, 0.05, 3, token="sks")
    save_concept(concept, tmp_path / "sks.cones")
    fresh = StableDiffusionPipeline.from_pretrained(tiny_pipe_path)
    original = snapshot(fresh.unet)
    load_concept(fresh, tmp_path / "sks.cones")
    assert_shut_exactly(fresh.unet, original, [concept])
    unload_concept(fresh)
    assert_shut_exactly(fresh.unet, original, [])
