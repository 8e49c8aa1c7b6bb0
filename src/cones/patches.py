"""One protocol for everything cones writes into a model in place: concepts, tuned values, baseline weights.

Each of them is a `Patch`. `apply(model)` edits the model's weights where they lie and keeps exact copies of
what it replaces; `remove(model)` puts those back, so that the model is bit for bit what it was. The model is
the UNet for the concept-neuron patches (`ConceptNeurons`, `TunedConcept`) and the pipeline for the
baselines (`BaselineWeights`, which also train text-encoder rows).

    with applied(pipe.unet, dog, hat):        # several at once: applied in order, removed in reverse
        images = generate(pipe, ["a sks dog wearing a xqz hat"])
    with dog.applied(pipe.unet):              # one
        ...

`applied` removes what it applied also when the block (or a later `apply`) raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

__all__ = ["Patch", "applied"]

Model = TypeVar("Model")


class Patch:
    """Base of what can be applied to a model in place and removed again, leaving the weights as they were.

    Subclasses implement `apply` and `remove`; `applied` is the context manager over both.
    """

    def apply(self, model: Any) -> None:
        """Write the patch into `model` in place, keeping what it replaces."""
        raise NotImplementedError

    def remove(self, model: Any) -> None:
        """Undo one `apply` of this patch: every weight it changed gets its original bits back."""
        raise NotImplementedError

    def applied(self, model: Model) -> AbstractContextManager[Model]:
        """Context manager: the patch is in `model` inside the block and removed after it."""
        return applied(model, self)


@contextmanager
def applied(model: Model, *patches: Patch) -> Iterator[Model]:
    """Context manager: `patches` are applied to `model` in order inside the block and removed in reverse."""
    done: list[Patch] = []
    try:
        for patch in patches:
            patch.apply(model)
            done.append(patch)
        yield model
    finally:
        for patch in reversed(done):
            patch.remove(model)
