"""Cross-attention maps: against a hand computation of softmax(QKᵀ·scale), the softmax's sum to one, exact
restoration of the processors, unchanged outputs (the same image as `generate`), the world's object masks
against the renderer's pixels, and the overlap measures on maps worked out by hand. Tiny real SD models.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from cones.attention import (
    CrossAttentionRecorder,
    attention_figure,
    attention_maps,
    attention_maps_for_image,
    attention_share,
    heatmap,
    resample,
    top_iou,
)
from cones.cli import main
from cones.generate import generate
from cones.neurons import ConceptNeurons
from cones.search import select_neurons
from cones.targets import target_parameters
from cones_world.render import thing_mask

STEPS = 3


def state(unet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def some_concept(unet, sparsity=0.2) -> ConceptNeurons:
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in target_parameters(unet, "cross").items()}
    return ConceptNeurons.from_mask(select_neurons(scores, sparsity=sparsity), token="sks", class_word="dog")


def unet_inputs(pipe, prompt="a sks dog"):
    ids = pipe.tokenizer(
        [prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]  # (1, 16, 32)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return latents, text


# -- the recorder -------------------------------------------------------------------------------------


def test_recorder_matches_softmax_by_hand_and_leaves_outputs_unchanged(tiny_pipe):
    unet = tiny_pipe.unet
    latents, text = unet_inputs(tiny_pipe)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    attn = unet.get_submodule(name)
    seen = {}
    hook = attn.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        plain = unet(latents, 10, encoder_hidden_states=text).sample
        with CrossAttentionRecorder(unet, 8) as recorder:
            recorded = unet(latents, 10, encoder_hidden_states=text).sample
    hook.remove()
    assert torch.equal(plain, recorded)  # the original processor computed the output

    # softmax(Q Kᵀ / √d) per head, by hand in float64, then the mean over heads
    x = seen["x"].double()  # (1, 64, 16): the hidden states entering attn2
    q = x @ attn.to_q.weight.double().T  # (1, 64, 16)
    k = text.double() @ attn.to_k.weight.double().T  # (1, 16 text, 16)
    heads, d = attn.heads, q.shape[-1] // attn.heads
    q = q.view(1, 64, heads, d).transpose(1, 2)  # (1, heads, 64, d)
    k = k.view(1, 16, heads, d).transpose(1, 2)  # (1, heads, 16, d)
    probs = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)  # (1, heads, 64, 16)
    expected = probs[0].mean(0).T.reshape(16, 8, 8)  # (text, h, w)
    got = recorder.layer_maps()[name]
    assert torch.allclose(got.double(), expected, atol=1e-6)
    assert recorder.calls == 4  # 1 in the down block, 1 in the mid block, 2 (layers_per_block + 1) going up


def test_layers_are_laid_out_at_their_resolution(tiny_pipe):
    latents, text = unet_inputs(tiny_pipe)
    with torch.no_grad(), CrossAttentionRecorder(tiny_pipe.unet, 8) as recorder:
        tiny_pipe.unet(latents, 10, encoder_hidden_states=text)
    shapes = {n.split(".")[0]: tuple(m.shape) for n, m in recorder.layer_maps().items()}
    assert shapes == {"down_blocks": (16, 8, 8), "mid_block": (16, 4, 4), "up_blocks": (16, 8, 8)}
    with pytest.raises(ValueError, match="latent_size"):
        with torch.no_grad(), CrossAttentionRecorder(tiny_pipe.unet, 6):
            tiny_pipe.unet(latents, 10, encoder_hidden_states=text)


def test_processors_are_restored_exactly_also_on_error(tiny_pipe):
    unet = tiny_pipe.unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with CrossAttentionRecorder(unet, 8):
            assert any(p is not before[n] for n, p in unet.attn_processors.items())
            raise RuntimeError("boom")
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


# -- maps of a prompt ---------------------------------------------------------------------------------


def test_maps_of_a_generated_image(tiny_pipe):
    maps = attention_maps(tiny_pipe, "a sks dog", seed=5, steps=STEPS)
    same = generate(tiny_pipe, ["a sks dog"], [5], steps=STEPS)[0][0]
    assert np.array_equal(np.asarray(maps.image), np.asarray(same))  # recording changes nothing
    assert maps.tokens == ["a", "sks", "dog"]
    assert maps.probabilities.shape == (16, 8, 8) and maps.maps.shape == (3, 8, 8)
    assert maps.calls == STEPS * 4  # one call per step and cross-attention layer (the CFG batch is one call)
    # every pixel spreads one unit of attention over the text positions, at any resolution
    assert torch.allclose(maps.probabilities.sum(0), torch.ones(8, 8), atol=1e-5)
    for size in (5, 32):
        assert torch.allclose(resample(maps.probabilities, size).sum(0), torch.ones(size, size), atol=1e-5)
    assert torch.allclose(maps.prompt_maps.sum(0), torch.ones(8, 8), atol=1e-5)
    assert torch.equal(maps.token_map("sks"), maps.maps[1])
    assert torch.equal(maps.token_map("dog", over="prompt"), maps.prompt_maps[2])
    with pytest.raises(ValueError, match="`word` 'cat'"):
        maps.token_map("cat")


def test_shutting_a_concept_changes_the_maps_and_is_undone(tiny_pipe):
    unet = tiny_pipe.unet
    concept = some_concept(unet)
    before_weights = state(unet)
    before = attention_maps(tiny_pipe, "a sks dog", seed=1, steps=STEPS, resolution=16)
    after = attention_maps(tiny_pipe, "a sks dog", seed=1, steps=STEPS, resolution=16, concept=concept)
    assert after.probabilities.shape == (16, 16, 16)
    assert not torch.allclose(before.probabilities, after.probabilities)
    again = attention_maps(tiny_pipe, "a sks dog", seed=1, steps=STEPS, resolution=16)
    assert torch.equal(before.probabilities, again.probabilities)
    new = state(unet)
    assert all(torch.equal(new[k], before_weights[k]) for k in new)


def test_maps_of_a_given_image(tiny_pipe):
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    maps = attention_maps_for_image(tiny_pipe, "a red dog", picture, strength=0.5, steps=4)
    assert maps.image.size == (16, 16)
    assert maps.calls == 2 * 4  # half of the 4 steps, 4 cross-attention layers each
    assert torch.allclose(maps.probabilities.sum(0), torch.ones(8, 8), atol=1e-5)
    with pytest.raises(ValueError, match="`strength`"):
        attention_maps_for_image(tiny_pipe, "a red dog", picture, strength=0.0)


# -- masks and overlap --------------------------------------------------------------------------------


def test_thing_mask_matches_the_rendered_pixels():
    from cones_world.render import render
    from cones_world.scene import COLOURS, PLAIN_BACKGROUNDS, Background, Scene, Thing

    for shape in ("circle", "star", "heart", "square", "triangle"):
        thing = Thing(shape, "red", "big", x=0.45, y=0.55, radius=0.25)
        pixels = render(Scene(Background("white"), (thing,))).astype(int)  # anti-aliased edges
        inside = (pixels == np.array(COLOURS["red"])).all(-1)  # fully covered pixels
        outside = (pixels == np.array(PLAIN_BACKGROUNDS["white"])).all(-1)  # untouched pixels
        mask = thing_mask(thing, 64)
        assert mask[inside].all() and not mask[outside].any(), shape
        assert inside.sum() > 0.8 * mask.sum(), shape  # the partly covered edge is thin


def test_overlap_measures_by_hand():
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True  # 4 of 16 pixels
    a = np.ones((4, 4))
    a[0, 0] = 5.0  # total 20, inside 5 + 3 = 8
    assert attention_share(a, mask) == pytest.approx(8 / 20)
    assert attention_share(np.ones((4, 4)), mask) == pytest.approx(4 / 16)  # uniform: the area share
    # top 25% = 4 pixels: (0, 0), then ties broken in raster order: (0, 1), (0, 2), (0, 3)
    assert top_iou(a, mask) == pytest.approx(2 / 6)
    b = np.zeros((4, 4))
    b[:2, :2] = 1.0
    assert top_iou(b, mask) == 1.0 and top_iou(b, mask, q=0.5) == pytest.approx(4 / 8)
    with pytest.raises(ValueError, match="resample"):
        top_iou(np.ones((2, 2)), mask)


# -- the picture and the command ----------------------------------------------------------------------


def test_figure_holds_the_image_and_a_ramp(tiny_pipe):
    maps = attention_maps(tiny_pipe, "a sks dog", seed=0, steps=STEPS)
    picture = attention_figure([maps, maps], panel=32)
    # without labels, the first row's image panel sits at (gap, gap + caption) = (4, 18)
    crop = np.asarray(picture.crop((4, 18, 36, 50)))
    assert np.array_equal(crop, np.asarray(maps.image.convert("RGB").resize((32, 32), Image.BICUBIC)))
    assert heatmap(np.array([0.0]))[0].tolist() == [0, 0, 4]
    assert heatmap(np.array([1.0]))[0].tolist() == [252, 255, 164]
    with pytest.raises(ValueError, match="`labels`"):
        attention_figure([maps], ["before", "after"])


def test_cli_writes_one_picture(tiny_pipe_path, tmp_path, capsys):
    concept = some_concept(
        __import__("diffusers").UNet2DConditionModel.from_pretrained(os.path.join(tiny_pipe_path, "unet"))
    )
    concept.save(tmp_path / "dog.cones")
    out = tmp_path / "maps" / "map.png"
    argv = [
        "attention",
        "a sks dog",
        "--model",
        tiny_pipe_path,
        "--concept",
        str(tmp_path / "dog.cones"),
        "--out",
        str(out),
        "--steps",
        str(STEPS),
        "--panel",
        "32",
    ]
    assert main(argv) == 0
    picture = Image.open(out)
    assert picture.height == 2 * (14 + 32 + 4) + 4  # two rows: before and after
    assert "['a', 'sks', 'dog']" in capsys.readouterr().out
    assert main(argv) == 1  # never overwrites without --overwrite
    assert "--overwrite" in capsys.readouterr().err
