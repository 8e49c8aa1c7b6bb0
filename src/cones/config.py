"""`FindConfig`: the settings of a concept search, and the one place their defaults live; `ObjectiveConfig`:
the settings of the concept-implanting loss (`cones.objective`), which `find_concept` fills in from a
`FindConfig`.

`cones find` makes one flag per field (`cones.cli._options`), `find_concept` reads it, and the library's
lower layers take their defaults from it: `cones.search.find_concept_neurons` (steps, rate, method, targets),
the multi-subject searches of `cones.refine`, `cones.folders.find_each` over a folder of subjects. `method` is the
user-facing name of a search strategy ("a2", "alg1"; `cones.search.methods`).

A model can carry its own defaults: a `cones.json` in its diffusers folder, `{"find": {"sparsity": 0.05}}`,
read by `model_find_defaults` and applied by `FindConfig.for_model`, so that a user who passes nothing gets
the settings that work on that model (the sparsity a small model needs is not SD 1.4's).
"""

from __future__ import annotations

import dataclasses
import math
import os
import string
from dataclasses import dataclass, field

from cones import GUIDANCE_SCALE

__all__ = [
    "DEFAULTS",
    "METHOD_NAMES",
    "MODEL_DEFAULTS_FILE",
    "REFINE_STEPS",
    "FindConfig",
    "ObjectiveConfig",
    "model_find_defaults",
]

MODEL_DEFAULTS_FILE = "cones.json"  # in a model's diffusers folder


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

    @classmethod
    def for_model(cls, model_path: str | os.PathLike[str] | None, **overrides) -> FindConfig:
        """The defaults, then those the model at `model_path` carries (`model_find_defaults`), then
        `overrides`."""
        values = model_find_defaults(model_path) if model_path is not None else {}
        return cls(**{**values, **overrides})


DEFAULTS = FindConfig()
METHOD_NAMES = ("a2", "alg1")  # the search strategies' user-facing names (`cones.search.methods.METHODS`)
REFINE_STEPS = 100  # the refinement starts from concepts already found, so it needs fewer steps than a search


def model_find_defaults(model_path: str | os.PathLike[str]) -> dict:
    """The search defaults a model folder carries in its `cones.json` (`{"find": {...}}`), checked against
    `FindConfig`'s fields; an empty dict for a model without one (or a single-file checkpoint)."""
    from cones.errors import InputError
    from cones.files import loads_json, read_file

    path = os.path.join(os.fspath(model_path), MODEL_DEFAULTS_FILE)
    if not os.path.isfile(path):
        return {}
    value = loads_json(read_file(path, max_bytes=1 << 16, what="a model's cones.json"), path)
    find = value.get("find", {}) if isinstance(value, dict) else None
    names = {f.name for f in dataclasses.fields(FindConfig)}
    if not isinstance(find, dict) or not set(find) <= names:
        unknown = sorted(set(find) - names) if isinstance(find, dict) else find
        raise InputError(
            f'{path!r} sets {unknown!r}, which are not search settings; its "find" object may hold only '
            f"{sorted(names)}."
        )
    return {k: tuple(v) if isinstance(v, list) else v for k, v in find.items()}


@dataclass(frozen=True)
class ObjectiveConfig:
    """Settings of the concept-implanting loss. Each field's `help` is the text a command line shows."""

    subject_templates: tuple[str, ...] = field(
        default=("a {token} {class_word}", "a photo of a {token} {class_word}"),
        metadata={
            "help": "Prompts for the subject images; `{token}` is the identifier, `{class_word}` the class."
        },
    )
    class_templates: tuple[str, ...] = field(
        default=("a {class_word}", "a photo of a {class_word}"),
        metadata={"help": "Prompts for the class (prior-preservation) images; `{class_word}` is the class."},
    )
    batch_size: int = field(
        default=2,
        metadata={"help": "Subject images per step; as many class images are added when there are any."},
    )
    prior_weight: float = field(
        default=1.0,
        metadata={"help": "λ in L_con = L_sub + λ·L_pr; unused when no class images are given."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the batches, timesteps and noise; the same seed gives the same losses."},
    )

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(
                f"`batch_size` must be at least 1, got {self.batch_size}; pass e.g. batch_size=2."
            )
        if not (self.prior_weight >= 0 and math.isfinite(self.prior_weight)):
            raise ValueError(
                f"`prior_weight` must be a finite number >= 0, got {self.prior_weight}; the paper uses 1.0."
            )
        if self.seed < 0:
            raise ValueError(f"`seed` must be >= 0, got {self.seed}; pass a non-negative integer.")
        _check_templates(
            "subject_templates", self.subject_templates, allowed={"token", "class_word"}, needs="token"
        )
        _check_templates("class_templates", self.class_templates, allowed={"class_word"}, needs=None)


def _check_templates(name: str, templates: tuple[str, ...], allowed: set[str], needs: str | None) -> None:
    """Raise a one-line ValueError unless every template uses only `allowed` placeholders (and `needs`)."""
    if isinstance(templates, str) or len(templates) == 0:
        raise ValueError(f"`{name}` must be a non-empty tuple of prompt templates, got {templates!r}.")
    for template in templates:
        keys = {key for _, key, _, _ in string.Formatter().parse(template) if key is not None}
        if not keys <= allowed:
            raise ValueError(
                f"`{name}` template {template!r} uses {sorted(keys - allowed)}; only {sorted(allowed)} are filled in."
            )
        if needs is not None and needs not in keys:
            raise ValueError(
                f"`{name}` template {template!r} lacks `{{{needs}}}`; e.g. 'a photo of a {{token}} {{class_word}}'."
            )
