"""The world's vocabulary and scenes: what can be in a picture, and how a picture is described.

A `Scene` is a background and up to three objects. Some of what a scene holds is *named* by the captions
the diffusion model is trained on (shape, colour, size, background, position, a hat); the rest is *unnamed*
variation (fill patterns, faces, two-tone fills, the hat's colour, sunset skies, a sun) that the model learns
to draw but can never be asked for. A subject is one particular combination of named and unnamed features,
just as Stable Diffusion can draw one particular dog but cannot be asked for it by name.

Two kinds of caption:
- `caption(scene, rng)`: what the diffusion model sees; names only the named features, and drops some of
  them at random so that "a circle" is as valid a prompt as "a small red circle on a sea background".
- `detailed_caption(scene)`: what the evaluation CLIP sees; names every detail, so that it can tell a
  subject from the rest of its class.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "hexagon", "cross")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 220, 40),
    "green": (50, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
}
BLACK = (20, 20, 20)
# Colours that may fill a pattern's second tone: the named colours and black.
TONES: dict[str, tuple[int, int, int]] = {**COLOURS, "black": BLACK}

SIZES = ("small", "big")

PLAIN_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (238, 238, 238),
    "gray": (128, 128, 128),
    "black": (25, 25, 30),
}
PLACES = ("grass", "sea", "desert", "night")
BACKGROUNDS = (*PLAIN_BACKGROUNDS, *PLACES)

# Unnamed fill patterns. "solid" is the plain fill; the rest use a second tone.
PATTERNS = ("solid", "hstripes", "vstripes", "dstripes", "checkers", "dots", "vsplit", "hsplit")
PATTERN_WORDS = {  # for the evaluation CLIP only
    "solid": "",
    "hstripes": "horizontal stripes",
    "vstripes": "vertical stripes",
    "dstripes": "diagonal stripes",
    "checkers": "checkers",
    "dots": "dots",
    "vsplit": "left and right halves",
    "hsplit": "top and bottom halves",
}
SKIES = ("day", "sunset")

RELATIONS = ("next to", "above")

# Rare identifier tokens: they occur in a small share of training captions as meaningless words, like the
# rare tokens Stable Diffusion users bind subjects to.
IDENTIFIERS = ("sks", "xqz", "vlt", "pqm", "zrb")

HAT = "hat"


@dataclass(frozen=True)
class Hat:
    colour: str
    band: str | None  # colour of the band around the crown, or no band


@dataclass(frozen=True)
class Thing:
    """One object in a scene; `x`, `y` are its centre and `radius` its half-size, in image fractions."""

    shape: str
    colour: str
    size: str
    pattern: str = "solid"
    tone: str = "white"  # the pattern's second colour
    face: bool = False
    hat: Hat | None = None
    x: float = 0.5
    y: float = 0.5
    radius: float = 0.2


@dataclass(frozen=True)
class Background:
    kind: str  # one of BACKGROUNDS
    sky: str = "day"  # places other than night: day or sunset
    sun: bool = False  # places: a sun (or, at night, a moon)
    horizon: float = 0.55  # places: where the ground begins, as a fraction of the height
    sun_x: float = 0.75


@dataclass(frozen=True)
class Scene:
    background: Background
    things: tuple[Thing, ...] = ()
    relation: str | None = None  # how things[0] stands to things[1] when there are two
    tokens: tuple[str, ...] = field(default=(), compare=False)  # identifier noise, for captions only


# ---------------------------------------------------------------------------------------------------------
# Sampling


def radius_for(size: str, rng: random.Random, crowded: bool) -> float:
    if size == "big" and not crowded:
        return rng.uniform(0.21, 0.27)
    return rng.uniform(0.12, 0.15) if not crowded else rng.uniform(0.10, 0.13)


def sample_thing(rng: random.Random, crowded: bool = False) -> Thing:
    shape = rng.choice(SHAPES)
    colour = rng.choice(list(COLOURS))
    size = "small" if crowded else rng.choice(SIZES)
    pattern = "solid" if rng.random() < 0.4 else rng.choice(PATTERNS[1:])
    tone = rng.choice([t for t in TONES if t != colour])
    face = rng.random() < 0.2
    hat = None
    if rng.random() < 0.18:
        hat = Hat(rng.choice(list(COLOURS)), rng.choice(list(TONES)) if rng.random() < 0.6 else None)
    return Thing(shape, colour, size, pattern, tone, face, hat, radius=radius_for(size, rng, crowded))


def sample_background(rng: random.Random) -> Background:
    kind = rng.choice(BACKGROUNDS)
    if kind in PLAIN_BACKGROUNDS:
        return Background(kind)
    sky = "day" if kind == "night" or rng.random() < 0.65 else "sunset"
    return Background(
        kind,
        sky=sky,
        sun=rng.random() < 0.45,
        horizon=rng.uniform(0.45, 0.7),
        sun_x=rng.uniform(0.15, 0.85),
    )


def place(things: list[Thing], relation: str | None, rng: random.Random) -> tuple[Thing, ...]:
    """Give each thing a centre that agrees with the relation, with room for hats above."""

    def jitter(v: float, amount: float = 0.05) -> float:
        return v + rng.uniform(-amount, amount)

    if len(things) == 1:
        t = things[0]
        top = t.radius + (0.22 if t.hat else 0.02)
        x = rng.uniform(t.radius + 0.03, 1 - t.radius - 0.03)
        y = rng.uniform(min(top, 0.5), max(1 - t.radius - 0.03, 0.5))
        return (replace(t, x=x, y=y),)
    if len(things) == 2 and relation == "above":
        a, b = things
        return (
            replace(a, x=jitter(0.5, 0.15), y=jitter(0.33 if not a.hat else 0.38, 0.02)),
            replace(b, x=jitter(0.5, 0.15), y=jitter(0.75, 0.03)),
        )
    if len(things) == 2:
        a, b = things
        return (
            replace(a, x=jitter(0.27, 0.03), y=jitter(0.6, 0.08)),
            replace(b, x=jitter(0.73, 0.03), y=jitter(0.6, 0.08)),
        )
    return tuple(
        replace(t, x=jitter(0.18 + 0.32 * i, 0.02), y=jitter(0.62, 0.06)) for i, t in enumerate(things)
    )


def sample_scene(rng: random.Random) -> Scene:
    """A random scene of the world: 0 to 3 things on a background."""
    background = sample_background(rng)
    n = rng.choices((0, 1, 2, 3), weights=(0.05, 0.55, 0.28, 0.12))[0]
    crowded = n == 3
    things = [sample_thing(rng, crowded) for _ in range(n)]
    if n == 3:
        things = [replace(t, hat=None) for t in things]
    relation = rng.choice(RELATIONS) if n == 2 else None
    tokens = (rng.choice(IDENTIFIERS),) if rng.random() < 0.04 else ()
    return Scene(background, place(things, relation, rng), relation, tokens)


# ---------------------------------------------------------------------------------------------------------
# Captions


def thing_phrase(
    t: Thing, rng: random.Random | None = None, token: str | None = None, hat_token: str | None = None
) -> str:
    """ "a small red circle wearing a hat"; with `rng`, size and colour are sometimes left out."""
    drop_size = rng is not None and rng.random() < 0.35
    drop_colour = rng is not None and rng.random() < 0.2
    words = []
    if token:
        words.append(token)
    if not drop_size:
        words.append(t.size)
    if not drop_colour:
        words.append(t.colour)
    words.append(t.shape)
    if t.hat is not None:
        words += ["wearing", "a"] + ([hat_token] if hat_token else []) + [HAT]
    return article(words[0]) + " " + " ".join(words)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def background_phrase(b: Background) -> str:
    return f"{b.kind} background"


def caption(scene: Scene, rng: random.Random) -> str:
    """The diffusion model's caption: named features only, some dropped at random."""
    parts = [thing_phrase(t, rng) for t in scene.things]
    if len(parts) == 2:
        text = f"{parts[0]} {scene.relation} {parts[1]}"
    elif len(parts) == 3:
        text = f"{parts[0]}, {parts[1]} and {parts[2]}"
    else:
        text = parts[0] if parts else ""
    if not parts:
        text = f"a {background_phrase(scene.background)}"
    elif rng.random() < 0.8:
        text += f" on a {background_phrase(scene.background)}"
    if scene.tokens:
        words = text.split(" ")
        words.insert(rng.randrange(len(words) + 1), scene.tokens[0])
        text = " ".join(words)
    return text


def _keep(rng: random.Random | None, p_drop: float) -> bool:
    return rng is None or rng.random() >= p_drop


def detailed_thing(t: Thing, rng: random.Random | None = None) -> str:
    """ "a small red circle with white dots with a face wearing a purple hat"; with `rng`, details are
    sometimes left out, so that the CLIP also learns what partial descriptions match."""
    words = ["a"]
    if _keep(rng, 0.3):
        words.append(t.size)
    if _keep(rng, 0.15):
        words.append(t.colour)
    words.append(t.shape)
    if t.pattern != "solid" and _keep(rng, 0.3):
        words.append(f"with {t.tone} {PATTERN_WORDS[t.pattern]}")
    if t.face and _keep(rng, 0.3):
        words.append("with a face")
    if t.hat is not None:
        if _keep(rng, 0.3):
            words.append(f"wearing a {t.hat.colour} hat")
            if t.hat.band and _keep(rng, 0.3):
                words.append(f"with a {t.hat.band} band")
        else:
            words.append("wearing a hat")
    if words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def detailed_background(b: Background, rng: random.Random | None = None) -> str:
    words = f"on a {b.kind} background"
    if b.kind in PLACES and b.kind != "night" and b.sky == "sunset" and _keep(rng, 0.3):
        words += " at sunset"
    if b.sun and _keep(rng, 0.3):
        words += " with a moon" if b.kind == "night" else " with a sun"
    return words


def detailed_caption(scene: Scene, rng: random.Random | None = None) -> str:
    """The evaluation CLIP's caption: every feature named; with `rng`, some details dropped at random."""
    parts = [detailed_thing(t, rng) for t in scene.things]
    if len(parts) == 2:
        text = f"{parts[0]} {scene.relation} {parts[1]}"
    else:
        text = " and ".join(parts)
    if text and not _keep(rng, 0.15):
        return text
    bg = detailed_background(scene.background, rng)
    return f"{text} {bg}" if text else f"a {bg.removeprefix('on a ')}"


def caption_words() -> list[str]:
    """Every word the diffusion model's captions can hold."""
    words = {
        "a",
        "an",
        ",",
        "on",
        "background",
        "wearing",
        "and",
        HAT,
        *SHAPES,
        *COLOURS,
        *SIZES,
        *BACKGROUNDS,
    }
    words |= {w for r in RELATIONS for w in r.split()}
    words |= set(IDENTIFIERS)
    return sorted(words)


def detailed_words() -> list[str]:
    """Every word the evaluation CLIP's captions can hold."""
    words = set(caption_words()) | set(TONES) | {"with", "face", "band", "at", "sunset", "sun", "moon"}
    words |= {w for p in PATTERN_WORDS.values() for w in p.split()}
    return sorted(words)


def training_captions(n: int, seed: int = 0) -> list[str]:
    """`n` captions of random world scenes without identifiers, as the world model was trained on: the
    regularisation captions of Custom Diffusion's merge (`cones.baselines.custom_diffusion.merge`)."""
    rng = random.Random(f"world-captions/{seed}")
    return [caption(replace(sample_scene(rng), tokens=()), rng) for _ in range(n)]
