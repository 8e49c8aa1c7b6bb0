"""Concepts on a live diffusers pipeline: load, switch per request, unload.

    load_concept(pipe, "dog.cones")            # loaded and active: the next call draws the dog
    load_concept(pipe, "mug.cones")            # both active: the dog and the mug
    set_concepts(pipe, ["mug"])                # switch per request; milliseconds
    set_concepts(pipe, [])                     # the plain base model, bit for bit
    unload_concept(pipe)                       # forget all; weights exactly as before

Like `load_lora_weights`, loading makes the new concept active at once (alongside those already
active); pass `activate=False` to load it inactive. The state lives on a small `_LoadedConcepts`
object attached to the pipeline (`pipe._cones_concepts`); the shutting itself is done by
`cones.switching` on `pipe.unet`, so at every moment exactly the union of the active concepts is
zero and every other weight is bit-identical to the base model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cones import switching
from cones.basemodel import BaseTargets, check_concept
from cones.neurons import ConceptNeurons
from cones.storage import load_concept_file

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

_STATE_ATTR = "_cones_concepts"


@dataclass
class _LoadedConcepts:
    """The concepts loaded into one pipeline, by name, and which of them are shut now."""

    loaded: dict[str, ConceptNeurons] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def _state(pipe: DiffusionPipeline) -> _LoadedConcepts:
    state = getattr(pipe, _STATE_ATTR, None)
    if state is None:
        state = _LoadedConcepts()
        setattr(pipe, _STATE_ATTR, state)
    return state


def _default_name(
    concept: ConceptNeurons, source: str | os.PathLike[str] | ConceptNeurons, taken: dict[str, ConceptNeurons]
) -> str:
    if concept.token:
        base = concept.token
    elif not isinstance(source, ConceptNeurons):
        base = Path(source).stem
    else:
        base = "concept"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def load_concept(
    pipe: DiffusionPipeline,
    concept_or_path: ConceptNeurons | str | os.PathLike[str],
    name: str | None = None,
    *,
    activate: bool = True,
    force: bool = False,
) -> str:
    """Load a concept (object or `.cones` path) into `pipe`, check it fits `pipe.unet`; return its name.

    `name` defaults to the concept's token, else the file name, made unique. With `activate=True` the
    concept joins the active ones at once.

    The concept must name only candidate key/value weights, all of the UNet's of its kinds, with their
    shapes, and (when the file records one) the UNet's weights must match its base fingerprint; see
    `cones.basemodel.check_concept`. Raises `ConceptMismatchError` otherwise; `force=True` applies a
    concept whose fingerprint differs, with a `ConesWarning`. Nothing is loaded when it raises.
    """
    if isinstance(concept_or_path, ConceptNeurons):
        concept, label = concept_or_path, None
    else:
        concept, label = load_concept_file(concept_or_path), os.fspath(concept_or_path)
    check_concept(concept, BaseTargets.from_unet(pipe.unet), force=force, name=label)
    state = _state(pipe)
    if name is None:
        name = _default_name(concept, concept_or_path, state.loaded)
    elif name in state.loaded:
        raise ValueError(
            f"`name` {name!r} is already loaded; pick another or `unload_concept(pipe, {name!r})` first"
        )
    state.loaded[name] = concept
    if activate:
        switching.apply_concept(pipe.unet, concept)
        state.active.append(name)
    return name


def set_concepts(pipe: DiffusionPipeline, names: str | Sequence[str] | None) -> None:
    """Make exactly `names` (loaded concepts) active; `None` or `[]` gives the base model."""
    state = _state(pipe)
    wanted = [names] if isinstance(names, str) else list(names or [])
    unknown = [n for n in wanted if n not in state.loaded]
    if unknown:
        raise ValueError(f"`names` has {unknown[0]!r}, which is not loaded; loaded: {sorted(state.loaded)}")
    wanted = list(dict.fromkeys(wanted))
    for name in [n for n in state.active if n not in wanted]:
        switching.remove_concept(pipe.unet, state.loaded[name])
        state.active.remove(name)
    for name in [n for n in wanted if n not in state.active]:
        switching.apply_concept(pipe.unet, state.loaded[name])
        state.active.append(name)


def unload_concept(pipe: DiffusionPipeline, name: str | None = None) -> None:
    """Forget concept `name` (all concepts if None), restoring its weights bit for bit if it is active."""
    state = _state(pipe)
    if name is not None and name not in state.loaded:
        raise ValueError(f"`name` {name!r} is not loaded; loaded: {sorted(state.loaded)}")
    for n in list(state.loaded) if name is None else [name]:
        if n in state.active:
            switching.remove_concept(pipe.unet, state.loaded[n])
            state.active.remove(n)
        del state.loaded[n]
    if not state.loaded:
        delattr(pipe, _STATE_ATTR)


def active_concepts(pipe: DiffusionPipeline) -> list[str]:
    """Names of the concepts shut in `pipe.unet` now, in the order they were activated."""
    state = getattr(pipe, _STATE_ATTR, None)
    return list(state.active) if state else []


def loaded_concepts(pipe: DiffusionPipeline) -> list[str]:
    """Names of all concepts loaded into `pipe`, active or not, in load order."""
    state = getattr(pipe, _STATE_ATTR, None)
    return list(state.loaded) if state else []
