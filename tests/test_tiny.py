import torch
from diffusers import StableDiffusionPipeline


def test_tiny_pipeline_generates(tiny_pipe):
    images = tiny_pipe("a sks dog", num_inference_steps=2, output_type="pt", height=16, width=16).images
    assert images.shape == (1, 3, 16, 16)
    assert torch.isfinite(images).all()


def test_tiny_pipeline_loads_from_disk(tiny_pipe_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_path)
    assert pipe.tokenizer.tokenize("a sks dog") == ["a</w>", "sks</w>", "dog</w>"]
