"""`cones.find`: the class images of the prior are made at the guidance asked for, cached per guidance;
a float16 search is loss-scaled unless told otherwise."""

import os

import pytest
import torch

from cones.dtypes import LossScaled, default_loss_scale
from cones.find import FindConfig, concept_objective, find_concept
from cones.images import model_resolution


def test_class_images_follow_the_class_guidance_and_are_cached_per_guidance(tiny_pipe, tmp_path):
    size = model_resolution(tiny_pipe)
    subject = torch.zeros(2, 3, size, size)
    cache = tmp_path / "cache"

    def objective(guidance):
        config = FindConfig(num_class_images=2, batch_size=1, class_guidance=guidance)
        return concept_objective(
            tiny_pipe, subject, token="sks", class_word="dog", config=config, cache_dir=cache
        )

    low, high, again = objective(1.0), objective(9.0), objective(1.0)
    assert len(os.listdir(cache)) == 2  # one entry per guidance; the repeat read the cache
    assert low.describe()["data"] != high.describe()["data"]  # other pictures for the prior
    assert again.describe() == low.describe()
    assert torch.equal(again.class_latents, low.class_latents)


def test_default_loss_scale_is_for_float16_only():
    assert default_loss_scale(torch.float16) == 1024.0
    assert default_loss_scale(torch.bfloat16) == default_loss_scale(torch.float32) == 1.0
    assert default_loss_scale(torch.float16, 1.0) == 1.0 and default_loss_scale(torch.float32, 8.0) == 8.0
    with pytest.raises(ValueError, match="loss scale must be a finite number > 0"):
        default_loss_scale(torch.float16, 0.0)


@pytest.mark.parametrize(
    "dtype, loss_scale, expected",
    [
        (torch.float16, None, 1024.0),
        (torch.float16, 1.0, None),
        (torch.float32, None, None),
        (torch.float32, 4.0, 4.0),
    ],
)
def test_find_concept_scales_the_loss_of_a_float16_search(
    tiny_pipe, monkeypatch, dtype, loss_scale, expected
):
    seen = []  # the scale of every unscaled gradient list: the search's gradient hook went through LossScaled
    unscale = LossScaled.unscale
    monkeypatch.setattr(
        LossScaled, "unscale", lambda self, grads: seen.append(self.scale) or unscale(self, grads)
    )
    pipe = tiny_pipe.to(dtype)
    size = model_resolution(pipe)
    subject = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    config = FindConfig(steps=2, batch_size=1, prior_weight=0.0, loss_scale=loss_scale)
    result = find_concept(pipe, subject, token="sks", class_word="dog", config=config, disable=True)
    assert seen == ([expected] * 2 if expected else [])
    assert "loss_scale" not in result.concept.metadata["search"]  # the file is the same whichever precision
    assert all(torch.isfinite(torch.tensor(result.losses)))
