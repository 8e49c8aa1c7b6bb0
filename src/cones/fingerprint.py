"""Fingerprints: short hashes that say "the same weights" or "the same concept", for cache keys and checks.

A fingerprint hashes the bytes themselves. A sum of weights is never a key: different weights share a sum
(a concept shut in a layer the sum does not read, two weights swapped), and a cache keyed by it would hand
out images or detectors made with another model.

* `tensors_fingerprint(tensors)`: sha1 over the tensors' values as float32 bytes, in order; 12 hex digits.
* `weights_fingerprint(*modules)`: the same over the modules' state dicts (weights and buffers), in order.
  For one module it is the hash the embedded world's caches have always been keyed by.
* `model_fingerprint(pipe)`: the weights that make a pipeline's images: UNet, text encoder and VAE.
* `concept_fingerprint(concept)`: sha256 over a concept's parameter names, shapes and indices.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from cones.neurons import ConceptNeurons

__all__ = ["concept_fingerprint", "model_fingerprint", "tensors_fingerprint", "weights_fingerprint"]


def tensors_fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """sha1 (first 12 hex digits) over each tensor's values as float32 bytes, in the order given."""
    digest = hashlib.sha1()
    for t in tensors:
        digest.update(t.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def weights_fingerprint(*modules: nn.Module) -> str:
    """`tensors_fingerprint` of the modules' state dicts, one after another: equal only for equal weights."""
    return tensors_fingerprint(t for module in modules for t in module.state_dict().values())


def model_fingerprint(pipe) -> str:
    """The fingerprint of what a Stable Diffusion pipeline draws with: its UNet, text encoder and VAE.

    Concepts shut in the UNet change it, as they change the images.
    """
    return weights_fingerprint(pipe.unet, pipe.text_encoder, pipe.vae)


def concept_fingerprint(concept: ConceptNeurons) -> str:
    """sha256 (hex) of the concept's parameter names, shapes and indices, in order: ties values to it."""
    digest = hashlib.sha256()
    for name, shape in concept.shapes.items():
        digest.update(json.dumps([name, list(shape), concept.indices[name].numel()]).encode())
        digest.update(concept.indices[name].numpy().astype("<i8").tobytes())
    return digest.hexdigest()
