"""`ConceptNeurons`: a concept as sparse integer indices into a UNet's attention weights.

A concept is, for each target parameter of a diffusers `UNet2DConditionModel` (see `cones.targets`),
the sorted unique int64 flat indices (into `param.view(-1)`) of the weights to *shut*, i.e. set to zero.
It also records the shapes of *all* target parameters of the base model, including those without neurons,
so that a concept can be checked against a model before it touches it.

This module holds the object and its set algebra (union, intersection); how much two concepts share is
`cones.overlap`. Shutting the neurons in a live UNet, and restoring them bit for bit, lives in
`cones.switching`; the file format lives in `cones.storage`. Nothing here reads files or prints.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from cones import switching
from cones.errors import ConceptMismatchError
from cones.patches import Patch


def _as_shape(name: str, shape: Any) -> tuple[int, ...]:
    try:
        dims = tuple(operator.index(d) for d in shape if not isinstance(d, bool))
    except TypeError:
        raise ValueError(
            f"`shapes[{name!r}]` must be a sequence of non-negative ints, got {shape!r}"
        ) from None
    if len(dims) != len(shape) or not all(d >= 0 for d in dims):
        raise ValueError(f"`shapes[{name!r}]` must be a sequence of non-negative ints, got {shape!r}")
    return dims


def _as_index_tensor(name: str, indices: Any, numel: int) -> torch.Tensor:
    idx = torch.as_tensor(indices)
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"`indices[{name!r}]` must be an integer tensor, got dtype {idx.dtype}")
    idx = idx.detach().to(device="cpu", dtype=torch.int64).reshape(-1).contiguous()
    if idx.numel() == 0:
        return idx
    values = idx.numpy()  # numpy checks run on this thread, with no thread-pool wake-ups
    if values.size > 1 and not bool((values[1:] > values[:-1]).all()):
        raise ValueError(f"`indices[{name!r}]` must be sorted and unique; pass `torch.unique(indices)`")
    if values[0] < 0 or values[-1] >= numel:
        raise ValueError(
            f"`indices[{name!r}]` holds {values[0] if values[0] < 0 else values[-1]}, "
            f"outside [0, {numel}) for a parameter of {numel} weights"
        )
    return idx


def intersect_indices(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elements of sorted unique `a` that are also in sorted unique `b`, sorted."""
    if a.numel() == 0 or b.numel() == 0:
        return a[:0]
    pos = torch.searchsorted(b, a).clamp_(max=b.numel() - 1)
    return a[b[pos] == a]


def merged_shapes(concepts: tuple[ConceptNeurons, ...]) -> dict[str, tuple[int, ...]]:
    """The target shapes of all `concepts`, in order of appearance; ValueError where two disagree."""
    shapes: dict[str, tuple[int, ...]] = {}
    for concept in concepts:
        for name, shape in concept.shapes.items():
            if shapes.setdefault(name, shape) != shape:
                raise ValueError(
                    f"concepts disagree on the shape of `{name}`: {shapes[name]} vs {shape}; "
                    "they were made for different base models"
                )
    return shapes


def shared_identity(parts: Iterable[dict[str, Any]]) -> dict[str, str | None]:
    """`token` and `class_word` of a concept made of `parts` (dicts with both): the value all parts share,
    or None where they differ."""
    parts = list(parts)
    identity: dict[str, str | None] = {}
    for key in ("token", "class_word"):
        values = {part[key] for part in parts}
        identity[key] = values.pop() if len(values) == 1 else None
    return identity


def _combined_fields(kind: str, concepts: tuple[ConceptNeurons, ...]) -> dict[str, Any]:
    parts = [{"token": c.token, "class_word": c.class_word, "num_neurons": c.num_neurons} for c in concepts]
    return {
        **shared_identity(parts),
        "metadata": {"combined": kind, "parts": parts},
        "base_sha256": common_base_sha256(concepts),
    }


def common_base_sha256(concepts: tuple[ConceptNeurons, ...] | list[ConceptNeurons]) -> dict[str, str] | None:
    """The base fingerprint all `concepts` share: the digests they agree on, when they list the same
    parameters in the same order (a fingerprint covers exactly those); None otherwise."""
    first = concepts[0]
    if not first.base_sha256 or any(list(c.shapes.items()) != list(first.shapes.items()) for c in concepts):
        return None
    common = {
        dtype: digest
        for dtype, digest in first.base_sha256.items()
        if all((c.base_sha256 or {}).get(dtype) == digest for c in concepts)
    }
    return common or None


@dataclass(eq=False, repr=False)
class ConceptNeurons(Patch):
    """A set of concept neurons: per target parameter, the flat indices of the weights to shut.

    `indices` maps a UNet parameter name to a sorted unique int64 CPU tensor of flat indices; after
    construction it has one entry per name in `shapes` (empty where a parameter holds no neuron), in the
    order of `shapes`. `shapes` lists every target parameter of the base model. `metadata` is free
    JSON-serialisable data; by convention `metadata["search"]` holds the settings of the search that
    found the concept. `base_sha256` is the fingerprint of the base model's weights of `shapes`,
    {dtype name: sha256 hex} (see `cones.basemodel.weights_sha256`), or None when unknown; it is not part of
    equality, which compares the concepts themselves.
    """

    indices: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    token: str | None = None
    class_word: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    base_sha256: dict[str, str] | None = None

    def __post_init__(self) -> None:
        shapes = {name: _as_shape(name, shape) for name, shape in self.shapes.items()}
        unknown = [name for name in self.indices if name not in shapes]
        if unknown:
            raise ValueError(f"`indices` has parameter `{unknown[0]}` that is not in `shapes`; add its shape")
        self.shapes = shapes
        self.indices = {
            name: _as_index_tensor(name, self.indices[name], math.prod(shape))
            if name in self.indices
            else torch.empty(0, dtype=torch.int64)
            for name, shape in shapes.items()
        }
        self.metadata = dict(self.metadata)
        self.base_sha256 = dict(self.base_sha256) if self.base_sha256 else None

    # -- constructors -------------------------------------------------------------------------------

    @classmethod
    def from_mask(
        cls,
        mask: Mapping[str, torch.Tensor],
        *,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
        token: str | None = None,
        class_word: str | None = None,
        metadata: dict[str, Any] | None = None,
        base_sha256: dict[str, str] | None = None,
    ) -> ConceptNeurons:
        """Build a concept from boolean masks shaped like the parameters (True = concept neuron).

        `shapes` defaults to the masks' own shapes; pass the base model's full target shapes when the masks
        cover only some of its target parameters.
        """
        shapes = dict(shapes) if shapes is not None else {name: tuple(m.shape) for name, m in mask.items()}
        indices = {}
        for name, m in mask.items():
            if m.dtype != torch.bool:
                raise ValueError(f"`mask[{name!r}]` must be a bool tensor, got dtype {m.dtype}")
            if name in shapes and tuple(m.shape) != tuple(shapes[name]):
                raise ValueError(
                    f"`mask[{name!r}]` has shape {tuple(m.shape)}, expected {tuple(shapes[name])}"
                )
            indices[name] = m.detach().reshape(-1).nonzero().reshape(-1).cpu()
        return cls(
            indices,
            shapes,
            token=token,
            class_word=class_word,
            metadata=dict(metadata or {}),
            base_sha256=base_sha256,
        )

    # -- statistics ---------------------------------------------------------------------------------

    @property
    def num_neurons(self) -> int:
        """Number of concept neurons over all parameters."""
        return sum(idx.numel() for idx in self.indices.values())

    @property
    def total_weights(self) -> int:
        """Number of weights in all target parameters of the base model."""
        return sum(math.prod(shape) for shape in self.shapes.values())

    @property
    def sparsity(self) -> float:
        """Neurons / total target weights, in [0, 1]."""
        total = self.total_weights
        return self.num_neurons / total if total else 0.0

    def counts(self) -> dict[str, int]:
        """Number of neurons per parameter, for every target parameter."""
        return {name: idx.numel() for name, idx in self.indices.items()}

    def per_layer_sparsity(self) -> dict[str, float]:
        """Neurons / weights per parameter, for every target parameter."""
        return {
            name: (idx.numel() / n if (n := math.prod(self.shapes[name])) else 0.0)
            for name, idx in self.indices.items()
        }

    # -- dense views ----------------------------------------------------------------------------------

    def mask_for(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean mask shaped like parameter `name`, True at the concept neurons."""
        if name not in self.shapes:
            raise KeyError(f"`name` {name!r} is not a target parameter of this concept")
        mask = torch.zeros(math.prod(self.shapes[name]), dtype=torch.bool, device=device)
        mask[self.indices[name].to(mask.device)] = True
        return mask.view(self.shapes[name])

    def masks(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """`mask_for` of every target parameter."""
        return {name: self.mask_for(name, device) for name in self.shapes}

    # -- set algebra ----------------------------------------------------------------------------------

    def union(self, *others: ConceptNeurons) -> ConceptNeurons:
        """Neurons in any of the concepts (shapes must agree where names are shared)."""
        return union(self, *others)

    def intersection(self, *others: ConceptNeurons) -> ConceptNeurons:
        """Neurons in all of the concepts (shapes must agree where names are shared)."""
        return intersection(self, *others)

    def __or__(self, other: ConceptNeurons) -> ConceptNeurons:
        return union(self, other) if isinstance(other, ConceptNeurons) else NotImplemented

    def __and__(self, other: ConceptNeurons) -> ConceptNeurons:
        return intersection(self, other) if isinstance(other, ConceptNeurons) else NotImplemented

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConceptNeurons):
            return NotImplemented
        return (
            self.shapes == other.shapes
            and list(self.shapes) == list(other.shapes)
            and all(torch.equal(idx, other.indices[name]) for name, idx in self.indices.items())
            and (self.token, self.class_word, self.metadata)
            == (other.token, other.class_word, other.metadata)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"ConceptNeurons(token={self.token!r}, class_word={self.class_word!r}, "
            f"neurons={self.num_neurons} in {len(self.shapes)} parameters, sparsity={self.sparsity:.4%})"
        )

    # -- the model ------------------------------------------------------------------------------------

    def check_compatible(self, unet: torch.nn.Module, *, force: bool = False) -> None:
        """Raise `ConceptMismatchError` (a ValueError) unless the concept belongs to `unet`: it names only
        candidate K/V weights, each with `unet`'s shape, lists all of `unet`'s of its kinds, and (when it
        records one) matches the base fingerprint, which `force=True` turns into a warning. See
        `cones.basemodel.check_concept`."""
        from cones.basemodel import BaseTargets, check_concept

        check_concept(self, BaseTargets.from_unet(unet), force=force)

    def parameters_in(self, unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """`unet`'s parameters named in `shapes`, after checking each exists with the recorded shape."""
        params = {}
        for name, shape in self.shapes.items():
            try:
                param = unet.get_parameter(name)
            except AttributeError:
                raise ConceptMismatchError(
                    f"parameter `{name}` of the concept is missing from the {type(unet).__name__}; "
                    "the concept was made for another base model"
                ) from None
            if tuple(param.shape) != shape:
                raise ConceptMismatchError(
                    f"parameter `{name}` has shape {tuple(param.shape)} in the {type(unet).__name__} but "
                    f"{shape} in the concept; the concept was made for another base model"
                )
            params[name] = param
        return params

    def apply(self, unet: torch.nn.Module) -> None:
        """Shut the neurons in `unet` in place; `remove` undoes it bit for bit (see `cones.switching`)."""
        switching.apply_concept(unet, self)

    def remove(self, unet: torch.nn.Module) -> None:
        """Undo one `apply` of this concept, restoring every weight no other active concept shuts."""
        switching.remove_concept(unet, self)

    def shut(self, unet: torch.nn.Module) -> AbstractContextManager[torch.nn.Module]:
        """The paper's word for `applied`: the neurons are shut inside the block and restored after it."""
        return self.applied(unet)

    # -- files ----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], *, encoding: str = "rice", overwrite: bool = False) -> None:
        """Write a `.cones` file (see `cones.storage.save_concept`)."""
        from cones.storage import save_concept

        save_concept(self, path, encoding=encoding, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ConceptNeurons:
        """Read a `.cones` file (see `cones.storage.load_concept_file`)."""
        from cones.storage import load_concept_file

        return load_concept_file(path)


def union(*concepts: ConceptNeurons) -> ConceptNeurons:
    """The neurons of any of `concepts`, over the merged target shapes."""
    if not concepts:
        raise ValueError("`union` needs at least one concept")
    shapes = merged_shapes(concepts)
    indices = {}
    for name in shapes:
        parts = [c.indices[name] for c in concepts if name in c.indices]
        indices[name] = parts[0] if len(parts) == 1 else torch.unique(torch.cat(parts), sorted=True)
    return ConceptNeurons(indices, shapes, **_combined_fields("union", concepts))


def intersection(*concepts: ConceptNeurons) -> ConceptNeurons:
    """The neurons shared by all of `concepts`, over the merged target shapes."""
    if not concepts:
        raise ValueError("`intersection` needs at least one concept")
    shapes = merged_shapes(concepts)
    indices = {}
    for name in shapes:
        if not all(name in c.indices for c in concepts):
            continue
        common = concepts[0].indices[name]
        for c in concepts[1:]:
            common = intersect_indices(common, c.indices[name])
        indices[name] = common
    return ConceptNeurons(indices, shapes, **_combined_fields("intersection", concepts))
