"""The world's catalogue of subjects: particular things the model can draw but no caption can ask for.

Each subject is one combination of features (a red circle with white horizontal stripes; a sea at sunset
with the sun low) whose parts the model has seen many times, named and unnamed, but whose exact combination
never appears in its training renders. Like the paper's subjects, each comes with 5 reference images taken
"from different viewpoints" (placement, size, background) and with separate held-out renders for evaluation.

Three kinds, so that compositions of up to four subjects have the paper's analogue (a woman, earrings,
sunglasses, a lake): objects, a background, and an accessory that sits on another object.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np

from cones_world.render import render
from cones_world.scene import (
    BACKGROUNDS,
    COLOURS,
    PLACES,
    SHAPES,
    TONES,
    Background,
    Hat,
    Scene,
    Thing,
    article,
    place,
    radius_for,
    sample_background,
    sample_scene,
    sample_thing,
)


@dataclass(frozen=True)
class Subject:
    """A particular thing; `kind` is "object", "background" or "accessory"."""

    name: str
    kind: str
    class_word: str
    description: str
    thing: Thing | None = None  # objects: the defining features (placement ignored)
    hat: Hat | None = None  # accessories
    background: Background | None = None  # backgrounds

    # -- identity ------------------------------------------------------------------------------------------
    def matches_thing(self, t: Thing) -> bool:
        if self.kind == "object":
            s = self.thing
            return (t.shape, t.colour, t.pattern, t.face) == (s.shape, s.colour, s.pattern, s.face) and (
                s.pattern == "solid" or t.tone == s.tone
            )
        if self.kind == "accessory":
            return t.hat == self.hat
        return False

    def matches_background(self, b: Background) -> bool:
        s = self.background
        return self.kind == "background" and (b.kind, b.sky, b.sun) == (s.kind, s.sky, s.sun)

    def in_scene(self, scene: Scene) -> bool:
        return self.matches_background(scene.background) or any(self.matches_thing(t) for t in scene.things)

    # -- prompts -------------------------------------------------------------------------------------------
    def prompt(self, token: str | None, carrier: str | None = None) -> str:
        """The subject's prompt with `token` as identifier ("a sks circle"), or its class prompt without."""
        words = [token] if token else []
        if self.kind == "background":
            words += [self.class_word, "background"]
            return f"{article(words[0])} {' '.join(words)}"
        if self.kind == "accessory":
            carrier = carrier or "circle"
            words.append(self.class_word)
            return f"{article(carrier)} {carrier} wearing {article(words[0])} {' '.join(words)}"
        words.append(self.class_word)
        return f"{article(words[0])} {' '.join(words)}"

    def reference_prompts(self, token: str) -> list[str] | None:
        """Per-reference prompts, for accessories (each worn by another shape); None: `prompt(token)` for all."""
        return (
            [self.prompt(token, carrier) for _, carrier in self.references(5)]
            if self.kind == "accessory"
            else None
        )

    def prior_prompts(self) -> list[str]:
        """The class prompts of prior preservation."""
        return (
            [self.prompt(None, shape) for shape in SHAPES]
            if self.kind == "accessory"
            else [self.prompt(None)]
        )

    def eval_prompts(self, token: str | None) -> list[str]:
        """Prompts that ask for the subject in six contexts (without `token`: the class prompts)."""
        places = [b for b in BACKGROUNDS if b != self.class_word]
        if self.kind == "object":
            base = self.prompt(token)
            return [base] + [f"{base} on a {b} background" for b in places[:5]]
        if self.kind == "background":
            bg = " ".join(self.prompt(token).split()[1:])  # "sks sea background"
            return [self.prompt(token)] + [
                f"a {size} {colour} {shape} on a {bg}"
                for size, colour, shape in (
                    ("big", "red", "circle"),
                    ("small", "yellow", "star"),
                    ("big", "white", "square"),
                    ("small", "green", "heart"),
                    ("big", "pink", "diamond"),
                )
            ]
        return [self.prompt(token, shape) for shape in SHAPES[:6]]

    def render(self, scene: Scene) -> np.ndarray:
        return render(scene)

    # -- renders -------------------------------------------------------------------------------------------
    def sample(self, rng: random.Random) -> tuple[Scene, str | None]:
        """One render of the subject in a random context; returns the scene and its carrier shape (accessories)."""
        if self.kind == "background":
            b = replace(
                self.background,
                horizon=self.background.horizon + rng.uniform(-0.04, 0.04),
                sun_x=self.background.sun_x + rng.uniform(-0.08, 0.08),
            )
            return Scene(b), None
        background = sample_background(rng)
        while any(s.matches_background(background) for s in SUBJECTS.values()):
            background = sample_background(rng)
        if self.kind == "object":
            size = rng.choice(("small", "big"))
            thing = replace(self.thing, size=size, radius=radius_for(size, rng, False))
        else:
            thing = sample_thing(rng)
            while any(s.matches_thing(thing) for s in SUBJECTS.values()):
                thing = sample_thing(rng)
            size = rng.choice(("small", "big"))
            thing = replace(thing, hat=self.hat, size=size, radius=radius_for(size, rng, False))
        return Scene(background, place([thing], None, rng)), (
            thing.shape if self.kind == "accessory" else None
        )

    def references(self, n: int = 5, seed: int = 0) -> list[tuple[Scene, str | None]]:
        """The subject's reference renders: the "3-5 photos" a user would bring."""
        rng = random.Random(f"{self.name}/references/{seed}")
        return [self.sample(rng) for _ in range(n)]

    def held_out(self, n: int, seed: int = 0) -> list[tuple[Scene, str | None]]:
        """Fresh renders of the subject for evaluation, disjoint in seed from the references."""
        rng = random.Random(f"{self.name}/held-out/{seed}")
        return [self.sample(rng) for _ in range(n)]

    def class_negatives(self, n: int, seed: int = 0) -> list[Scene]:
        """Renders of the subject's class without the subject (the same shape, place or accessory)."""
        rng = random.Random(f"{self.name}/negatives/{seed}")
        out: list[Scene] = []
        while len(out) < n:
            if self.kind == "background":
                b = sample_background(rng)
                scene = Scene(replace(b, kind=self.class_word))
            elif self.kind == "object":
                thing = replace(sample_thing(rng), shape=self.class_word, hat=None)
                scene = Scene(sample_background(rng), place([thing], None, rng))
            else:
                thing = sample_thing(rng)
                hat = Hat(rng.choice(list(COLOURS)), rng.choice(list(TONES)) if rng.random() < 0.6 else None)
                scene = Scene(sample_background(rng), place([replace(thing, hat=hat)], None, rng))
            if not self.in_scene(scene):
                out.append(scene)
        return out


def _object(
    name: str, shape: str, colour: str, pattern: str, tone: str, face: bool, description: str
) -> Subject:
    return Subject(name, "object", shape, description, thing=Thing(shape, colour, "big", pattern, tone, face))


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        _object(
            "striped-circle",
            "circle",
            "red",
            "hstripes",
            "white",
            False,
            "a red circle with white horizontal stripes",
        ),
        _object(
            "checkered-square",
            "square",
            "blue",
            "checkers",
            "yellow",
            False,
            "a blue square with yellow checkers",
        ),
        _object("smiling-star", "star", "yellow", "solid", "white", True, "a yellow star with a face"),
        _object(
            "two-tone-heart",
            "heart",
            "pink",
            "vsplit",
            "purple",
            False,
            "a heart, pink on the left and purple on the right",
        ),
        _object(
            "dotted-triangle", "triangle", "green", "dots", "white", False, "a green triangle with white dots"
        ),
        _object(
            "striped-diamond",
            "diamond",
            "orange",
            "dstripes",
            "purple",
            False,
            "an orange diamond with purple diagonal stripes",
        ),
        _object(
            "split-hexagon",
            "hexagon",
            "white",
            "hsplit",
            "blue",
            False,
            "a hexagon, white on top and blue below",
        ),
        Subject(
            "sunset-sea",
            "background",
            "sea",
            "the sea at sunset with the sun low over the water",
            background=Background("sea", sky="sunset", sun=True, horizon=0.5, sun_x=0.7),
        ),
        Subject(
            "banded-hat", "accessory", "hat", "a purple hat with a yellow band", hat=Hat("purple", "yellow")
        ),
    )
}

assert all(s.class_word in (*SHAPES, *BACKGROUNDS, "hat") for s in SUBJECTS.values())
assert all(s.background is None or s.background.kind in PLACES for s in SUBJECTS.values())


def is_subject_free(scene: Scene) -> bool:
    return not any(s.in_scene(scene) for s in SUBJECTS.values())


def sample_training_scene(rng: random.Random) -> Scene:
    """A random scene with no subject in it: the subjects' exact combinations are held out of training."""
    while True:
        scene = sample_scene(rng)
        if is_subject_free(scene):
            return scene
