"""How good is the embedded world model? The numbers the world's issue asks for, measured side by side.

1. The evaluation CLIP on real renders: zero-shot choice of shape, colour and background (each attribute
   chosen among all its values, the prompt's other words kept), and its subject-vs-class ROC AUC. The same
   choices on the renders passed through the model's VAE (encoded, decoded): every generated image comes
   out of that decoder, so this is the most the judge can credit a perfect UNet with.
2. The base model follows its prompts: the same zero-shot choices on images generated from single-object
   prompts, at the default guidance scale and beside it.
3. Before any search, identifier prompts ("a sks circle") show the subject no more often than the class
   prompt ("a circle") does: the detector's rate on both.
4. Generation time of a batch of 16 images at 64x64 with 25 steps.

    python benchmarks/bench_world.py            # full: writes benchmarks/results/world.{json,md}
    python benchmarks/bench_world.py --quick    # fewer prompts and seeds
    python benchmarks/bench_world.py --quick --model runs/world/sd --name world-new   # a model in training
    python benchmarks/bench_world.py --quick --clip runs/world/clip --name world-clip  # another judge
    python benchmarks/bench_world.py --prompts 96 --model runs/world/sd --against OLD --name world-vs-old
        # prompt following of two models, side by side on the same prompts and seeds
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
from PIL import Image
from results_io import save_results

from cones import GUIDANCE_SCALE
from cones.evaluate import ClipScorer
from cones.generate import generate
from cones.pipeline import load_pipeline
from cones_world.concepts import embed, pictures, subject_detector, through_vae
from cones_world.render import render
from cones_world.scene import BACKGROUNDS, COLOURS, SHAPES, SIZES, Background, Scene, Thing, place
from cones_world.subjects import SUBJECTS

ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "background": BACKGROUNDS}
OTHER_GUIDANCE = tuple(g for g in (3.0, 5.0, 7.5, 10.0) if g != GUIDANCE_SCALE)


def single_object_prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(
            {
                "size": rng.choice(SIZES),
                "colour": rng.choice(list(COLOURS)),
                "shape": rng.choice(SHAPES),
                "background": rng.choice(BACKGROUNDS),
            }
        )
    return out


def prompt_of(p: dict) -> str:
    return f"a {p['size']} {p['colour']} {p['shape']} on a {p['background']} background"


def canonical_render(p: dict, rng: random.Random) -> Image.Image:
    """The plain render of a prompt: solid fill, no face or hat, a day sky without sun."""
    from cones_world.scene import radius_for

    thing = Thing(p["shape"], p["colour"], p["size"], radius=radius_for(p["size"], rng, False))
    scene = Scene(Background(p["background"], horizon=rng.uniform(0.45, 0.7)), place([thing], None, rng))
    return Image.fromarray(render(scene))


def prompt_following(
    pipe, scorer: ClipScorer, prompts: list[dict], n_seeds: int, guidance_scale: float = GUIDANCE_SCALE
) -> dict[str, float]:
    """Zero-shot agreement of the model's images of single-object `prompts` (seeds 0..n_seeds-1)."""
    rows = generate(
        pipe, [prompt_of(p) for p in prompts], list(range(n_seeds)), guidance_scale=guidance_scale
    )
    return zero_shot(scorer, [im for row in rows for im in row], [p for p in prompts for _ in range(n_seeds)])


def zero_shot(scorer: ClipScorer, images: list[Image.Image], prompts: list[dict]) -> dict[str, float]:
    """Share of images whose CLIP choice of each attribute matches the prompt."""
    hits = zero_shot_hits(scorer, images, prompts)
    return {a: float(np.mean(h)) for a, h in hits.items()}


def zero_shot_hits(
    scorer: ClipScorer,
    images: list[Image.Image],
    prompts: list[dict],
    attributes: tuple[str, ...] = tuple(ATTRIBUTES),
) -> dict[str, list[bool]]:
    """Per image and attribute, whether the CLIP's choice among all the attribute's values (the prompt's other
    words kept) is the prompt's. The images are seen on four quarter-patch shifts as well (`grid_shifts`)."""
    emb = scorer.images(images, grid_shifts=True)
    hits: dict[str, list[bool]] = {a: [] for a in attributes}
    for i, p in enumerate(prompts):
        for attr in attributes:
            values = ATTRIBUTES[attr]
            texts = [prompt_of({**p, attr: v}) for v in values]
            hits[attr].append(values[int((scorer.texts(texts) @ emb[i]).argmax())] == p[attr])
    return hits


def judge_on_many_renders(scorer: ClipScorer, n: int, seed: int = 11) -> dict:
    """The judge's shape choice on `n` renders, overall and split where it fails most: a white object on the
    white background (7 grey levels apart, drawn only by its antialiased edge) against every other pair."""
    prompts = single_object_prompts(n, seed=seed)
    rng = random.Random(seed + 1)
    renders = [canonical_render(p, rng) for p in prompts]
    hits = np.array(zero_shot_hits(scorer, renders, prompts, ("shape",))["shape"])
    white = np.array([p["colour"] == "white" and p["background"] == "white" for p in prompts])
    errors: dict[str, int] = {}
    for p, hit in zip(prompts, hits, strict=True):
        if not hit:
            key = f"{p['size']} {p['shape']}" + (
                " (white on white)" if p["colour"] == p["background"] else ""
            )
            errors[key] = errors.get(key, 0) + 1
    return {
        "renders": n,
        "seed": seed,
        "shape": float(hits.mean()),
        "white_on_white": {"renders": int(white.sum()), "shape": float(hits[white].mean())},
        "other_pairs": {"renders": int((~white).sum()), "shape": float(hits[~white].mean())},
        "errors_on_white_on_white": int((~hits & white).sum()),
        "errors": int((~hits).sum()),
        "most_common_errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:6]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--model", default=None, help="a world model folder to measure (default: the shipped one)"
    )
    parser.add_argument("--clip", default=None, help="the judge's CLIP folder (default: the shipped one)")
    parser.add_argument("--name", default="world", help="results file name")
    parser.add_argument(
        "--prompts", type=int, default=None, help="single-object prompts (default: 24 quick, 96)"
    )
    parser.add_argument(
        "--against",
        default=None,
        help="another model folder whose prompt following is measured beside, on the same prompts",
    )
    args = parser.parse_args()
    n_prompts, n_seeds = (24, 2) if args.quick else (96, 2)
    n_prompts = args.prompts or n_prompts
    torch.manual_seed(0)
    pipe, scorer = load_pipeline(args.model), ClipScorer(args.clip)
    report: dict = {
        "model": args.model or "cones-world (embedded)",
        "clip": args.clip or "cones-world (embedded)",
        "settings": {"prompts": n_prompts, "seeds": n_seeds, "steps": 25, "guidance_scale": GUIDANCE_SCALE},
    }

    # 1. The CLIP on real renders.
    prompts = single_object_prompts(n_prompts * n_seeds, seed=1)
    rng = random.Random(2)
    renders = [canonical_render(p, rng) for p in prompts]
    report["clip_on_renders"] = zero_shot(scorer, renders, prompts)
    report["clip_on_decoded_renders"] = zero_shot(scorer, through_vae(pipe.vae, renders), prompts)
    report["clip_on_many_renders"] = judge_on_many_renders(scorer, 3000)
    # The CLIP separates each subject from its class on renders (the bar), and, as the detector of generated
    # images, on renders as the VAE returns them.
    on_renders = {name: subject_detector(scorer, s) for name, s in SUBJECTS.items()}
    detectors = {name: subject_detector(scorer, s, vae=pipe.vae) for name, s in SUBJECTS.items()}
    report["subject_auc"] = {name: d.auc for name, d in on_renders.items()}
    report["subject_similarity_auc"] = {name: d.similarity_auc for name, d in on_renders.items()}
    report["subject_auc_decoded"] = {name: d.auc for name, d in detectors.items()}
    # Why the detector of generated images learns decoded renders: what the crisp detector makes of the
    # same held-out renders once the VAE has returned them (the images a perfect UNet would draw).
    report["crisp_detector_on_decoded"] = {}
    for name, s in SUBJECTS.items():
        shown = {"subject": s.held_out(200, seed=0), "class": s.class_negatives(200, seed=2)}
        report["crisp_detector_on_decoded"][name] = {
            k: float(on_renders[name].present(embed(scorer, pictures(s, v), pipe.vae)).float().mean())
            for k, v in shown.items()
        }

    # 2. The base model on single-object prompts.
    prompts = single_object_prompts(n_prompts, seed=3)
    report["base_model_by_guidance"] = {}
    for guidance in sorted((GUIDANCE_SCALE, *OTHER_GUIDANCE)):
        report["base_model_by_guidance"][str(guidance)] = prompt_following(
            pipe, scorer, prompts, n_seeds, guidance
        )
    report["base_model"] = report["base_model_by_guidance"][str(GUIDANCE_SCALE)]
    if args.against:
        report["against"] = {
            "model": args.against,
            **prompt_following(load_pipeline(args.against), scorer, prompts, n_seeds),
        }

    # 3. Chance: identifier prompts vs class prompts on the base model, before any search.
    chance = {}
    for name, subject in SUBJECTS.items():
        rates = {}
        for label, token in (("identifier", "sks"), ("class", None)):
            rows = generate(pipe, subject.eval_prompts(token), list(range(n_seeds)))
            emb = scorer.images([im for row in rows for im in row])
            rates[label] = float(detectors[name].present(emb).float().mean())
        chance[name] = rates
    report["subject_rate_before_search"] = chance

    # 4. Generation time, 16 images at 64x64, 25 steps, side by side with one image.
    timings = {}
    for batch in (1, 16):
        generate(pipe, ["a red star on a sea background"] * batch, [0], batch_size=batch)  # warm-up
        t = time.perf_counter()
        generate(pipe, ["a red star on a sea background"] * batch, [0], batch_size=batch)
        timings[f"batch_{batch}_seconds"] = time.perf_counter() - t
    report["generation"] = {**timings, "threads": torch.get_num_threads()}

    lines = ["| check | shape | colour | background |", "|---|---|---|---|"]
    rows = [
        ("CLIP zero-shot on real renders", report["clip_on_renders"]),
        (
            "... on the same renders through the VAE (a perfect UNet's ceiling)",
            report["clip_on_decoded_renders"],
        ),
        (f"base model's images (CLIP zero-shot), guidance {GUIDANCE_SCALE}", report["base_model"]),
    ]
    rows += [
        (f"... at guidance {g}", r)
        for g, r in report["base_model_by_guidance"].items()
        if g != str(GUIDANCE_SCALE)
    ]
    if args.against:
        rows.append((f"{args.against}, same prompts and seeds, guidance {GUIDANCE_SCALE}", report["against"]))
    for label, r in rows:
        lines.append(f"| {label} | {r['shape']:.0%} | {r['colour']:.0%} | {r['background']:.0%} |")
    m = report["clip_on_many_renders"]
    lines += [
        "",
        f"The judge's shape choice on {m['renders']} more renders (seed {m['seed']}): {m['shape']:.1%}; "
        f"{m['errors_on_white_on_white']} of its {m['errors']} errors are on the {m['white_on_white']['renders']} "
        f"white objects on the white background ({m['white_on_white']['shape']:.0%} right there), "
        f"{m['other_pairs']['shape']:.1%} on every other pair. Most common errors: "
        + ", ".join(f"{k} {v}" for k, v in m["most_common_errors"].items())
        + ".",
    ]
    lines += [
        "",
        f"Generated images: {n_prompts} single-object prompts x {n_seeds} seeds per row "
        f"(one image is {1 / (n_prompts * n_seeds):.1%} of a column).",
    ]
    lines += [
        "",
        "| subject | ROC AUC on renders (probe) | plain similarity AUC | renders through the VAE, "
        "subject / class, seen by the probe of crisp renders | detector's AUC on renders through the VAE "
        "| detected before any search: identifier prompts ('a sks circle ...') | class prompts "
        "('a circle ...') |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in SUBJECTS:
        c, crisp = chance[name], report["crisp_detector_on_decoded"][name]
        lines.append(
            f"| {name} | {report['subject_auc'][name]:.3f} | {report['subject_similarity_auc'][name]:.3f} "
            f"| {crisp['subject']:.0%} / {crisp['class']:.0%} | {report['subject_auc_decoded'][name]:.3f} "
            f"| {c['identifier']:.0%} | {c['class']:.0%} |"
        )
    g = report["generation"]
    lines += [
        "",
        f"Generation, 64x64, 25 steps, CPU ({g['threads']} threads): 1 image {g['batch_1_seconds']:.1f} s, "
        f"16 images {g['batch_16_seconds']:.1f} s.",
    ]
    save_results(args.name, report, "\n".join(lines))


if __name__ == "__main__":
    main()
