"""How good is a world v2 model? The base-model bars of the world-v2 issue, measured side by side.

1. The judge (the world CLIP) on renders: zero-shot choice of shape, colour word and background word
   (each chosen among all its values, the prompt's other words kept), and of the kind of pattern.
2. The base model follows its prompts: the same choices on images of 96 single-object prompts x 2 seeds.
3. Named ingredients are drawn: "with stripes" (and dots, checks, rings, halves), "with a face",
   "wearing a hat", each judged zero-shot against the same prompt without it.
4. The text pathway: the mean cosine between a prompt's word states, and how far "sks" moves the
   conditioning ("a sks circle" against "a circle"), beside an ordinary word.
5. Before any search: how often identifier prompts, class prompts, and the subject's fullest description
   show each subject (the detector of generated images, fitted on renders as the model's VAE returns them).

    python benchmarks/bench_world_v2.py --model M/sd --clip M/clip             # writes results/world-v2.*
    python benchmarks/bench_world_v2.py --quick --model M/sd --clip M/clip --name world-v2-quick
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from results_io import DETECTOR_CACHE, save_results

from cones import GUIDANCE_SCALE
from cones.evaluate import ClipScorer, text_pathway
from cones.generate import generate
from cones.pipeline import load_pipeline
from cones_world.concepts import subject_detector
from cones_world.v2.colours import COLOUR_WORDS, colour_margin, colour_word
from cones_world.v2.render import render
from cones_world.v2.scene import (
    PATTERN_PHRASES,
    PLACES,
    SHAPES,
    Scene,
    place,
    sample_background,
    sample_pattern,
    sample_thing,
    thing_phrase,
)
from cones_world.v2.subjects import SUBJECTS

BACKGROUND_WORDS = (*PLACES, "white", "gray", "black", "blue", "yellow", "pink")
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOUR_WORDS), "background": BACKGROUND_WORDS}
PATTERN_KINDS = ("solid", *PATTERN_PHRASES)
# A render's colour is "clear" when its nearest colour word is at least this much nearer (CIELAB delta E)
# than the next: the colours a prompt's word asks for. Between two words a person would hesitate too.
CLEAR_COLOUR = 10.0


def prompt_of(p: dict) -> str:
    extra = f" with {PATTERN_PHRASES[p['pattern']]}" if p.get("pattern", "solid") != "solid" else ""
    return f"a {p['size']} {p['colour']} {p['shape']}{extra} on a {p['background']} background"


def single_object_prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "size": rng.choice(("small", "big")),
            "colour": rng.choice(list(COLOUR_WORDS)),
            "shape": rng.choice(SHAPES),
            "background": rng.choice(BACKGROUND_WORDS),
        }
        for _ in range(n)
    ]


def random_renders(n: int, seed: int) -> tuple[list[Image.Image], list[dict]]:
    """Renders of single things in any look, with what a full caption says of them."""
    rng = random.Random(seed)
    images, facts = [], []
    while len(images) < n:
        background = sample_background(rng)
        if background.kind == "plain" and colour_word(background.colour) not in BACKGROUND_WORDS:
            continue
        thing = sample_thing(rng, background)
        if thing.name is not None or thing.hat is not None:
            continue
        thing = place([thing], None, rng)[0]
        images.append(Image.fromarray(render(Scene(background, (thing,)))))
        facts.append(
            {
                "size": thing.size,
                "colour": colour_word(thing.colour),
                "shape": thing.shape,
                "background": background.word,
                "pattern": thing.pattern.kind,
                "colour_margin": colour_margin(thing.colour),
            }
        )
    return images, facts


def zero_shot(
    scorer: ClipScorer, images: list[Image.Image], facts: list[dict], attributes
) -> dict[str, float]:
    """Share of images whose CLIP choice of each attribute (the others kept as the facts say) is right."""
    emb = scorer.images(images, grid_shifts=True)
    choices = {**ATTRIBUTES, "pattern": PATTERN_KINDS}
    hits: dict[str, list[bool]] = {a: [] for a in attributes}
    for i, p in enumerate(facts):
        for attr in attributes:
            values = choices[attr]
            texts = [prompt_of({**p, attr: v}) for v in values]
            hits[attr].append(values[int((scorer.texts(texts) @ emb[i]).argmax())] == p[attr])
    return {a: float(np.mean(h)) for a, h in hits.items()}


def present(scorer: ClipScorer, images: list[Image.Image], with_it: list[str], without: list[str]) -> float:
    """Share of images the CLIP finds closer to the text naming an ingredient than to the same without it."""
    emb = scorer.images(images, grid_shifts=True)
    a, b = scorer.texts(with_it), scorer.texts(without)
    return float(((emb * a).sum(-1) > (emb * b).sum(-1)).float().mean())


def ingredients(pipe, scorer: ClipScorer, n_prompts: int, n_seeds: int) -> dict:
    """How often a named ingredient is drawn (zero-shot, against the same prompt without it)."""
    rng = random.Random(5)
    out = {}
    for name, phrase in [
        *((k, f"with {v}") for k, v in PATTERN_PHRASES.items()),
        ("face", "with a face"),
        ("hat", "wearing a hat"),
    ]:
        bases = [f"a {rng.choice(list(COLOUR_WORDS))} {rng.choice(SHAPES)}" for _ in range(n_prompts)]
        backgrounds = [f" on a {rng.choice(BACKGROUND_WORDS)} background" for _ in range(n_prompts)]
        prompts = [f"{b} {phrase}{g}" for b, g in zip(bases, backgrounds, strict=True)]
        rows = generate(pipe, prompts, list(range(n_seeds)))
        images = [im for row in rows for im in row]
        with_it = [p for p in prompts for _ in range(n_seeds)]
        without = [f"{b}{g}" for b, g in zip(bases, backgrounds, strict=True) for _ in range(n_seeds)]
        out[name] = present(scorer, images, with_it, without)
    return out


def judge_on_patterns(scorer: ClipScorer, n: int) -> dict:
    """The judge's ingredient reading on renders: the same with/without choice, on truth known by construction."""
    rng = random.Random(9)
    out = {}
    for kind, words in PATTERN_PHRASES.items():
        images, with_it, without = [], [], []
        for _ in range(n):
            background = sample_background(rng)
            thing = sample_thing(rng, background)
            while thing.name is not None:
                thing = sample_thing(rng, background)
            pattern = sample_pattern(rng, thing.colour)
            while pattern.kind == "solid":
                pattern = sample_pattern(rng, thing.colour)
            thing = place(
                [
                    replace(
                        thing,
                        pattern=replace(pattern, kind=kind),
                        face=None,
                        hat=None,
                        radius=rng.uniform(0.21, 0.29),
                    )
                ],
                None,
                rng,
            )[0]
            images.append(Image.fromarray(render(Scene(background, (thing,)))))
            base = f"a {colour_word(thing.colour)} {thing.shape}"
            with_it.append(f"{base} with {words}")
            without.append(base)
        out[kind] = present(scorer, images, with_it, without)
    return out


def before_search(pipe, scorer: ClipScorer, n_seeds: int, names) -> dict:
    out = {}
    for name in names:
        subject = SUBJECTS[name]
        detector = subject_detector(scorer, subject, vae=pipe.vae, cache_dir=DETECTOR_CACHE)
        described = [subject.eval_prompts(None)[0]]
        if subject.kind == "object":
            described = [thing_phrase(subject.thing)]
        rates = {"detector_auc": detector.auc}
        for label, prompts in (
            ("identifier", subject.eval_prompts("sks")),
            ("class", subject.eval_prompts(None)),
            ("description", described),
        ):
            rows = generate(pipe, prompts, list(range(n_seeds)))
            rates[label] = float(
                detector.present(scorer.images([im for row in rows for im in row])).float().mean()
            )
        out[name] = rates
    return out


def markdown(r: dict) -> str:
    lines = [
        f"# World v2: {r['model']}",
        "",
        f"Judge: {r['clip']}. Settings: {r['settings']}.",
        "",
        "| measure | shape | colour | background | pattern |",
        "|---|---|---|---|---|",
    ]
    for key, label in (
        ("judge_on_renders", "judge on renders"),
        ("base_model", "base model, 96 prompts x 2"),
    ):
        v = r[key]
        lines.append(
            f"| {label} | {v['shape']:.0%} | {v['colour']:.0%} | {v['background']:.0%} | "
            f"{v.get('pattern', float('nan')):.0%} |"
        )
    lines.append(
        f"| judge on renders of a clear colour (next word ≥ {CLEAR_COLOUR:.0f} ΔE further) | | "
        f"{r['judge_on_clear_colours']:.0%} | | |"
    )
    lines += ["", "| ingredient | judge on renders | drawn when named |", "|---|---|---|"]
    for k, v in r["ingredients"].items():
        lines.append(f"| {k} | {r['judge_on_ingredients'].get(k, float('nan')):.0%} | {v:.0%} |")
    t = r["text_pathway"]
    lines += [
        "",
        f"Text pathway: mean cosine between word states {t['word_state_cosine']:.3f}; 'sks' moves the "
        f"conditioning by {t['identifier_moves']:.4f}, 'red' by {t['word_moves']:.4f}.",
        "",
        "| subject | detector AUC | identifier prompts | class prompts | fullest description |",
        "|---|---|---|---|---|",
    ]
    for name, v in r["before_search"].items():
        lines.append(
            f"| {name} | {v['detector_auc']:.3f} | {v['identifier']:.0%} | {v['class']:.0%} | "
            f"{v['description']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="the world v2 Stable Diffusion folder")
    parser.add_argument("--clip", required=True, help="the world v2 CLIP folder (the judge)")
    parser.add_argument("--quick", action="store_true", help="24 prompts and fewer renders")
    parser.add_argument("--name", default="world-v2")
    parser.add_argument("--subjects", default=",".join(SUBJECTS), help="comma-separated (default: all nine)")
    args = parser.parse_args()
    n_prompts, n_seeds, n_renders = (24, 2, 200) if args.quick else (96, 2, 1000)
    torch.manual_seed(0)
    pipe, scorer = load_pipeline(args.model), ClipScorer(args.clip)
    report: dict = {
        "model": args.model,
        "clip": args.clip,
        "settings": {
            "prompts": n_prompts,
            "seeds": n_seeds,
            "renders": n_renders,
            "steps": 25,
            "guidance_scale": GUIDANCE_SCALE,
        },
    }
    images, facts = random_renders(n_renders, seed=1)
    report["judge_on_renders"] = zero_shot(
        scorer, images, facts, ("shape", "colour", "background", "pattern")
    )
    clear = [i for i, f in enumerate(facts) if f["colour_margin"] >= CLEAR_COLOUR]
    report["judge_on_clear_colours"] = zero_shot(
        scorer, [images[i] for i in clear], [facts[i] for i in clear], ("colour",)
    )["colour"]
    report["judge_on_ingredients"] = judge_on_patterns(scorer, n_renders // 10)
    prompts = single_object_prompts(n_prompts, seed=3)
    rows = generate(pipe, [prompt_of(p) for p in prompts], list(range(n_seeds)))
    report["base_model"] = zero_shot(
        scorer,
        [im for row in rows for im in row],
        [p for p in prompts for _ in range(n_seeds)],
        ("shape", "colour", "background"),
    )
    report["ingredients"] = ingredients(pipe, scorer, n_prompts // 4, n_seeds)
    report["text_pathway"] = text_pathway(pipe, "a sks circle", "a circle", "a red circle")
    report["before_search"] = before_search(pipe, scorer, n_seeds, args.subjects.split(","))
    save_results(args.name, report, markdown(report))


if __name__ == "__main__":
    main()
