"""`cones.find`: the class images of the prior are made at the guidance asked for, cached per guidance."""

import os

import torch

from cones.find import FindConfig, concept_objective
from cones.images import model_resolution


def test_class_images_follow_the_class_guidance_and_are_cached_per_guidance(tiny_pipe, tmp_path):
    size = model_resolution(tiny_pipe)
    subject = torch.zeros(2, 3, size, size)
    cache = tmp_path / "cache"

    def objective(guidance):
        config = FindConfig(num_class_images=2, batch_size=1, class_guidance=guidance)
        return concept_objective(tiny_pipe, subject, token="sks", class_word="dog", config=config, cache_dir=cache)

    low, high, again = objective(1.0), objective(9.0), objective(1.0)
    assert len(os.listdir(cache)) == 2  # one entry per guidance; the repeat read the cache
    assert low.describe()["data"] != high.describe()["data"]  # other pictures for the prior
    assert again.describe() == low.describe()
    assert torch.equal(again.class_latents, low.class_latents)
