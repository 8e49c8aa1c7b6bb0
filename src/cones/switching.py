"""Shutting concept neurons in a live UNet, and restoring them bit for bit.

`apply_concept` zeroes a concept's weights in place; `remove_concept` puts the original values back (they are
`ConceptNeurons.apply` / `remove`, the `cones.patches` protocol: `with applied(unet, *concepts)`).
Several concepts may be active at once and removed in any order: at every moment exactly the union of
the active concepts' neurons is zero and every other weight is bit-identical to the original.

How: the UNet carries a small registry (attribute `_cones_switching`, absent when nothing is applied):
the active concepts with the indices they were applied with, and for each parameter touched the flat
positions shut now (the union of the active concepts) with their original values. Applying saves the
values of the positions no active concept shuts yet; removing writes back the saved positions that no
remaining concept shuts. Membership is read from a throw-away boolean map of one parameter, so every
step is a linear scatter or gather (`index_select`, `index_fill_`, `index_copy_`): switching costs
milliseconds even for millions of neurons, on any device and dtype, with or without autograd enabled.
On the CPU the kernels run on the calling thread alone: they are small and memory-bound, and waking
torch's thread pool on a busy machine costs more (milliseconds per kernel) than it saves.

Saving or copying a UNet while concepts are applied saves the shut weights. The registry is not
thread-safe: switch concepts from one thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cones.neurons import ConceptNeurons

_REGISTRY_ATTR = "_cones_switching"


@dataclass
class _Saved:
    """The positions of one parameter shut now (unique, in no particular order) and their original values."""

    index: torch.Tensor  # (n,) int64 flat positions
    original: torch.Tensor  # (n,) the parameter's dtype: values before shutting

    def to(self, device: torch.device) -> None:
        if self.index.device != device:
            self.index, self.original = self.index.to(device), self.original.to(device)


@dataclass
class _Registry:
    """Active concepts of one UNet (with the indices they were applied with) and the saved values."""

    active: list[tuple[ConceptNeurons, dict[str, torch.Tensor]]] = field(default_factory=list)
    saved: dict[str, _Saved] = field(default_factory=dict)


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _flat(param: torch.Tensor) -> torch.Tensor:
    """A flat view that shares storage with `param` and may be edited in place outside autograd."""
    return param.detach().view(-1)


def _marked(numel: int, positions: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A (numel,) bool map, True at `positions`."""
    mark = torch.zeros(numel, dtype=torch.bool, device=device)
    for p in positions:
        mark.index_fill_(0, p.to(device), True)
    return mark


def _shut(flat: torch.Tensor, idx: torch.Tensor, saved: _Saved | None) -> _Saved:
    """Zero `flat` at `idx`, first saving the values at the positions that are not shut yet."""
    idx = idx.to(flat.device)
    if saved is None:
        saved = _Saved(idx, flat.index_select(0, idx))
    else:
        saved.to(flat.device)
        fresh = ~_marked(flat.numel(), [saved.index], flat.device).index_select(0, idx)  # (k,)
        new = idx.masked_select(fresh)  # (k_new,)
        saved = _Saved(torch.cat([saved.index, new]), torch.cat([saved.original, flat.index_select(0, new)]))
    flat.index_fill_(0, idx, 0)
    return saved


def _restore(flat: torch.Tensor, saved: _Saved, still_shut: list[torch.Tensor]) -> _Saved | None:
    """Write back the saved values at positions outside `still_shut`; return what stays saved."""
    saved.to(flat.device)
    if not still_shut:
        flat.index_copy_(0, saved.index, saved.original.to(flat.dtype))
        return None
    keep = _marked(flat.numel(), still_shut, flat.device).index_select(0, saved.index)  # (n,)
    free = ~keep
    flat.index_copy_(0, saved.index.masked_select(free), saved.original.masked_select(free).to(flat.dtype))
    return _Saved(saved.index.masked_select(keep), saved.original.masked_select(keep))


def _find(registry: _Registry, concept: ConceptNeurons) -> int:
    for i, (active, _) in enumerate(registry.active):
        if active is concept:
            return i
    for i, (active, _) in enumerate(registry.active):
        if active == concept:
            return i
    raise ValueError(
        f"{concept!r} is not applied to this UNet ({len(registry.active)} concepts are); "
        "call `apply` before `remove`"
    )


def apply_concept(unet: torch.nn.Module, concept: ConceptNeurons) -> None:
    """Shut `concept`'s neurons in `unet` in place (after checking the shapes match)."""
    params = concept.parameters_in(unet)
    registry: _Registry = unet.__dict__.setdefault(_REGISTRY_ATTR, _Registry())
    indices = dict(concept.indices)  # the indices as applied, in case `concept` is edited later
    with _one_thread():
        for name, idx in indices.items():
            if idx.numel():
                registry.saved[name] = _shut(_flat(params[name]), idx, registry.saved.get(name))
    registry.active.append((concept, indices))


def remove_concept(unet: torch.nn.Module, concept: ConceptNeurons) -> None:
    """Undo one `apply_concept(unet, concept)`; weights no other active concept shuts get their bits back."""
    registry: _Registry | None = unet.__dict__.get(_REGISTRY_ATTR)
    if registry is None:
        raise ValueError(
            f"{concept!r} is not applied to this UNet (no concept is); call `apply` before `remove`"
        )
    _, indices = registry.active.pop(_find(registry, concept))
    with _one_thread():
        for name, idx in indices.items():
            if idx.numel():
                still_shut = [other[name] for _, other in registry.active if other.get(name, idx[:0]).numel()]
                saved = _restore(_flat(unet.get_parameter(name)), registry.saved[name], still_shut)
                if saved is None:
                    del registry.saved[name]
                else:
                    registry.saved[name] = saved
    if not registry.active:
        del unet.__dict__[_REGISTRY_ATTR]


def applied_concepts(unet: torch.nn.Module) -> list[ConceptNeurons]:
    """Concepts currently applied to `unet`, oldest first (a concept applied twice appears twice)."""
    registry: _Registry | None = unet.__dict__.get(_REGISTRY_ATTR)
    return [concept for concept, _ in registry.active] if registry else []


def check_nothing_applied(unet: torch.nn.Module, name: str = "unet") -> None:
    """Raise a one-line ValueError when concepts are applied to `unet` (`name` is the argument it came as).

    The multi-subject searches start from the base model: their class images and losses are its own.
    """
    applied = applied_concepts(unet)
    if applied:
        raise ValueError(
            f"`{name}` has {len(applied)} concept(s) applied ({applied[0]!r}); the multi-concept search "
            "starts from the base model: `unload_concept(pipe)` or remove them first."
        )
