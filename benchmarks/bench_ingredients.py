"""Can the embedded model draw the subjects' ingredients? Patterns, two-tone fills and faces, measured.

Concept neurons select what a model already draws; they add nothing. The world's training renders carry
the subjects' ingredients as unnamed variation (60% of objects have a pattern or two tones, 20% a face),
and captions never mention them, so a plain prompt ("a blue square on a gray background") asks for the
whole training distribution of blue squares, patterned ones included. A model that has learned it draws
the ingredients about as often as the renders show them; one that has not draws plain fills.

For each ingredient, a linear probe on the world CLIP's image embeddings (`cones_world.concepts.fit_probe`)
is fitted on single-object renders with it against the same renders without it, its threshold and ROC AUC
measured on other renders. It then counts the ingredient in:
  - renders drawn from the training distribution for the same plain prompts (what a perfect model draws);
  - the same renders passed through the VAE (what a perfect UNet could give);
  - the model's images for those prompts, at the default guidance and at lower ones;
  - where the model's tokenizer holds the words (a text encoder taken from the world CLIP), its images when
    the prompt names the ingredient ("with a face"), words its captions never hold: it should draw it no more
    often, or the world's subjects could be asked for by name.

    python benchmarks/bench_ingredients.py            # writes benchmarks/results/ingredients.{json,md}
    python benchmarks/bench_ingredients.py --quick    # fewer prompts and renders
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bench_world import prompt_of, single_object_prompts  # noqa: E402
from results_io import save_results  # noqa: E402

from cones import GUIDANCE_SCALE  # noqa: E402
from cones.evaluate import ClipScorer, roc_auc  # noqa: E402
from cones.generate import generate  # noqa: E402
from cones.pipeline import load_pipeline  # noqa: E402
from cones_world.concepts import best_threshold, fit_probe, through_vae  # noqa: E402
from cones_world.render import render  # noqa: E402
from cones_world.scene import TONES, Background, Scene, Thing, place, radius_for, sample_thing  # noqa: E402

# Each ingredient: whether a thing has it. A probe for one is fitted against renders with every other look
# (plain, the other ingredients), so that it answers for that ingredient, not for "anything but plain".
# How the evaluation CLIP's captions name each ingredient; the diffusion model's captions never do, so naming it
# in a prompt should not make the model draw it more often (the world's subjects cannot be asked for).
NAMED = {
    "pattern (stripes, checkers, dots)": "with white horizontal stripes",
    "two tones (halves)": "with white left and right halves",
    "face": "with a face",
}
INGREDIENTS = {
    "pattern (stripes, checkers, dots)": lambda t: (
        t.pattern in ("hstripes", "vstripes", "dstripes", "checkers", "dots")
    ),
    "two tones (halves)": lambda t: t.pattern in ("vsplit", "hsplit"),
    "face": lambda t: t.face,
}


def object_thing(p: dict, rng: random.Random, has=None, wanted: bool = True) -> Thing:
    """A thing for the plain prompt `p`, its look drawn as in training (no hat: captions name hats); with
    `has`, drawn again until `has(thing) == wanted`."""
    while True:
        thing = replace(
            sample_thing(rng),
            shape=p["shape"],
            colour=p["colour"],
            size=p["size"],
            radius=radius_for(p["size"], rng, False),
            hat=None,
        )
        if thing.tone == thing.colour:
            thing = replace(thing, tone=next(t for t in TONES if t != thing.colour))
        if has is None or has(thing) == wanted:
            return thing


def scene_image(p: dict, thing: Thing, rng: random.Random) -> Image.Image:
    background = Background(p["background"], horizon=rng.uniform(0.45, 0.7))
    return Image.fromarray(render(Scene(background, place([thing], None, rng))))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=None, help="a world model folder (default: the shipped one)")
    parser.add_argument("--name", default="ingredients")
    args = parser.parse_args()
    start = time.time()
    n_prompts, n_seeds, n_fit = (24, 2, 300) if args.quick else (48, 2, 600)
    scorer = ClipScorer()
    pipe = load_pipeline(args.model)
    prompts = single_object_prompts(n_prompts, seed=21)
    rng = random.Random(0)

    # 1. One probe per ingredient, fitted and measured on renders of random plain prompts.
    def renders(n: int, has, wanted: bool, seed: int) -> list[Image.Image]:
        r = random.Random(seed)
        return [
            scene_image(p, object_thing(p, r, has, wanted), r) for p in single_object_prompts(n, seed=seed)
        ]

    probes = {}
    for k, (name, has) in enumerate(INGREDIENTS.items()):
        pos_fit, neg_fit = (
            scorer.images(renders(n_fit, has, True, 100 + k)),
            scorer.images(renders(n_fit, has, False, 200 + k)),
        )
        mean, scale, weight, bias = fit_probe(pos_fit, neg_fit)
        score = lambda emb, m=mean, s=scale, w=weight, b=bias: ((emb - m) / s) @ w + b  # noqa: E731
        pos = score(scorer.images(renders(200, has, True, 300 + k)))
        neg = score(scorer.images(renders(200, has, False, 400 + k)))
        probes[name] = (score, best_threshold(pos.numpy(), neg.numpy()), roc_auc(pos.numpy(), neg.numpy()))

    # 2. The share of images each probe sees its ingredient in.
    def rates(images: list[Image.Image]) -> dict[str, float]:
        emb = scorer.images(images)
        return {
            name: float((score(emb) > threshold).float().mean())
            for name, (score, threshold, _) in probes.items()
        }

    things = [(p, object_thing(p, rng)) for p in prompts for _ in range(n_seeds)]
    training = [scene_image(p, t, rng) for p, t in things]
    rows = {
        "training renders, as drawn (truth)": {
            name: float(np.mean([has(t) for _, t in things])) for name, has in INGREDIENTS.items()
        },
        "training renders, seen by the probe": rates(training),
        "... through the VAE": rates(through_vae(pipe.vae, training)),
    }
    for guidance in (GUIDANCE_SCALE, 3.0, 1.0):
        images = generate(
            pipe, [prompt_of(p) for p in prompts], list(range(n_seeds)), guidance_scale=guidance
        )
        rows[f"model, guidance {guidance:g}"] = rates([im for row in images for im in row])
        if guidance == GUIDANCE_SCALE:
            grid = np.concatenate(
                [np.concatenate([np.asarray(im) for im in row[:2]], 1) for row in images[:12]], 0
            )
            Image.fromarray(grid).save(ROOT / "benchmarks" / "results" / f"{args.name}-model.png")

    # 3. The ingredient named in the prompt, where the model's tokenizer knows the words (a tokenizer made
    # from the captions does not, and spells them out letter by letter: that measures gibberish, not naming).
    vocab = pipe.tokenizer.get_vocab()
    knows = all(f"{w}</w>" in vocab for phrase in NAMED.values() for w in phrase.split())
    if knows:
        named = {}
        for name, phrase in NAMED.items():
            texts = [prompt_of(p).replace(" on a ", f" {phrase} on a ", 1) for p in prompts]
            images = generate(pipe, texts, list(range(n_seeds)))
            named[name] = rates([im for row in images for im in row])[name]
        rows[f"model, guidance {GUIDANCE_SCALE:g}, the ingredient named in the prompt"] = named

    report = {
        "settings": {
            "prompts": n_prompts,
            "seeds": n_seeds,
            "fit_renders": n_fit,
            "model": args.model or "shipped",
        },
        "probe_auc": {name: auc for name, (_, _, auc) in probes.items()},
        "rates": rows,
        "seconds": time.time() - start,
    }
    names = list(INGREDIENTS)
    lines = [
        "# Does the model draw the subjects' ingredients?",
        "",
        f"Plain single-object prompts ({n_prompts} x {n_seeds} seeds; captions never name these looks). Share of "
        "images in which a linear probe on the world CLIP's embeddings sees each ingredient (probe ROC AUC on "
        "held-out renders in the header). Training renders: the same prompts drawn as the training data draws "
        "them, a look chosen at random (43% of objects with stripes, checkers or dots, 17% two-tone, 20% with a "
        "face); the first row counts their looks, the next what the probes see in them.",
        "",
        "| images | " + " | ".join(f"{n} (AUC {report['probe_auc'][n]:.3f})" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for label, r in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * r[n]:.0f}%" for n in names) + " |")
    phrases = "; ".join(f"'{phrase}'" for phrase in NAMED.values())
    lines += [
        "",
        f"Last row: each ingredient's own rate when the prompt names it the evaluation CLIP's way ({phrases}), "
        "words the diffusion model's captions never hold: it should stay near the plain prompts' rate, or the "
        "subjects could be asked for by name."
        if knows
        else f"Naming the ingredients ({phrases}) is not measured: this model's tokenizer does not hold those words.",
    ]
    lines += [
        "",
        f"Total {report['seconds']:.0f} s. Grid of the model's images at guidance {GUIDANCE_SCALE:g}: "
        f"{args.name}-model.png.",
    ]
    save_results(args.name, report, "\n".join(lines) + "\n", ROOT / "benchmarks" / "results")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
