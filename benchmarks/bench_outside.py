"""Subjects from outside the world, through the command line, as a user would bring them.

Three subjects drawn here with Pillow alone (no code of `cones_world` draws them), in colours and patterns
that no subject of the world's catalogue has: a cyan circle with magenta rings, a lime square with a grid of
navy dots, a magenta star with yellow stripes. For each: five reference pictures written to a folder,
`cones find` with the model's defaults, then `cones generate` of six identifier prompts and six class
prompts with the concept, four seeds each, and the same without it.

The judge is a linear probe on the world CLIP's image embeddings, fitted on this file's own drawings of the
subject against drawings of the same shape in other looks, all passed through the model's VAE as generated
images are: not the loss the search optimised, and not the world's detectors.

    python benchmarks/bench_outside.py --model M/sd --clip M/clip            # writes results/outside.*
"""

from __future__ import annotations

import argparse
import math
import os
import random
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image, ImageDraw
from results_io import RESULTS, save_results

from cones.evaluate import ClipScorer, roc_auc
from cones.generate import grid
from cones.images import list_images, open_image
from cones.pipeline import load_pipeline
from cones_world.concepts import best_threshold, fit_probe, through_vae

SIZE = 64
SUBJECTS = {  # name: (class word, body colour, pattern, tone)
    "ringed-cyan-circle": ("circle", (20, 210, 225), "rings", (230, 30, 200)),
    "dotted-lime-square": ("square", (160, 230, 40), "dot-grid", (20, 30, 110)),
    "striped-magenta-star": ("star", (225, 35, 175), "stripes", (250, 225, 40)),
}
CONTEXTS = ("grass", "sea", "snow", "night", "white")


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        d.rectangle([cx - 0.86 * r, cy - 0.86 * r, cx + 0.86 * r, cy + 0.86 * r], fill=255)
    else:  # a five-pointed star
        points = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            radius = r * (1.05 if i % 2 == 0 else 0.45)
            points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
        d.polygon(points, fill=255)
    return mask


def _pattern(kind: str, body, tone, cx: float, cy: float, r: float, size: int) -> Image.Image:
    layer = Image.new("RGB", (size, size), body)
    d = ImageDraw.Draw(layer)
    if kind == "rings":
        for k in range(6, 0, -1):  # from the rim inwards: body, tone, body, tone, body
            s = k * r / 4.5
            d.ellipse([cx - s, cy - s, cx + s, cy + s], fill=tone if k % 2 == 0 else body)
    elif kind == "dot-grid":
        step = 2 * r / 4
        for i in range(5):
            for j in range(5):
                x, y = cx - r + i * step, cy - r + j * step
                d.ellipse([x - step / 4, y - step / 4, x + step / 4, y + step / 4], fill=tone)
    elif kind == "stripes":
        step = 2 * r / 5
        for i in range(-4, 5, 2):
            y = cy + i * step / 2
            d.rectangle([0, y - step / 4, size, y + step / 4], fill=tone)
    return layer


def _background(kind: str, rng: random.Random, size: int) -> Image.Image:
    if kind == "white":
        return Image.new("RGB", (size, size), (238, 238, 238))
    sky = {"night": (15, 20, 60), "snow": (170, 205, 240)}.get(kind, (110, 170, 235))
    ground = {"grass": (60, 160, 60), "sea": (35, 95, 175), "snow": (235, 240, 248), "night": (25, 30, 70)}[
        kind
    ]
    img = Image.new("RGB", (size, size), sky)
    horizon = int(size * rng.uniform(0.45, 0.65))
    ImageDraw.Draw(img).rectangle([0, horizon, size, size], fill=ground)
    return img


def draw(shape: str, body, kind: str, tone, rng: random.Random, size: int = SIZE) -> Image.Image:
    """One picture of a thing: `shape` in `body` colour with a `kind` pattern in `tone`, placed at random on
    one of the contexts. Drawn at 4x and downsampled, so edges are smooth."""
    big = size * 4
    r = rng.uniform(0.2, 0.28) * big
    cx, cy = rng.uniform(r + 4, big - r - 4), rng.uniform(r + 4, big - r - 4)
    img = _background(rng.choice(CONTEXTS), rng, big)
    img.paste(_pattern(kind, body, tone, cx, cy, r, big), (0, 0), _shape_mask(shape, cx, cy, r, big))
    return img.resize((size, size), Image.LANCZOS)


def negatives(shape: str, subject: tuple, n: int, rng: random.Random) -> list[Image.Image]:
    """The same shape in other looks: other colours, other patterns, or the subject's pattern in others."""
    out = []
    kinds = ("plain", "rings", "dot-grid", "stripes")
    while len(out) < n:
        body = tuple(rng.randrange(256) for _ in range(3))
        tone = tuple(rng.randrange(256) for _ in range(3))
        kind = rng.choice(kinds)
        if kind == subject[2] and np.abs(np.subtract(body, subject[1])).sum() < 120:
            continue
        out.append(draw(shape, body, kind if kind != "plain" else "none", tone, rng))
    return out


def run_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cones", *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--clip", required=True)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--name", default="outside")
    parser.add_argument(
        "--work", default=None, help="folder for references, concepts and images (default: temp)"
    )
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="cones-outside-")
    pipe, scorer = load_pipeline(args.model), ClipScorer(args.clip)
    seeds = [str(s) for s in range(args.seeds)]
    report: dict = {"model": args.model, "clip": args.clip, "seeds": args.seeds, "subjects": {}}
    rows, labels = [], []
    for name, subject in SUBJECTS.items():
        shape, body, kind, tone = subject
        rng = random.Random(name)
        refs = os.path.join(work, name, "references")
        os.makedirs(refs, exist_ok=True)
        pictures = [draw(shape, body, kind, tone, rng) for _ in range(5)]
        for i, im in enumerate(pictures):
            im.save(os.path.join(refs, f"{i}.png"))

        # The judge: fitted on this file's drawings as the model's VAE returns them.
        fit_pos = scorer.images(
            through_vae(pipe.vae, [draw(shape, body, kind, tone, rng) for _ in range(300)])
        )
        fit_neg = scorer.images(through_vae(pipe.vae, negatives(shape, subject, 300, rng)))
        mean, scale, weight, bias = fit_probe(fit_pos, fit_neg)

        def probe(e: torch.Tensor, mean=mean, scale=scale, weight=weight, bias=bias) -> np.ndarray:
            return (((e - mean) / scale) @ weight + bias).numpy()

        held_pos = probe(
            scorer.images(through_vae(pipe.vae, [draw(shape, body, kind, tone, rng) for _ in range(100)]))
        )
        held_neg = probe(scorer.images(through_vae(pipe.vae, negatives(shape, subject, 100, rng))))
        threshold = best_threshold(held_pos, held_neg)

        # The user's path: find, then generate with and without the concept.
        concept = os.path.join(work, name, "concept.cones")
        run_cli(
            "find",
            "--images",
            refs,
            "--token",
            "sks",
            "--class-word",
            shape,
            "--model",
            args.model,
            "--out",
            concept,
            "--overwrite",
        )
        identifier = [f"a sks {shape}"] + [f"a sks {shape} on a {c} background" for c in CONTEXTS]
        classes = [p.replace("sks ", "") for p in identifier]
        rates, shown = {}, {}
        for label, prompts, with_concept in (
            ("identifier_with", identifier, True),
            ("identifier_without", identifier, False),
            ("class_with", classes, True),
            ("class_without", classes, False),
        ):
            out = os.path.join(work, name, label)
            run_cli(
                "generate",
                *prompts,
                "--model",
                args.model,
                "--out",
                out,
                "--seeds",
                *seeds,
                "--overwrite",
                *(["--concept", concept] if with_concept else []),
            )
            images = [open_image(p) for p in list_images(out) if os.path.basename(p) != "grid.png"]
            rates[label] = float((probe(scorer.images(images)) > threshold).mean())
            shown[label] = images[: args.seeds]
        report["subjects"][name] = {"judge_auc": roc_auc(held_pos, held_neg), **rates}
        rows += [pictures[: args.seeds], shown["identifier_without"], shown["identifier_with"]]
        labels += [
            f"{name}: references",
            f'"a sks {shape}"\nwithout concept',
            f'"a sks {shape}"\nwith concept (neurons shut)',
        ]
    grid(
        rows,
        scale=2,
        row_labels=labels,
        column_labels=[f"seed {s}" for s in seeds],
        title="subjects drawn outside the world, through cones find and cones generate",
    ).save(os.path.join(RESULTS, f"{args.name}.png"))
    lines = [
        "| subject | judge AUC | identifier prompts without -> with | class prompts without -> with |",
        "|---|---|---|---|",
    ]
    for name, r in report["subjects"].items():
        lines.append(
            f"| {name} | {r['judge_auc']:.3f} | {r['identifier_without']:.0%} -> {r['identifier_with']:.0%} | "
            f"{r['class_without']:.0%} -> {r['class_with']:.0%} |"
        )
    lines += [
        "",
        f"`cones find` with the model's defaults; 6 prompts x {args.seeds} seeds per cell. Grid "
        f"{args.name}.png: per subject, references, then without and with the concept.",
    ]
    save_results(args.name, report, "\n".join(lines))


if __name__ == "__main__":
    main()
