"""How much two concepts share (paper figure 4): in total and per parameter, against what chance would share.

    o = overlap(a, b)
    o.shared, o.jaccard, o.share_of_a      # the paper's "2.42% of the total", "share 53.27% neurons"
    o.chance                               # what random sets of the same per-parameter sizes would share
    o.per_layer[name].shared               # the same per target parameter, also as `o.layers` in order

Two concepts are compared over their merged target parameters; they must agree on the shapes they share.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cones.neurons import ConceptNeurons, intersect_indices, merged_shapes

__all__ = ["LayerOverlap", "Overlap", "overlap"]


@dataclass(frozen=True)
class LayerOverlap:
    """Two concepts in one parameter: their sizes, what they share, and what chance would share."""

    name: str
    weights: int  # weights in the parameter
    size_a: int
    size_b: int
    shared: int

    @property
    def jaccard(self) -> float:
        """|A ∩ B| / |A ∪ B|; 0.0 when both are empty."""
        joined = self.size_a + self.size_b - self.shared
        return self.shared / joined if joined else 0.0

    @property
    def chance(self) -> float:
        """Expected |A ∩ B| if A and B were random sets of their sizes in this parameter: |A|·|B| / weights."""
        return self.size_a * self.size_b / self.weights if self.weights else 0.0


@dataclass(frozen=True)
class Overlap:
    """How much two concepts A and B share, in total and per parameter (`layers`, in parameter order)."""

    layers: list[LayerOverlap]

    @property
    def per_layer(self) -> dict[str, LayerOverlap]:
        """`layers` by parameter name."""
        return {layer.name: layer for layer in self.layers}

    @property
    def size_a(self) -> int:
        return sum(layer.size_a for layer in self.layers)

    @property
    def size_b(self) -> int:
        return sum(layer.size_b for layer in self.layers)

    @property
    def shared(self) -> int:
        return sum(layer.shared for layer in self.layers)

    @property
    def union(self) -> int:
        return self.size_a + self.size_b - self.shared

    @property
    def jaccard(self) -> float:
        """|A ∩ B| / |A ∪ B|: shared neurons as a share of all neurons of the two; 0.0 when both are empty."""
        return self.shared / self.union if self.union else 0.0

    @property
    def share_of_a(self) -> float:
        """|A ∩ B| / |A|: the part of A's neurons that B shuts too; 0.0 when A is empty."""
        return self.shared / self.size_a if self.size_a else 0.0

    @property
    def share_of_b(self) -> float:
        """|A ∩ B| / |B|; 0.0 when B is empty."""
        return self.shared / self.size_b if self.size_b else 0.0

    @property
    def chance(self) -> float:
        """Expected shared neurons of random sets with the same per-parameter sizes: Σ_l |A_l|·|B_l| / n_l."""
        return sum(layer.chance for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable numbers, with each layer's jaccard and chance."""
        keys = ("size_a", "size_b", "shared", "union", "jaccard", "share_of_a", "share_of_b", "chance")
        return {
            **{key: getattr(self, key) for key in keys},
            "layers": [
                {**asdict(layer), "jaccard": layer.jaccard, "chance": layer.chance} for layer in self.layers
            ],
        }


def overlap(a: ConceptNeurons, b: ConceptNeurons) -> Overlap:
    """The overlap of `a` and `b` over their merged target parameters (shapes must agree where shared)."""
    shapes = merged_shapes((a, b))
    empty = torch.empty(0, dtype=torch.int64)
    layers = []
    for name, shape in shapes.items():
        ia, ib = a.indices.get(name, empty), b.indices.get(name, empty)
        shared = intersect_indices(ia, ib).numel()
        layers.append(LayerOverlap(name, math.prod(shape), ia.numel(), ib.numel(), shared))
    return Overlap(layers)
