"""Subject rate against guidance scale and sparsity: where do shut concept neurons show the subject?

Classifier-free guidance pushes a sample towards what its caption names. The world's captions never name the
subjects' patterns, faces or second tones, so guidance also pushes away from them (the model draws patterns
in 10% of its images at guidance 7.5, 16% at 3; `bench_ingredients.py`). This benchmark asks how that
interacts with concept neurons: for every subject, search once (A2) and generate its identifier prompts
at each guidance scale, unshut and with the neurons shut at each sparsity, same seeds throughout.

Per cell: the detector's subject rate (probe fitted on renders through the VAE), image alignment to the
references, and text alignment to the prompt without the identifier (does the image still follow it?).

    python benchmarks/bench_guidance.py --subjects striped-circle striped-diamond   # two subjects
    python benchmarks/bench_guidance.py                                             # all nine (about 50 min)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext

import torch
from results_io import DETECTOR_CACHE, RESULTS, resumed, save_results, write_atomic

from cones.evaluate import ClipScorer
from cones.find import FindConfig
from cones.fingerprint import model_fingerprint
from cones.generate import grid
from cones.pipeline import load_pipeline
from cones_world.concepts import find_subject_concept, references, score_subject, subject_detector
from cones_world.subjects import SUBJECTS

METRICS = ("subject_rate", "image_alignment", "text_alignment")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subjects", nargs="+", default=list(SUBJECTS), choices=list(SUBJECTS))
    parser.add_argument("--guidance", type=float, nargs="+", default=[3.0, 5.0, 7.5])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--steps", type=int, default=300, help="A2 search steps")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument(
        "--model", default=None, help="a Stable Diffusion folder (default: the embedded model)"
    )
    parser.add_argument("--name", default="guidance", help="results file name")
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    torch.manual_seed(0)
    pipe, scorer = load_pipeline(args.model), ClipScorer()
    settings = {
        "steps": args.steps,
        "seeds": seeds,
        "sparsities": args.sparsity,
        "guidance": args.guidance,
        "lr": FindConfig.lr,
        "batch_size": FindConfig.batch_size,
        "targets": FindConfig.targets,
        "model": model_fingerprint(pipe),
        "detector": "linear probe on decoded renders",
    }
    path = os.path.join(RESULTS, f"{args.name}.json")
    results = resumed(args.name, settings)  # subjects measured with the same settings are kept
    for name in args.subjects:
        if name in results["subjects"]:
            continue
        subject = SUBJECTS[name]
        detector = subject_detector(scorer, subject, vae=pipe.vae, cache_dir=DETECTOR_CACHE)
        _, pictures, _ = references(subject)
        started = time.time()
        result = find_subject_concept(
            pipe,
            subject,
            FindConfig(steps=args.steps, sparsity=max(args.sparsity)),
            cache_dir=os.path.join("runs", "class-cache"),
        )
        entry = {"detector_auc": detector.auc, "search_seconds": time.time() - started, "cells": {}}
        rows, labels = [pictures], ["references"]
        for guidance in args.guidance:
            for sparsity in [0.0, *args.sparsity]:
                with result.select(sparsity=sparsity).shut(pipe.unet) if sparsity else nullcontext():
                    scored = score_subject(
                        pipe, scorer, subject, detector, "sks", seeds, guidance_scale=guidance
                    )
                entry["cells"][f"{guidance:g}/{sparsity:g}"] = {k: scored[k] for k in METRICS}
                rows.append(scored["images"][0])
                labels.append(f'"{scored["prompts"][0]}"\nguidance {guidance:g}, {100 * sparsity:g}% shut')
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
            title=f"{name}: subject by guidance and sparsity",
        ).save(os.path.join(RESULTS, f"{args.name}-{name}.png"))

    columns = [f"{g:g}" for g in results["settings"]["guidance"]]
    sparsities = [0.0, *results["settings"]["sparsities"]]
    lines = []
    for metric, title, number in (
        (
            "subject_rate",
            "Subject detected (share of identifier-prompt images), unshut / shut at "
            + " / ".join(f"{100 * s:g}%" for s in sparsities[1:])
            + ", at each guidance scale:",
            "{:.0%}",
        ),
        ("text_alignment", "Text alignment to the prompt without the identifier, same cells:", "{:.3f}"),
    ):
        lines += ([""] if lines else []) + [
            title,
            "",
            "| subject | " + " | ".join(f"guidance {c}" for c in columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for name, e in results["subjects"].items():
            cells = [
                " / ".join(number.format(e["cells"][f"{c}/{s:g}"][metric]) for s in sparsities)
                for c in columns
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    s = results["settings"]
    lines += [
        "",
        f"A2, {s['steps']} steps, lr {s['lr']}, batch {s['batch_size']}+{s['batch_size']}, "
        f"{s['targets']} K/V; one search per subject, thresholded at each sparsity; {len(s['seeds'])} seeds "
        f"per prompt. Grids: {args.name}-<subject>.png (references, then per guidance: unshut and each "
        "sparsity, first prompt).",
    ]
    save_results(args.name, results, "\n".join(lines))


if __name__ == "__main__":
    main()
