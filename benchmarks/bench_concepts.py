"""Concept neurons of each world subject, one at a time: does shutting them make the model draw the subject?

For every subject: search its concept neurons from its 5 reference images (A2), then generate the subject's
identifier prompts ("a sks circle on a grass background", ...) with the same seeds without and with the
neurons shut, and measure
- image alignment (CLIP cosine to the references) and the detector's subject rate, without -> with;
- text alignment to the prompt without the identifier;
- drift: the same prompts *without* the identifier, with and without the neurons shut, compared image to
  image (CLIP cosine of paired images, same seed); 1.0 means shutting left them untouched. Its yardstick:
  the cosine between images of the same prompt at different seeds (what resampling alone changes);
- sparsity, file size and search time.

    python benchmarks/bench_concepts.py --quick                 # 3 subjects, 2 seeds
    python benchmarks/bench_concepts.py --sparsity 0.01 0.05    # every subject, two sparsities
    python benchmarks/bench_concepts.py --world v2 --model M/sd --clip M/clip --name concepts-v2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from results_io import DETECTOR_CACHE, RESULTS, resumed, save_results, write_atomic

from cones import GUIDANCE_SCALE
from cones.evaluate import ClipScorer
from cones.find import FindConfig
from cones.fingerprint import model_fingerprint
from cones.generate import generate, grid
from cones.pipeline import load_pipeline
from cones_world.concepts import (
    find_subject_concept,
    references,
    score_subject,
    subject_detector,
)
from cones_world.subjects import SUBJECTS as SUBJECTS_V1
from cones_world.v2.subjects import SUBJECTS as SUBJECTS_V2


def flat(rows):
    return [im for row in rows for im in row]


def class_images(pipe, scorer, subject, seeds) -> tuple[torch.Tensor, float]:
    """CLIP embeddings of the class prompts' images on the model as it is (the drift's reference), and their
    yardstick: the mean cosine between images of one prompt at different seeds (what resampling changes)."""
    prompts = subject.eval_prompts(None)
    embeddings = scorer.images(flat(generate(pipe, prompts, seeds)))
    per_prompt = embeddings.view(len(prompts), len(seeds), -1)
    pairs = per_prompt @ per_prompt.transpose(1, 2)  # (prompts, seeds, seeds)
    off_diagonal = ~torch.eye(len(seeds), dtype=torch.bool)
    seed_similarity = float(pairs[:, off_diagonal].mean()) if len(seeds) > 1 else float("nan")
    return embeddings, seed_similarity


def drift(pipe, scorer, subject, concept, seeds, before: torch.Tensor, detector) -> tuple[float, float]:
    """Mean CLIP cosine between paired images of the class prompts, without (`before`) vs with the concept
    shut; and the share of those shut class-prompt images in which the detector sees the subject (a concept
    that reaches "a circle" as well as "a sks circle" shows the subject there too)."""
    with concept.shut(pipe.unet):
        after = scorer.images(flat(generate(pipe, subject.eval_prompts(None), seeds)))
    return float((before * after).sum(-1).mean()), float(detector.present(after).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 subjects, 2 seeds")
    parser.add_argument("--subjects", nargs="+", default=None)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--steps", type=int, default=FindConfig.steps)
    parser.add_argument("--targets", default="cross")
    parser.add_argument(
        "--prior-weight",
        type=float,
        default=FindConfig.prior_weight,
        help="λ, the weight of prior preservation in the search's loss",
    )
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument(
        "--model", default=None, help="a Stable Diffusion folder (default: the embedded model)"
    )
    parser.add_argument("--clip", default=None, help="the judge's CLIP folder (default: the embedded one)")
    parser.add_argument("--world", choices=("v1", "v2"), default="v1", help="whose subjects (default: v1)")
    parser.add_argument("--name", default="concepts", help="results file name")
    args = parser.parse_args()
    SUBJECTS = SUBJECTS_V2 if args.world == "v2" else SUBJECTS_V1
    names = args.subjects or (
        ["striped-circle", "sunset-sea", "smiling-star"] if args.quick else list(SUBJECTS)
    )
    seeds = list(range(args.seeds or (2 if args.quick else 4)))
    torch.manual_seed(0)
    pipe, scorer = load_pipeline(args.model), ClipScorer(args.clip)
    # resuming keeps the results of equal settings
    settings = {
        "steps": args.steps,
        "targets": args.targets,
        "seeds": seeds,
        "sparsities": args.sparsity,
        "lr": FindConfig.lr,
        "batch_size": FindConfig.batch_size,
        "guidance_scale": GUIDANCE_SCALE,
        "prior_weight": args.prior_weight,
        "model": model_fingerprint(pipe),
        "detector": "linear probe on decoded renders",
    }
    path = os.path.join(RESULTS, f"{args.name}.json")
    results = resumed(args.name, settings)  # subjects measured with the same settings are kept
    rows = []
    for name in names:
        if name in results["subjects"]:
            continue
        subject = SUBJECTS[name]
        detector = subject_detector(scorer, subject, vae=pipe.vae, cache_dir=DETECTOR_CACHE)
        _, pictures, _ = references(subject)
        started = time.time()
        config = FindConfig(
            steps=args.steps,
            targets=args.targets,
            sparsity=max(args.sparsity),
            prior_weight=args.prior_weight,
        )
        result = find_subject_concept(pipe, subject, config, cache_dir=os.path.join("runs", "class-cache"))
        seconds = time.time() - started
        base = score_subject(pipe, scorer, subject, detector, "sks", seeds)
        before, seed_similarity = class_images(pipe, scorer, subject, seeds)
        entry = {
            "detector_auc": detector.auc,
            "search_seconds": seconds,
            "seed_similarity": seed_similarity,
            "without": {k: base[k] for k in ("image_alignment", "text_alignment", "subject_rate")},
        }
        entry["without"]["class_subject_rate"] = float(detector.present(before).float().mean())
        rows += [pictures, base["images"][0]]
        labels = ["references", f'"{base["prompts"][0]}"\nwithout concept']
        for sparsity in args.sparsity:
            concept = result.select(sparsity=sparsity)
            with concept.shut(pipe.unet):
                shut = score_subject(pipe, scorer, subject, detector, "sks", seeds)
            with tempfile.TemporaryDirectory() as tmp:
                concept_path = os.path.join(tmp, "c.cones")
                concept.save(concept_path)
                size = os.path.getsize(concept_path)
            similarity, class_rate = drift(pipe, scorer, subject, concept, seeds, before, detector)
            entry[f"with_{sparsity}"] = {
                **{k: shut[k] for k in ("image_alignment", "text_alignment", "subject_rate")},
                "drift_similarity": similarity,
                "class_subject_rate": class_rate,
                "neurons": concept.num_neurons,
                "sparsity": concept.sparsity,
                "file_bytes": size,
            }
            rows.append(shut["images"][0])
            labels.append(f'"{base["prompts"][0]}"\n{100 * sparsity:g}% shut')
        results["subjects"][name] = entry
        print(name, json.dumps(entry), flush=True)
        write_atomic(
            path, json.dumps(results, indent=2)
        )  # after every subject: an interrupted run keeps them
        grid(
            rows,
            scale=2,
            row_labels=labels,
            column_labels=[f"seed {s}" for s in seeds],
            header_row=1,
            title=f"{name}: {args.steps}-step search",
        ).save(os.path.join(RESULTS, f"{args.name}-{name}.png"))
        rows = []

    def share(cell: dict, key: str) -> str:  # tables of runs before a measure existed show a dash
        return f"{cell[key]:.0%}" if key in cell else "–"

    head = (
        "| subject | AUC | image align. without | "
        + " | ".join(
            f"image align. / detected / drift sim. / class prompts detected @ {100 * s:g}%"
            for s in args.sparsity
        )
        + (" | detected without (identifier / class prompts) | seed-to-seed sim. | search |")
    )
    lines = [head, "|" + "---|" * (6 + len(args.sparsity))]
    for name, e in results["subjects"].items():
        cells = [
            f"{e[f'with_{s}']['image_alignment']:.3f} / {e[f'with_{s}']['subject_rate']:.0%} / "
            f"{e[f'with_{s}']['drift_similarity']:.3f} / {share(e[f'with_{s}'], 'class_subject_rate')}"
            for s in args.sparsity
        ]
        lines.append(
            f"| {name} | {e['detector_auc']:.3f} | {e['without']['image_alignment']:.3f} | "
            + " | ".join(cells)
            + f" | {e['without']['subject_rate']:.0%} / "
            f"{share(e['without'], 'class_subject_rate')} | {e['seed_similarity']:.3f} "
            f"| {e['search_seconds']:.0f} s |"
        )
    s = results["settings"]
    lines += [
        "",
        f"A2, {s['steps']} steps, lr {s['lr']}, batch {s['batch_size']}+{s['batch_size']}, "
        f"targets {s['targets']} K/V, prior weight λ {s.get('prior_weight', 1.0):g}; {len(seeds)} seeds per "
        f"prompt; grid: {args.name}.png "
        "(per subject: references, without, then with each sparsity, first prompt).",
    ]
    lines[-1] = lines[-1].replace(f"grid: {args.name}.png", f"grids: {args.name}-<subject>.png")
    save_results(args.name, results, "\n".join(lines))


if __name__ == "__main__":
    main()
