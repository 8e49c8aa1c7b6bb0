"""What can be in a picture of the world, and how people describe it.

A `Scene` is a background and up to three things. Everything in it is continuous or nearly so: colours are
any RGB, a pattern has an angle, a count, a width and a tone, a face a mouth and eyes of some size, a hat a
style, height and band. Captions are alt text: they name some of what a picture shows, by the nearest words
("a red circle with stripes", "wearing a hat", "on a sea background at sunset"), never all of it and never
the numbers. So one particular striped circle (a subject) is a point in a space that words only divide into
regions, as one user's dog is for Stable Diffusion.

A few invented proper nouns (`NAMED`) are bound to one particular appearance each and appear in captions
("a dax"), as brands and landmarks do in Stable Diffusion's: the model learns that a rare word can carry a
whole look. The identifier words that users bind subjects to (`IDENTIFIERS`) appear in almost no caption.

Sampling and captions share this file because a caption is a reading of the sampled fields: a new field
and the words that may name it are one change.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields, replace

from cones_world.v2.colours import COLOUR_WORDS, RGB, colour_word, distance, sample_colour, sample_contrasting

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "hexagon", "cross")
PATTERNS = ("solid", "stripes", "dots", "checks", "rings", "halves")
PATTERN_PHRASES = {  # "with {tone} stripes"; halves name their tone as "with a {tone} half"
    "stripes": "stripes",
    "dots": "dots",
    "checks": "checks",
    "rings": "rings",
    "halves": "halves",
}
MOUTHS = ("smile", "frown", "open", "flat")
MOUTH_WORDS = {"smile": "smiling", "frown": "frowning", "open": "surprised", "flat": "calm"}
HAT_STYLES = ("top", "cone")
HAT_WORDS = {"top": "top", "cone": "party"}
PLACES = ("grass", "sea", "desert", "night", "snow")
RELATIONS = ("next to", "above")
IDENTIFIERS = ("sks", "xqz", "vlt", "pqm", "zrb")
SMALL_BELOW = 0.19  # a thing of radius under this is "small", else "big"


@dataclass(frozen=True)
class Pattern:
    """A fill's second tone. `count` is how many periods span the object's width, `width` the share of a
    period in the tone (stripes, rings) or the dots' diameter as a share of their spacing, `angle` the
    orientation in degrees, `phase` where in its period the pattern starts."""

    kind: str = "solid"
    tone: RGB = (255, 255, 255)
    angle: float = 0.0
    count: float = 3.0
    width: float = 0.5
    phase: float = 0.0


@dataclass(frozen=True)
class Face:
    mouth: str = "smile"
    eye_size: float = 0.12
    eye_gap: float = 0.32
    colour: RGB = (20, 20, 20)


@dataclass(frozen=True)
class Hat:
    colour: RGB
    band: RGB | None = None
    style: str = "top"
    height: float = 0.7


@dataclass(frozen=True)
class Thing:
    """One object; `x`, `y` its centre and `radius` its half-size, as fractions of the image."""

    shape: str
    colour: RGB
    pattern: Pattern = Pattern()
    face: Face | None = None
    hat: Hat | None = None
    name: str | None = None  # the proper noun of a named instance
    x: float = 0.5
    y: float = 0.5
    radius: float = 0.25

    @property
    def size(self) -> str:
        return "small" if self.radius < SMALL_BELOW else "big"


@dataclass(frozen=True)
class Background:
    """A plain colour, or a place with a sky. Skies and suns vary continuously; a caption says only "at
    sunset" or "with a sun"."""

    kind: str  # "plain" or one of PLACES
    colour: RGB = (235, 235, 235)  # plain backgrounds
    sunset: bool = False
    sky_top: RGB = (70, 140, 230)
    sky_bottom: RGB = (175, 215, 245)
    sun: bool = False
    sun_x: float = 0.75
    sun_y: float = 0.25
    sun_size: float = 0.085
    horizon: float = 0.55

    @property
    def word(self) -> str:
        return colour_word(self.colour) if self.kind == "plain" else self.kind


@dataclass(frozen=True)
class Scene:
    background: Background
    things: tuple[Thing, ...] = ()
    relation: str | None = None  # how things[0] stands to things[1] when there are two
    tokens: tuple[str, ...] = field(default=(), compare=False)  # identifier noise, for captions only


# ---------------------------------------------------------------------------------------------------------
# Named instances: proper nouns bound to one appearance each.

NAMED: dict[str, Thing] = {
    "dax": Thing("circle", (250, 160, 20), Pattern("rings", (120, 40, 20), count=2.5, width=0.4)),
    "wug": Thing("heart", (90, 200, 120), Pattern("dots", (250, 250, 210), angle=20, count=4, width=0.45)),
    "blicket": Thing(
        "square", (60, 60, 70), Pattern("stripes", (250, 210, 40), angle=45, count=5, width=0.5)
    ),
    "toma": Thing("triangle", (230, 90, 140), face=Face("open", 0.1, 0.3, (250, 250, 250))),
    "fep": Thing("hexagon", (160, 110, 220), Pattern("halves", (250, 240, 120), angle=90)),
    "kiki": Thing("star", (40, 170, 230), Pattern("checks", (20, 40, 90), angle=0, count=3)),
    "zib": Thing("diamond", (200, 30, 60), hat=Hat((30, 30, 30), (250, 250, 250), "top", 0.8)),
    "lorp": Thing("cross", (120, 190, 40), Pattern("stripes", (40, 80, 30), angle=90, count=3, width=0.3)),
}


# ---------------------------------------------------------------------------------------------------------
# Sampling


def sample_pattern(rng: random.Random, body: RGB) -> Pattern:
    kind = "solid" if rng.random() < 0.35 else rng.choice(PATTERNS[1:])
    if kind == "solid":
        return Pattern()
    tone = sample_contrasting(rng, body, min_distance=35)
    angle = rng.uniform(0, 180) if kind != "halves" else rng.uniform(0, 360)
    count = {
        "stripes": rng.uniform(2, 6),
        "dots": rng.uniform(2, 5),
        "checks": rng.uniform(2, 5),
        "rings": rng.uniform(1.5, 4),
        "halves": 1.0,
    }[kind]
    width = {"dots": rng.uniform(0.3, 0.6)}.get(kind, rng.uniform(0.3, 0.65))
    return Pattern(kind, tone, round(angle, 1), round(count, 2), round(width, 2), round(rng.random(), 2))


def sample_face(rng: random.Random, body: RGB) -> Face:
    colour = (20, 20, 20) if distance(body, (20, 20, 20)) > 40 else (245, 245, 245)
    return Face(
        rng.choice(MOUTHS), round(rng.uniform(0.07, 0.17), 3), round(rng.uniform(0.22, 0.4), 3), colour
    )


def sample_hat(rng: random.Random) -> Hat:
    colour = sample_colour(rng)
    band = sample_contrasting(rng, colour) if rng.random() < 0.5 else None
    return Hat(colour, band, rng.choice(HAT_STYLES), round(rng.uniform(0.5, 0.95), 2))


def radius_for(size: str, rng: random.Random, crowded: bool) -> float:
    if crowded:
        return rng.uniform(0.11, 0.14)
    return rng.uniform(0.21, 0.29) if size == "big" else rng.uniform(0.13, 0.17)


def sample_thing(rng: random.Random, background: Background, crowded: bool = False) -> Thing:
    if rng.random() < 0.06:  # a named instance, as it always looks
        name = rng.choice(list(NAMED))
        thing = replace(NAMED[name], name=name)
    else:
        colour = sample_contrasting(rng, background_colour(background), min_distance=30)
        thing = Thing(
            rng.choice(SHAPES),
            colour,
            sample_pattern(rng, colour),
            sample_face(rng, colour) if rng.random() < 0.2 else None,
            sample_hat(rng) if rng.random() < 0.18 else None,
        )
    size = "small" if crowded else rng.choice(("small", "big"))
    return replace(thing, radius=radius_for(size, rng, crowded))


def background_colour(b: Background) -> RGB:
    """The colour most of a background is, for contrast checks."""
    return {
        "grass": (60, 160, 60),
        "sea": (40, 100, 180),
        "desert": (230, 195, 120),
        "night": (20, 25, 60),
        "snow": (235, 240, 245),
    }.get(b.kind, b.colour)


def _jitter(rgb: RGB, rng: random.Random, amount: float) -> RGB:
    return tuple(max(0, min(255, round(c + rng.uniform(-amount, amount)))) for c in rgb)  # type: ignore[return-value]


def sample_background(rng: random.Random) -> Background:
    if rng.random() < 0.4:
        if rng.random() < 0.5:  # light neutrals, as most product photos have
            level = rng.uniform(200, 245)
            colour = _jitter((round(level),) * 3, rng, 8)
        else:
            colour = sample_colour(rng)
        return Background("plain", colour=colour)
    kind = rng.choice(PLACES)
    sunset = kind != "night" and rng.random() < 0.35
    if kind == "night":
        top, bottom = _jitter((10, 15, 45), rng, 8), _jitter((30, 35, 80), rng, 10)
    elif sunset:
        top, bottom = _jitter((120, 60, 140), rng, 35), _jitter((250, 150, 70), rng, 25)
    else:
        top, bottom = _jitter((70, 140, 230), rng, 20), _jitter((175, 215, 245), rng, 12)
    return Background(
        kind,
        sunset=sunset,
        sky_top=top,
        sky_bottom=bottom,
        sun=rng.random() < 0.45,
        sun_x=round(rng.uniform(0.12, 0.88), 3),
        sun_y=round(rng.uniform(0.1, 0.3), 3),
        sun_size=round(rng.uniform(0.06, 0.11), 3),
        horizon=round(rng.uniform(0.45, 0.7), 3),
    )


def place(things: list[Thing], relation: str | None, rng: random.Random) -> tuple[Thing, ...]:
    """Give each thing a centre that agrees with the relation, with room for hats above."""

    def jitter(v: float, amount: float = 0.05) -> float:
        return v + rng.uniform(-amount, amount)

    if len(things) == 1:
        t = things[0]
        top = t.radius * (1 + (t.hat.height + 0.3 if t.hat else 0.1))
        x = rng.uniform(t.radius + 0.03, 1 - t.radius - 0.03)
        y = rng.uniform(min(top, 0.5), max(1 - t.radius - 0.03, 0.5))
        return (replace(t, x=x, y=y),)
    if len(things) == 2 and relation == "above":
        a, b = things
        return (
            replace(a, x=jitter(0.5, 0.12), y=jitter(0.3 if not a.hat else 0.36, 0.02)),
            replace(b, x=jitter(0.5, 0.12), y=jitter(0.76, 0.03)),
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
    """A random scene: 0 to 3 things on a background; identifier noise in a small share of captions."""
    background = sample_background(rng)
    n = rng.choices((0, 1, 2, 3), weights=(0.05, 0.6, 0.25, 0.1))[0]
    things = [sample_thing(rng, background, crowded=n == 3) for _ in range(n)]
    if n >= 2:  # two things side by side have room for small things only, and hats only when above
        things = [replace(t, radius=min(t.radius, 0.17), hat=None if n == 3 else t.hat) for t in things]
    relation = rng.choice(RELATIONS) if n == 2 else None
    if relation == "next to":
        things = [replace(t, hat=None) for t in things]
    tokens = (rng.choice(IDENTIFIERS),) if rng.random() < 0.02 else ()
    return Scene(background, place(things, relation, rng), relation, tokens)


# ---------------------------------------------------------------------------------------------------------
# Captions


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _named(p: float, rng: random.Random | None) -> bool:
    """Whether a caption names a detail it may name with probability `p` (always, without `rng`)."""
    return rng is None or rng.random() < p


@dataclass(frozen=True)
class Detail:
    """How likely a caption names each part of what it shows; `None` rng names everything."""

    size: float = 0.5
    colour: float = 0.75
    pattern: float = 0.55
    tone: float = 0.35
    face: float = 0.7
    mouth: float = 0.35
    hat: float = 0.9
    hat_colour: float = 0.4
    hat_style: float = 0.3
    band: float = 0.35
    background: float = 0.8
    sky: float = 0.5
    sun: float = 0.45
    named_shape: float = 0.5  # "a dax circle" rather than "a dax"


ALT_TEXT = Detail()
FULL = Detail(**{f.name: 1.0 for f in fields(Detail)} | {"named_shape": 0.5})


def thing_phrase(
    t: Thing, rng: random.Random | None = None, detail: Detail = ALT_TEXT, token: str | None = None
) -> str:
    """ "a big red circle with blue stripes with a smiling face wearing a purple top hat with a band";
    which parts are said is drawn from `detail` (all of them without `rng`)."""
    words = [token] if token else []
    if t.name is not None:
        words.append(t.name)
        if _named(detail.named_shape, rng):
            words.append(t.shape)
        return f"{article(words[0])} {' '.join(words)}"
    if _named(detail.size, rng):
        words.append(t.size)
    if _named(detail.colour, rng):
        words.append(colour_word(t.colour))
    words.append(t.shape)
    p = t.pattern
    if p.kind != "solid" and _named(detail.pattern, rng):
        tone = colour_word(p.tone) + " " if _named(detail.tone, rng) else ""
        words.append(f"with {tone}{PATTERN_PHRASES[p.kind]}")
    if t.face is not None and _named(detail.face, rng):
        mood = MOUTH_WORDS[t.face.mouth] + " " if _named(detail.mouth, rng) else ""
        words.append(f"with a {mood}face")
    if t.hat is not None and _named(detail.hat, rng):
        colour = colour_word(t.hat.colour) + " " if _named(detail.hat_colour, rng) else ""
        style = HAT_WORDS[t.hat.style] + " " if _named(detail.hat_style, rng) else ""
        words.append(f"wearing {article(colour or style or 'hat')} {colour}{style}hat")
        if t.hat.band is not None and _named(detail.band, rng):
            words.append("with a band")
    return f"{article(words[0])} {' '.join(words)}"


def background_phrase(b: Background, rng: random.Random | None = None, detail: Detail = ALT_TEXT) -> str:
    """ "on a sea background at sunset with a sun"; parts drawn from `detail`."""
    text = f"on {article(b.word)} {b.word} background"
    if b.sunset and _named(detail.sky, rng):
        text += " at sunset"
    if b.sun and _named(detail.sun, rng):
        text += " with a moon" if b.kind == "night" else " with a sun"
    return text


def caption(scene: Scene, rng: random.Random | None = None, detail: Detail = ALT_TEXT) -> str:
    """A caption of `scene` that names what `detail` draws; identifier noise where the scene carries it."""
    parts = [thing_phrase(t, rng, detail) for t in scene.things]
    if len(parts) == 2:
        text = f"{parts[0]} {scene.relation} {parts[1]}"
    elif len(parts) == 3:
        text = f"{parts[0]}, {parts[1]} and {parts[2]}"
    else:
        text = parts[0] if parts else ""
    if not parts:
        text = background_phrase(scene.background, rng, detail).removeprefix("on ")
    elif _named(detail.background, rng):
        text += " " + background_phrase(scene.background, rng, detail)
    if scene.tokens and rng is not None:
        words = text.split(" ")
        words.insert(rng.randrange(len(words) + 1), scene.tokens[0])
        text = " ".join(words)
    return text


def caption_words() -> list[str]:
    """Every word a caption can hold, the identifiers and the proper nouns included."""
    words = {
        "a",
        "an",
        ",",
        "on",
        "background",
        "wearing",
        "and",
        "with",
        "hat",
        "band",
        "face",
        "at",
        "sunset",
        "sun",
        "moon",
        "big",
        "small",
        *SHAPES,
        *PLACES,
        *IDENTIFIERS,
        *NAMED,
    }
    words |= {w for r in RELATIONS for w in r.split()}
    words |= set(PATTERN_PHRASES.values()) | set(MOUTH_WORDS.values()) | set(HAT_WORDS.values())
    return sorted(words | set(COLOUR_WORDS))


def training_captions(n: int, seed: int = 0) -> list[str]:
    """`n` alt-text captions of random scenes without identifiers, as the model is trained on."""
    rng = random.Random(f"world-captions/{seed}")
    return [caption(replace(sample_scene(rng), tokens=()), rng) for _ in range(n)]


def angle_between(a: float, b: float, period: float) -> float:
    """The smaller difference of two angles in degrees, for patterns that repeat every `period` degrees."""
    d = (a - b) % period
    return min(d, period - d)
