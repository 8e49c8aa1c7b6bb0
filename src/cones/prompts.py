"""Standard prompt sets for measuring a customised model: 20 prompts per kind of subject.

The paper evaluates "20 prompts for each concept group", changing "the background, style, and attributes"
(sections 4.1 and 4.3). Two families of sets, each with one set per kind of subject (`KINDS`):

* `WORLD`: for the embedded world model. Its text encoder knows only the words of the world's captions
  (`cones_world.scene.caption_words()`: shapes, colours, sizes, backgrounds, "next to", "above",
  "wearing a hat", the identifiers), so these sets change what the world can change: the background, the
  subject's size and colour, the things next to, above or on it. There are no styles in the world.
* `SD`: for real Stable Diffusion models, in the manner of DreamBooth's evaluation prompts (places,
  materials, styles, recolourings).

Templates hold `{token}` (the identifier, e.g. "sks") and `{class_word}` ("dog", "lake", "sunglasses"):

    prompt_set("object", token="sks", class_word="circle")           # 20 world prompts
    prompt_set("object", token="sks", class_word="dog", family="sd")  # 20 real-SD prompts

Several subjects in one picture (the paper's 2, 3 and 4 subjects) get `composition_prompts`, which puts
objects, an accessory worn by the first object and a background subject together in world captions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "KINDS",
    "SD",
    "WORLD",
    "SubjectWords",
    "composition_prompts",
    "prompt_set",
    "unknown_words",
]

KINDS = ("object", "background", "accessory")

WORLD: dict[str, tuple[str, ...]] = {
    "object": (
        "a {token} {class_word}",
        "a {token} {class_word} on a white background",
        "a {token} {class_word} on a gray background",
        "a {token} {class_word} on a black background",
        "a {token} {class_word} on a grass background",
        "a {token} {class_word} on a sea background",
        "a {token} {class_word} on a desert background",
        "a {token} {class_word} on a night background",
        "a small {token} {class_word} on a sea background",
        "a big {token} {class_word} on a night background",
        "a blue {token} {class_word}",
        "a green {token} {class_word} on a desert background",
        "a yellow {token} {class_word} on a gray background",
        "a pink {token} {class_word} on a grass background",
        "a {token} {class_word} wearing a hat",
        "a {token} {class_word} wearing a hat on a sea background",
        "a {token} {class_word} next to a green square",
        "a {token} {class_word} above a yellow star on a grass background",
        "a red heart next to a {token} {class_word} on a white background",
        "a {token} {class_word}, a blue triangle and a white cross on a night background",
    ),
    "background": (
        "a {token} {class_word} background",
        "a big red circle on a {token} {class_word} background",
        "a small yellow star on a {token} {class_word} background",
        "a big white square on a {token} {class_word} background",
        "a small green heart on a {token} {class_word} background",
        "a big pink diamond on a {token} {class_word} background",
        "a blue hexagon on a {token} {class_word} background",
        "an orange triangle on a {token} {class_word} background",
        "a purple cross on a {token} {class_word} background",
        "a circle wearing a hat on a {token} {class_word} background",
        "a red circle next to a blue square on a {token} {class_word} background",
        "a yellow star above a green heart on a {token} {class_word} background",
        "a white triangle, a pink diamond and an orange cross on a {token} {class_word} background",
        "a small purple hexagon wearing a hat on a {token} {class_word} background",
        "a big star on a {token} {class_word} background",
        "a small heart on a {token} {class_word} background",
        "a big blue diamond next to a small red cross on a {token} {class_word} background",
        "a green square above a white circle on a {token} {class_word} background",
        "a big orange circle wearing a hat on a {token} {class_word} background",
        "a small white star on a {token} {class_word} background",
    ),
    "accessory": (
        "a circle wearing a {token} {class_word}",
        "a square wearing a {token} {class_word}",
        "a triangle wearing a {token} {class_word}",
        "a star wearing a {token} {class_word}",
        "a heart wearing a {token} {class_word}",
        "a diamond wearing a {token} {class_word}",
        "a hexagon wearing a {token} {class_word}",
        "a cross wearing a {token} {class_word}",
        "a big red circle wearing a {token} {class_word}",
        "a small blue square wearing a {token} {class_word}",
        "a green star wearing a {token} {class_word}",
        "a white heart wearing a {token} {class_word}",
        "a circle wearing a {token} {class_word} on a sea background",
        "a yellow triangle wearing a {token} {class_word} on a grass background",
        "a pink diamond wearing a {token} {class_word} on a night background",
        "a big orange hexagon wearing a {token} {class_word} on a desert background",
        "a small purple cross wearing a {token} {class_word} on a white background",
        "a circle wearing a {token} {class_word} next to a red square",
        "a blue star wearing a {token} {class_word} above a green heart",
        "a big white circle wearing a {token} {class_word} on a black background",
    ),
}

SD: dict[str, tuple[str, ...]] = {
    "object": (
        "a {token} {class_word} in the jungle",
        "a {token} {class_word} in the snow",
        "a {token} {class_word} on the beach",
        "a {token} {class_word} on a cobblestone street",
        "a {token} {class_word} on top of pink fabric",
        "a {token} {class_word} on top of a wooden floor",
        "a {token} {class_word} with a city in the background",
        "a {token} {class_word} with a mountain in the background",
        "a {token} {class_word} with a blue house in the background",
        "a {token} {class_word} on top of a purple rug in a forest",
        "a {token} {class_word} with a wheat field in the background",
        "a {token} {class_word} with autumn leaves in the background",
        "a {token} {class_word} floating on top of water",
        "a {token} {class_word} on a table next to a cup of coffee",
        "a {token} {class_word} printed on a sweater",
        "a watercolor painting of a {token} {class_word}",
        "a pencil sketch of a {token} {class_word}",
        "a red {token} {class_word}",
        "a shiny {token} {class_word}",
        "a cube shaped {token} {class_word}",
    ),
    "background": (
        "a {token} {class_word}",
        "a dog in front of a {token} {class_word}",
        "a red car parked by a {token} {class_word}",
        "a cat sitting in front of a {token} {class_word}",
        "a wooden house next to a {token} {class_word}",
        "a child playing by a {token} {class_word}",
        "a boat on a {token} {class_word}",
        "a {token} {class_word} at night",
        "a {token} {class_word} at sunset",
        "a {token} {class_word} in winter, covered in snow",
        "a {token} {class_word} in the rain",
        "a {token} {class_word} in autumn",
        "a {token} {class_word} in the fog",
        "a {token} {class_word} under a starry sky",
        "a watercolor painting of a {token} {class_word}",
        "an oil painting of a {token} {class_word}",
        "a pencil sketch of a {token} {class_word}",
        "a {token} {class_word} in the style of a Japanese woodblock print",
        "a {token} {class_word} in the style of Van Gogh",
        "an aerial photo of a {token} {class_word}",
    ),
    "accessory": (
        "a man wearing the {token} {class_word}",
        "a woman wearing the {token} {class_word}",
        "a child wearing the {token} {class_word}",
        "a dog wearing the {token} {class_word}",
        "a cat wearing the {token} {class_word}",
        "a teddy bear wearing the {token} {class_word}",
        "a statue wearing the {token} {class_word}",
        "a woman wearing the {token} {class_word} on the beach",
        "a man wearing the {token} {class_word} in the snow",
        "a woman wearing the {token} {class_word} in a city street at night",
        "a man wearing the {token} {class_word} in a forest",
        "the {token} {class_word} on a wooden table",
        "the {token} {class_word} on a white pillow",
        "the {token} {class_word} in a shop window",
        "a red {token} {class_word}",
        "a golden {token} {class_word}",
        "a watercolor painting of a woman wearing the {token} {class_word}",
        "a pencil sketch of a man wearing the {token} {class_word}",
        "an oil painting of a dog wearing the {token} {class_word}",
        "a cartoon of a cat wearing the {token} {class_word}",
    ),
}

_FAMILIES = {"world": WORLD, "sd": SD}


def prompt_set(kind: str, token: str, class_word: str, family: str = "world") -> list[str]:
    """The 20 prompts of `family` ("world" or "sd") for a subject of `kind`, filled in."""
    if family not in _FAMILIES:
        raise ValueError(f"`family` must be one of {sorted(_FAMILIES)}, got {family!r}.")
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {list(KINDS)}, got {kind!r}.")
    return [t.format(token=token, class_word=class_word) for t in _FAMILIES[family][kind]]


# -- several subjects --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubjectWords:
    """The words that name one subject in a composition prompt: its kind (which templates fit it), identifier
    and class word ("object", "sks", "circle")."""

    kind: str
    token: str
    class_word: str


_EXTRAS = ("green square", "blue triangle", "white cross", "pink heart", "orange diamond", "purple hexagon")
_PLACES = ("white", "gray", "black", "grass", "sea", "desert", "night")


def _a(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def composition_prompts(subjects: Sequence[SubjectWords], n: int = 20, seed: int = 0) -> list[str]:
    """`n` world prompts that ask for all `subjects` in one picture; the first is the plainest.

    Objects are named in order ("a sks circle next to a pqm star"), an accessory is worn by the first
    object (or by a plain circle), a background subject is the background; the variants change sizes,
    the relation, the order of the objects, add a plain object when there is room (the world draws at most
    three things), and change the background when no subject is one. One subject alone gets its kind's
    standard set (`prompt_set`).
    """
    subjects = list(subjects)
    kinds = [s.kind for s in subjects]
    if not subjects or any(k not in KINDS for k in kinds):
        raise ValueError(f"`subjects` must be non-empty with kinds in {list(KINDS)}, got {kinds}.")
    if kinds.count("background") > 1 or kinds.count("accessory") > 1:
        raise ValueError(f"`subjects` may hold one background and one accessory at most, got {kinds}.")
    objects = [s for s in subjects if s.kind == "object"]
    if len(objects) > 3:
        raise ValueError(f"`subjects` holds {len(objects)} objects; the world draws at most three things.")
    if len(subjects) == 1:
        s = subjects[0]
        return prompt_set(s.kind, s.token, s.class_word)[:n]
    background = next((s for s in subjects if s.kind == "background"), None)
    accessory = next((s for s in subjects if s.kind == "accessory"), None)

    def render(sizes: tuple[str, ...], relation: str, swap: bool, extra: str | None, place: str) -> str:
        things = [f"{size}{o.token} {o.class_word}".strip() for size, o in zip(sizes, objects, strict=False)]
        if not things:
            things = ["circle"]
        if accessory is not None:
            things[0] += f" wearing {_a(f'{accessory.token} {accessory.class_word}')}"
        if extra is not None:
            things.append(extra)
        if swap and len(things) == 2:
            things.reverse()
        things = [_a(t) for t in things]
        if len(things) == 1:
            text = things[0]
        elif len(things) == 2:
            text = f"{things[0]} {relation} {things[1]}"
        else:
            text = f"{', '.join(things[:-1])} and {things[-1]}"
        bg = f"{background.token} {background.class_word}" if background is not None else place
        return f"{text} on {_a(bg + ' background')}"

    room = 3 - max(1, len(objects))
    extras = [None, *(_EXTRAS if room > 0 else ())]
    places = ("sea",) if background is not None else _PLACES
    size_choices = [("",) * len(objects)] + [
        tuple(("small ", "big ")[(i + j) % 2] for j in range(len(objects))) for i in range(2)
    ]
    candidates = [
        render(sizes, relation, swap, extra, place)
        for sizes in size_choices
        for relation in ("next to", "above")
        for swap in (False, True)
        for extra in extras
        for place in places
    ]
    first = render(size_choices[0], "next to", False, None, places[0] if background is None else "sea")
    rest = sorted(set(candidates) - {first})
    random.Random(seed).shuffle(rest)
    return [first, *rest][:n]


def unknown_words(prompts: Sequence[str], vocabulary: Sequence[str]) -> list[str]:
    """The words of `prompts` that are not in `vocabulary` (a closed-vocabulary model's caption words), in
    order of first appearance; an empty list when all are known."""
    known = set(vocabulary)
    unknown = []
    for prompt in prompts:
        for word in prompt.replace(",", " , ").split():
            if word not in known and word not in unknown:
                unknown.append(word)
    return unknown
