"""The world's catalogue of subjects: particular instances that captions can only approach.

Each subject is one point of the appearance space: a red a little towards crimson, with cream stripes at
30 degrees, four to its width. Captions can say "a red circle with white stripes", which covers it and a
great many others, but never which one; and the subject itself, with everything near it (same shape and
kind of pattern, colours and pattern geometry within a tolerance), is held out of the training renders.
Like the paper's subjects, each comes with 5 reference images in varied contexts and separate held-out
renders for evaluation.

Three kinds, so that compositions of up to four subjects have the paper's analogue (a woman, earrings,
sunglasses, a lake): objects, a background, and an accessory that sits on another object.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np

from cones_world.v2.colours import distance
from cones_world.v2.render import render
from cones_world.v2.scene import (
    MOUTHS,
    SHAPES,
    Background,
    Face,
    Hat,
    Pattern,
    Scene,
    Thing,
    angle_between,
    article,
    place,
    radius_for,
    sample_background,
    sample_hat,
    sample_pattern,
    sample_scene,
    sample_thing,
)

# How close a thing must come to a subject to count as it: what training renders keep away from.
COLOUR_TOLERANCE = 28.0  # delta E
ANGLE_TOLERANCE = 25.0  # degrees
COUNT_TOLERANCE = 1.0
REPEATS = {"stripes": 180.0, "checks": 90.0, "dots": 90.0, "halves": 360.0}  # symmetry of each pattern


def patterns_match(a: Pattern, b: Pattern) -> bool:
    if a.kind != b.kind:
        return False
    if a.kind == "solid":
        return True
    if distance(a.tone, b.tone) > COLOUR_TOLERANCE:
        return False
    if a.kind in REPEATS and angle_between(a.angle, b.angle, REPEATS[a.kind]) > ANGLE_TOLERANCE:
        return False
    return a.kind == "halves" or abs(a.count - b.count) <= COUNT_TOLERANCE


def faces_match(a: Face | None, b: Face | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.mouth == b.mouth and abs(a.eye_size - b.eye_size) < 0.04


def hats_match(a: Hat | None, b: Hat | None) -> bool:
    if a is None or b is None:
        return False
    if a.style != b.style or distance(a.colour, b.colour) > COLOUR_TOLERANCE:
        return False
    return (a.band is None) == (b.band is None) and (
        a.band is None or distance(a.band, b.band) <= COLOUR_TOLERANCE
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
            return (
                t.shape == s.shape
                and distance(t.colour, s.colour) <= COLOUR_TOLERANCE
                and patterns_match(t.pattern, s.pattern)
                and faces_match(t.face, s.face)
            )
        return self.kind == "accessory" and hats_match(t.hat, self.hat)

    def matches_background(self, b: Background) -> bool:
        s = self.background
        return (
            self.kind == "background"
            and b.kind == s.kind
            and b.sunset == s.sunset
            and b.sun == s.sun
            and distance(b.sky_top, s.sky_top) <= 2 * COLOUR_TOLERANCE
            and distance(b.sky_bottom, s.sky_bottom) <= 2 * COLOUR_TOLERANCE
        )

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
        if self.kind == "object":
            base = self.prompt(token)
            return [base] + [
                f"{base} on a {b} background" for b in ("grass", "sea", "snow", "night", "white")
            ]
        if self.kind == "background":
            bg = " ".join(self.prompt(token).split()[1:])  # "sks sea background"
            things = (
                "big red circle",
                "small yellow star",
                "big white square",
                "small green heart",
                "big pink diamond",
            )
            return [self.prompt(token)] + [f"a {thing} on a {bg}" for thing in things]
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
                sun_x=self.background.sun_x + rng.uniform(-0.06, 0.06),
            )
            return Scene(b), None
        background = sample_background(rng)
        while any(s.matches_background(background) for s in SUBJECTS.values()):
            background = sample_background(rng)
        size = rng.choice(("small", "big"))
        if self.kind == "object":
            thing = replace(self.thing, radius=radius_for(size, rng, False))
        else:
            thing = sample_thing(rng, background)
            while thing.name is not None or any(s.matches_thing(thing) for s in SUBJECTS.values()):
                thing = sample_thing(rng, background)
            thing = replace(thing, hat=self.hat, radius=radius_for(size, rng, False))
        carrier = thing.shape if self.kind == "accessory" else None
        return Scene(background, place([thing], None, rng)), carrier

    def references(self, n: int = 5, seed: int = 0) -> list[tuple[Scene, str | None]]:
        """The subject's reference renders: the "3-5 photos" a user would bring."""
        rng = random.Random(f"{self.name}/references/{seed}")
        return [self.sample(rng) for _ in range(n)]

    def held_out(self, n: int, seed: int = 0) -> list[tuple[Scene, str | None]]:
        """Fresh renders of the subject for evaluation, disjoint in seed from the references."""
        rng = random.Random(f"{self.name}/held-out/{seed}")
        return [self.sample(rng) for _ in range(n)]

    def class_negatives(self, n: int, seed: int = 0) -> list[Scene]:
        """Renders of the subject's class without the subject. Half are near misses (the subject's own
        colours and kind of pattern, in another geometry; its place in another light; its hat in other
        colours), so that a detector fitted on them tells the subject from what a description gives."""
        rng = random.Random(f"{self.name}/negatives/{seed}")
        out: list[Scene] = []
        while len(out) < n:
            near_miss = rng.random() < 0.5
            background = sample_background(rng)
            if self.kind == "background":
                scene = Scene(
                    self._other_sky(rng) if near_miss else replace(background, kind=self.class_word)
                )
            elif self.kind == "object":
                thing = (
                    self._near_miss(rng)
                    if near_miss
                    else replace(sample_thing(rng, background), shape=self.class_word, name=None)
                )
                size = rng.choice(("small", "big"))
                scene = Scene(
                    background,
                    place([replace(thing, hat=None, radius=radius_for(size, rng, False))], None, rng),
                )
            else:
                hat = replace(self.hat, colour=sample_hat(rng).colour) if near_miss else sample_hat(rng)
                thing = replace(sample_thing(rng, background), hat=hat, name=None)
                scene = Scene(background, place([thing], None, rng))
            if not self.in_scene(scene):
                out.append(scene)
        return out

    def _near_miss(self, rng: random.Random) -> Thing:
        s = self.thing
        if s.pattern.kind != "solid":
            return replace(
                s, pattern=replace(sample_pattern(rng, s.colour), kind=s.pattern.kind, tone=s.pattern.tone)
            )
        if s.face is not None:
            return replace(
                s, face=replace(s.face, mouth=rng.choice([m for m in MOUTHS if m != s.face.mouth]))
            )
        return replace(s, pattern=sample_pattern(rng, s.colour))

    def _other_sky(self, rng: random.Random) -> Background:
        b = sample_background(rng)
        while not b.sunset:  # a sunset sky of the training distribution, over the subject's place
            b = sample_background(rng)
        return replace(b, kind=self.class_word, sun=True)


def _object(name: str, description: str, thing: Thing) -> Subject:
    return Subject(name, "object", thing.shape, description, thing=thing)


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        _object(
            "striped-circle",
            "a crimson circle with four cream stripes at 30 degrees",
            Thing(
                "circle", (200, 35, 70), Pattern("stripes", (250, 238, 200), angle=30, count=4, width=0.45)
            ),
        ),
        _object(
            "checkered-square",
            "a blue square with yellow checks set on the diagonal",
            Thing("square", (40, 90, 205), Pattern("checks", (245, 205, 50), angle=45, count=3.2)),
        ),
        _object(
            "smiling-star",
            "a golden star with big eyes and an open mouth",
            Thing("star", (245, 190, 35), face=Face("open", 0.16, 0.3, (110, 30, 20))),
        ),
        _object(
            "two-tone-heart",
            "a heart, pink and violet, split on a slant",
            Thing("heart", (240, 125, 180), Pattern("halves", (110, 45, 175), angle=60)),
        ),
        _object(
            "dotted-triangle",
            "a green triangle with a grid of big white dots",
            Thing(
                "triangle", (45, 150, 75), Pattern("dots", (250, 250, 250), angle=0, count=3.2, width=0.55)
            ),
        ),
        _object(
            "striped-diamond",
            "an orange diamond with six thin violet stripes across it",
            Thing(
                "diamond", (245, 140, 40), Pattern("stripes", (100, 40, 150), angle=135, count=6, width=0.4)
            ),
        ),
        _object(
            "ringed-hexagon",
            "a teal hexagon with magenta rings",
            Thing("hexagon", (30, 170, 170), Pattern("rings", (215, 45, 150), count=2.6, width=0.4)),
        ),
        Subject(
            "sunset-sea",
            "background",
            "sea",
            "the sea under a violet and coral sunset, a big sun low on the left",
            background=Background(
                "sea",
                sunset=True,
                sky_top=(60, 20, 95),
                sky_bottom=(255, 115, 85),
                sun=True,
                sun_x=0.3,
                sun_size=0.11,
                horizon=0.5,
            ),
        ),
        Subject(
            "banded-hat",
            "accessory",
            "hat",
            "a tall violet top hat with a yellow band",
            hat=Hat((115, 40, 170), (250, 210, 40), "top", 0.9),
        ),
    )
}

assert all(s.class_word in (*SHAPES, "sea", "hat") for s in SUBJECTS.values())


def is_subject_free(scene: Scene) -> bool:
    return not any(s.in_scene(scene) for s in SUBJECTS.values())


def sample_training_scene(rng: random.Random) -> Scene:
    """A random scene with no subject near it: the subjects are held out of training."""
    while True:
        scene = sample_scene(rng)
        if is_subject_free(scene):
            return scene
