"""Several subjects at once: concatenating concepts, refining them together, and learning one after another.

Paper sections 3.2-3.3 and appendix C.1, in four verbs:

* `concatenate(a, b, ...)`: the tuning-free composition. The union of the concepts' neurons; each concept
  keeps its own identifier, recorded in `metadata["parts"]` as `{token, class_word, num_neurons}`.
* `refine_concepts(objective, unet, union)`: collaborative capturing (sec. 3.3). The search of
  `cones.search` with the multi-concept loss (the sum of the subjects' concept-implanting losses, see
  `cones.find.multi_objective`) and the candidates restricted to the union; it keeps the union's neurons whose joint
  score M_p is above τ (default 0: every neuron whose shutting lowers the joint loss), or a share of them.
* `joint_search(objective, unet, union)`: the same loss searched from scratch over all target weights,
  with as many neurons as the union by default: the comparison of sec. 3.3 and figure 4(b).
* `sequential_search(objective, unet, learned)`: appendix C.1. A new subject's neurons are searched while
  the concepts already learned are shut, so the new concept is found on the model the user will run.

`cones.overlap.overlap(a, b)` gives figure 4's statistics: the neurons two concepts share, in total and per
layer, next to what two random sets of the same per-layer sizes would share by chance.

The multi-concept loss is built from the subjects' pictures by `cones.find.multi_objective`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from cones import switching
from cones.config import DEFAULTS, REFINE_STEPS
from cones.neurons import ConceptNeurons, shared_identity, union
from cones.objective import Objective
from cones.overlap import overlap
from cones.patches import applied
from cones.search import SearchMethod, SearchProgress, SearchResult, find_concept_neurons, search_method
from cones.search.methods import Optimizer
from cones.targets import Targets

__all__ = [
    "concatenate",
    "joint_search",
    "parts_of",
    "refine_concepts",
    "sequential_search",
]


# `metadata["combined"]` values whose `metadata["parts"]` list the subjects a concept holds
_MULTI_SUBJECT = ("union", "concatenation", "refinement", "joint")


# -- concatenation ------------------------------------------------------------------------------------


def parts_of(concept: ConceptNeurons) -> list[dict[str, Any]]:
    """The subjects a concept holds: `metadata["parts"]` of a multi-subject concept, else the concept itself.

    Each part is a dict with at least `token`, `class_word` and `num_neurons` (the part's own size; None
    for the parts of a joint search, which has no per-subject neurons).
    """
    parts = concept.metadata.get("parts")
    if concept.metadata.get("combined") in _MULTI_SUBJECT and isinstance(parts, list) and parts:
        return [dict(part) for part in parts]
    return [{"token": concept.token, "class_word": concept.class_word, "num_neurons": concept.num_neurons}]


def concatenate(*concepts: ConceptNeurons) -> ConceptNeurons:
    """The union of `concepts` (paper sec. 3.2, additivity), keeping each subject's identifier.

    Concepts that are themselves concatenations contribute their parts, so `metadata["parts"]` always
    lists single subjects, in order. `token` / `class_word` are the parts' common value, or None.

    Raises:
        ValueError: fewer than one concept, or concepts that give a parameter different shapes (they
            were made for different base models).
    """
    if not concepts:
        raise ValueError("`concepts` is empty; pass at least one concept to concatenate.")
    merged = union(*concepts)  # checks the shapes of shared parameter names
    parts = [part for concept in concepts for part in parts_of(concept)]
    metadata = {"combined": "concatenation", "parts": parts}
    return ConceptNeurons(
        merged.indices,
        merged.shapes,
        **shared_identity(parts),
        metadata=metadata,
        base_sha256=merged.base_sha256,
    )


# -- the searches ---------------------------------------------------------------------------------------


def refine_concepts(
    objective: Objective,
    unet: nn.Module,
    concepts: ConceptNeurons | Sequence[ConceptNeurons],
    *,
    method: str | SearchMethod = DEFAULTS.method,
    steps: int = REFINE_STEPS,
    lr: float | None = None,
    optimizer: Optimizer | None = None,
    threshold: float | None = None,
    sparsity: float | None = None,
    callback: Callable[[SearchProgress], None] | None = None,
    disable: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
) -> SearchResult:
    """Collaborative refinement (paper sec. 3.3): search the multi-concept loss inside the concatenation.

    Args:
        objective: the multi-concept loss, e.g. `multi_objective(pipe, subjects)`.
        unet: the base model (no concept applied); left exactly as it was.
        concepts: the single-subject concepts, or their concatenation.
        method, steps, lr, optimizer, callback, disable, checkpoint_path: as in
            `cones.search.find_concept_neurons`.
        threshold: τ; keep the union's neurons with joint M_p > τ. With neither `threshold` nor
            `sparsity`, τ = 0: every neuron of the union whose shutting lowers the joint loss.
        sparsity: instead of τ, the share of the union's neurons to keep (the highest joint M_p,
            positive only), e.g. 0.8.
    Returns:
        A `SearchResult` whose concept lies inside the union, with `metadata["combined"] = "refinement"`
        and the parts of `concepts`, each with `kept`: how many of its own neurons remain (None for the
        parts of a concatenation passed as one concept).
    """
    concepts, joined = _from_base_model(unet, concepts)
    if threshold is None and sparsity is None:
        threshold = 0.0
    result = find_concept_neurons(
        objective,
        unet,
        method=search_method(method, lr, optimizer),
        steps=steps,
        threshold=threshold,
        sparsity=sparsity,
        targets=list(joined.shapes),
        restrict_to=joined,
        callback=callback,
        disable=disable,
        checkpoint_path=checkpoint_path,
    )
    parts = []
    for concept in concepts:
        own = parts_of(concept)
        # a concatenation's neurons are not split by subject, so its parts get no count of their own
        kept = overlap(concept, result.concept).shared if len(own) == 1 else None
        parts += [{**part, "kept": kept} for part in own]
    result.concept = _with_metadata(result.concept, joined, "refinement", parts, result.settings)
    return result


def joint_search(
    objective: Objective,
    unet: nn.Module,
    concepts: ConceptNeurons | Sequence[ConceptNeurons],
    *,
    method: str | SearchMethod = DEFAULTS.method,
    steps: int = DEFAULTS.steps,
    lr: float | None = None,
    optimizer: Optimizer | None = None,
    threshold: float | None = None,
    sparsity: float | None = None,
    targets: Targets | None = None,
    callback: Callable[[SearchProgress], None] | None = None,
    disable: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
) -> SearchResult:
    """The multi-concept loss searched from scratch over all candidates (paper sec. 3.3, figure 4b).

    `concepts` (the single-subject concepts or their concatenation) set the comparison: the candidates
    are their target parameters (or `targets`), and with neither `threshold` nor `sparsity` the search
    keeps as many neurons as their union has (fewer only if fewer weights score positive).
    """
    concepts, joined = _from_base_model(unet, concepts)
    targets = list(joined.shapes) if targets is None else targets
    if threshold is None and sparsity is None:
        if targets != list(joined.shapes) or joined.num_neurons == 0:
            raise ValueError(
                f"`targets` {targets!r} differ from the concepts' parameters or the concepts are empty, so "
                "the union gives no neuron budget; pass `threshold` or `sparsity`, e.g. sparsity=0.02."
            )
        sparsity = joined.num_neurons / joined.total_weights
    result = find_concept_neurons(
        objective,
        unet,
        method=search_method(method, lr, optimizer),
        steps=steps,
        threshold=threshold,
        sparsity=sparsity,
        targets=targets,
        callback=callback,
        disable=disable,
        checkpoint_path=checkpoint_path,
    )
    parts = [{**part, "num_neurons": None} for concept in concepts for part in parts_of(concept)]
    result.concept = _with_metadata(result.concept, None, "joint", parts, result.settings)
    return result


def sequential_search(
    objective: Objective,
    unet: nn.Module,
    learned: ConceptNeurons | Sequence[ConceptNeurons],
    *,
    method: str | SearchMethod = DEFAULTS.method,
    steps: int = DEFAULTS.steps,
    lr: float | None = None,
    optimizer: Optimizer | None = None,
    threshold: float | None = None,
    sparsity: float | None = None,
    targets: Targets = DEFAULTS.targets,
    token: str | None = None,
    class_word: str | None = None,
    callback: Callable[[SearchProgress], None] | None = None,
    disable: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
) -> SearchResult:
    """Learn a new subject while the `learned` concepts are shut (paper appendix C.1, sequential learning).

    The search of `cones.search.find_concept_neurons` on the model with `learned` applied: a shut weight
    is 0 and scores 0, so the new concept never contains a learned neuron, and its neurons are the ones
    that help the new subject given that the learned ones are off. Use it as `concatenate(*learned, new)`.
    `unet` must have no other concept applied; it is left exactly as it was. Arguments as in
    `find_concept_neurons` (`sparsity` counts all candidate weights).
    """
    learned = [learned] if isinstance(learned, ConceptNeurons) else list(learned)
    switching.check_nothing_applied(unet, "unet")
    with applied(unet, *learned):
        result = find_concept_neurons(
            objective,
            unet,
            method=search_method(method, lr, optimizer),
            steps=steps,
            threshold=threshold,
            sparsity=sparsity,
            targets=targets,
            token=token,
            class_word=class_word,
            callback=callback,
            disable=disable,
            checkpoint_path=checkpoint_path,
        )
    after = [part for concept in learned for part in parts_of(concept)]
    result.concept.metadata = {**result.concept.metadata, "learned_after": after}
    return result


def _from_base_model(
    unet: nn.Module, concepts: ConceptNeurons | Sequence[ConceptNeurons]
) -> tuple[list[ConceptNeurons], ConceptNeurons]:
    """`concepts` as a list, and their concatenation, once `unet` is checked to have none applied."""
    concepts = [concepts] if isinstance(concepts, ConceptNeurons) else list(concepts)
    joined = concatenate(*concepts)
    switching.check_nothing_applied(unet, "unet")
    return concepts, joined


def _with_metadata(
    concept: ConceptNeurons,
    joined: ConceptNeurons | None,
    kind: str,
    parts: list[dict[str, Any]],
    settings: dict[str, Any],
) -> ConceptNeurons:
    """`concept` with the parts' token / class word (or None) and `metadata` {combined, parts, search}."""
    metadata: dict[str, Any] = {"combined": kind, "parts": parts, "search": settings}
    if joined is not None:
        metadata["union_neurons"] = joined.num_neurons
    return replace(concept, **shared_identity(parts), metadata=metadata)
