"""`FindConfig`: the settings of a concept search, and the one place their defaults live.

`cones find` makes one flag per field (`cones.cli._options`), `find_concept` reads it, and the library's
lower layers take their defaults from it: `cones.search.find_concept_neurons` (steps, rate, method, targets),
the multi-subject searches of `cones.refine`, `cones.folders.find_each` over a folder of subjects. `method` is the
user-facing name of a search strategy ("a2", "alg1"; `cones.search.methods`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cones import GUIDANCE_SCALE

__all__ = ["DEFAULTS", "FindConfig"]


@dataclass(frozen=True)
class FindConfig:
    """Settings of a concept search. Each field's help is what the command line shows."""

    steps: int = field(default=300, metadata={"help": "K, gradient steps of the search"})
    lr: float = field(default=2e-3, metadata={"help": "ρ, the rate of the steps on ξ (Adam)"})
    method: str = field(default="a2", metadata={"help": "a2 (accelerated, default) or alg1 (Algorithm 1)"})
    sparsity: float | None = field(default=0.01, metadata={"help": "share of candidate weights to shut"})
    threshold: float | None = field(default=None, metadata={"help": "τ instead of a sparsity: shut M_p > τ"})
    targets: str = field(default="cross", metadata={"help": "candidate weights: cross, self or all (K/V)"})
    batch_size: int = field(default=4, metadata={"help": "subject images per step (as many class images)"})
    prior_weight: float = field(default=1.0, metadata={"help": "λ, weight of prior preservation"})
    num_class_images: int = field(default=32, metadata={"help": "class images generated for the prior"})
    class_guidance: float = field(
        default=GUIDANCE_SCALE, metadata={"help": "guidance scale the class images are generated at"}
    )
    seed: int = field(default=0, metadata={"help": "seed of batches, noise and class images"})
    loss_scale: float | None = field(
        default=None,
        metadata={
            "help": "multiply the backward pass by this and divide it out in float32, so that small "
            "float16 gradients keep their bits (None: 1024 for a float16 UNet, else 1 = none)"
        },
    )
    templates: tuple[str, ...] = field(
        default=("a {token} {class_word}",), metadata={"help": "subject prompt templates"}
    )


DEFAULTS = FindConfig()
