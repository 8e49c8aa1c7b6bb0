"""What a search reports while it runs (`SearchProgress`), returns (`SearchResult`) and raises (`SearchError`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cones.errors import ConesError
from cones.neurons import ConceptNeurons
from cones.search.select import select_neurons

__all__ = ["SearchError", "SearchProgress", "SearchResult", "selected_concept"]


class SearchError(ConesError, RuntimeError):
    """The search cannot produce a meaningful concept (non-finite loss or gradient, unusable checkpoint)."""


@dataclass(frozen=True)
class SearchProgress:
    """What `callback` sees after each step."""

    step: int  # index of the step just taken, 0-based
    steps: int  # K, the total number of steps
    loss: float  # L_con at this step's weights, before the update


@dataclass
class SearchResult:
    """The outcome of a search: the selected concept, the scores it was selected from, the loss history."""

    concept: ConceptNeurons
    # M_p per target parameter: the parameter's shape, float32 (float64 for a float64 model), on the CPU
    scores: dict[str, torch.Tensor]
    losses: list[float]  # L_con at step 0 … K−1
    settings: dict[str, Any]  # method, steps, lr, optimizer, threshold, sparsity, targets, candidates, ...

    def select(self, *, threshold: float | None = None, sparsity: float | None = None) -> ConceptNeurons:
        """Select again from the same scores with another τ or sparsity, without searching again."""
        settings = {**self.settings, "threshold": threshold, "sparsity": sparsity}
        return selected_concept(
            self.scores,
            settings,
            self.concept.shapes,
            self.concept.token,
            self.concept.class_word,
            base_sha256=self.concept.base_sha256,
        )


def selected_concept(
    scores: dict[str, torch.Tensor],
    settings: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    token: str | None,
    class_word: str | None,
    base_sha256: str | None = None,
) -> ConceptNeurons:
    """The concept `select_neurons` picks from `scores` with the τ or sparsity of `settings`, which it records,
    with the fingerprint of the base weights it was searched on (`cones.basemodel.weights_sha256`)."""
    mask = select_neurons(
        scores,
        threshold=settings["threshold"],
        sparsity=settings["sparsity"],
        num_candidates=settings["candidates"],
    )
    return ConceptNeurons.from_mask(
        mask,
        shapes=shapes,
        token=token,
        class_word=class_word,
        metadata={"search": settings},
        base_sha256=base_sha256,
    )
