"""The default model: the one seam between the library and a model package installed beside it.

The library works on whatever Stable Diffusion model a user names. When none is named, it asks this
registry, which a package fills in through the `cones.default_model` entry point (a function returning a
`DefaultModel`), or a program fills in with `register_default_model`. A package can also add `cones`
subcommands through the `cones.commands` entry-point group (a module with `NAME`, `HELP`, `add_arguments`
and `run`). The embedded world (`cones_world`) does both; nothing in `cones` imports it by name, so the
library stays the same code on a real checkpoint and on the world.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from PIL import Image

    from cones.find import SubjectImages

__all__ = [
    "DefaultModel",
    "ExampleSubject",
    "NoDefaultModel",
    "command_modules",
    "default_model",
    "register_default_model",
]

MODEL_GROUP = "cones.default_model"
COMMAND_GROUP = "cones.commands"


class NoDefaultModel(ValueError):
    """No model was named and no package provides a default one."""


class ExampleSubject(Protocol):
    """A subject that ships with a model: what a user would bring to `cones find`, ready-made."""

    name: str
    kind: str  # "object", "background" or "accessory": which prompt templates fit it
    class_word: str
    description: str

    def reference_images(self) -> list[Image.Image]:
        """The subject's reference pictures (the "3-5 photos")."""
        ...

    def subject_data(self, token: str) -> SubjectImages:
        """References, per-image prompts and class prompts, as the multi-subject searches take them."""
        ...


@dataclass(frozen=True)
class DefaultModel:
    """What a default model provides besides its weights."""

    name: str  # recorded as `base_model` in the concepts found on it
    model_path: str  # a diffusers Stable Diffusion folder
    clip_path: str | None = None  # a transformers CLIPModel folder for evaluation, if it has one
    vocabulary: Callable[[], Sequence[str]] | None = None  # the words its captions hold; None: open
    subjects: Callable[[], Mapping[str, ExampleSubject]] = field(default=lambda: {})
    extras: Mapping[str, Any] = field(default_factory=dict)


_default: DefaultModel | None = None


def register_default_model(model: DefaultModel | None) -> None:
    """Make `model` the default for this process (None: look it up from the installed packages again)."""
    global _default
    _default = model


def default_model() -> DefaultModel:
    """The registered default model, or the one an installed package provides."""
    global _default
    if _default is None:
        found = sorted(entry_points(group=MODEL_GROUP), key=lambda ep: ep.name)
        if not found:
            raise NoDefaultModel(
                "no model was given and no default model is installed; pass `--model` a Stable Diffusion "
                "folder, or reinstall cones (`pip install -e .`) to register its embedded world."
            )
        _default = found[0].load()()
    return _default


def command_modules() -> list[ModuleType]:
    """The subcommand modules that installed packages add to `cones`."""
    return [ep.load() for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda ep: ep.name)]
