import os

import pytest
import torch
from tiny import make_tiny_pipeline

# Tiny models on a shared 2-core machine: one thread avoids the thread pool's stalls (3 s -> 20 ms a call).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def tiny_pipe(tmp_path):
    """A fresh tiny SD pipeline (random weights, seeded) for each test."""
    return make_tiny_pipeline(str(tmp_path))


@pytest.fixture(scope="session")
def tiny_pipe_path(tmp_path_factory):
    """A tiny SD pipeline saved in diffusers format, as a user's model folder would be."""
    root = tmp_path_factory.mktemp("tiny_sd")
    pipe = make_tiny_pipeline(str(root / "build"))
    path = os.path.join(root, "model")
    pipe.save_pretrained(path)
    return path
