"""Which weights are concept neurons, given their scores M_p: the one selection rule of cones.

`select_neurons(scores, threshold=τ)` keeps M_p > τ (the paper's rule); `select_neurons(scores, sparsity=s)`
keeps the round(s · candidates) highest scores over all parameters jointly, positive ones only. The search
selects with it, and `SearchResult.select` selects again from the same scores without searching.
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_selection", "select_neurons"]


def select_neurons(
    scores: dict[str, torch.Tensor],
    *,
    threshold: float | None = None,
    sparsity: float | None = None,
    num_candidates: int | None = None,
) -> dict[str, torch.Tensor]:
    """Concept-neuron masks from scores M_p: M_p > τ, or the top fraction of positive scores.

    Args:
        scores: name -> float tensor M_p (any shape).
        threshold: τ >= 0; a weight is selected when M_p > τ.
        sparsity: fraction in (0, 1] of the candidate weights to select: the round(sparsity · candidates)
            largest scores over all parameters jointly, among the positive ones only (fewer if fewer are
            positive). Ties are broken by position, so the choice is deterministic.
        num_candidates: the number of candidate weights `sparsity` refers to; all weights in `scores`
            by default.
    Returns:
        name -> bool tensor of the score's shape; exactly one of `threshold` and `sparsity` must be given.
        Build a concept from it with `ConceptNeurons.from_mask`.
    """
    check_selection(threshold, sparsity)
    for name, s in scores.items():
        if bool(torch.isnan(s).any()):
            raise ValueError(f"`scores[{name!r}]` holds NaN; fix the search or mask them with -inf")
    if threshold is not None:
        return {name: s > threshold for name, s in scores.items()}
    total = sum(s.numel() for s in scores.values()) if num_candidates is None else num_candidates
    k = round(sparsity * total)
    flat = torch.cat([s.detach().flatten().cpu() for s in scores.values()])  # (all weights,)
    order = torch.sort(flat, descending=True, stable=True).indices[:k]  # (k,)
    order = order[flat[order] > 0]  # only positive scores can be concept neurons
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[order] = True
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = chosen[offset : offset + s.numel()].view(s.shape).to(s.device)
        offset += s.numel()
    return masks


def check_selection(threshold: float | None, sparsity: float | None) -> None:
    """Raise a one-line ValueError unless exactly one of a finite τ >= 0 and a sparsity in (0, 1] is given."""
    if (threshold is None) == (sparsity is None):
        raise ValueError(
            f"pass exactly one of `threshold` and `sparsity`, got threshold={threshold}, sparsity={sparsity}; "
            "e.g. sparsity=0.01 for the top 1% of weights."
        )
    if threshold is not None and not (threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(
            f"`threshold` must be a finite τ >= 0, got {threshold}; concept neurons have M_p > τ >= 0."
        )
    if sparsity is not None and not 0 < sparsity <= 1:
        raise ValueError(
            f"`sparsity` must be a fraction in (0, 1], got {sparsity}; e.g. 0.01 for 1% of the weights."
        )
