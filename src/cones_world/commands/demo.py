"""The main job end to end on the embedded world model, in minutes on a CPU.

Takes one of the world's subjects (a particular thing the model can draw but no prompt can ask for), finds
its concept neurons from its 5 reference images, generates its prompts with and without the neurons shut,
scores both with the world's CLIP, and writes a report: an image grid, the numbers, and the .cones file.

  cones demo                                   # the default subject, report in ./cones-demo
  cones demo --subject sunset-sea --out demo/
"""

from __future__ import annotations

import os
import time

NAME = "demo"
HELP = "find a world subject's concept neurons, generate with and without them, score and report"


def add_arguments(p) -> None:
    from cones_world.subjects import SUBJECTS

    # The default is the subject whose neurons the embedded model answers most clearly in
    # benchmarks/bench_concepts.py (all nine subjects are there); the sea at sunset, the default before, is
    # drawn by the base model in a third of its images anyway, which leaves the demo little to show.
    p.add_argument(
        "--subject",
        default="smiling-star",
        choices=sorted(SUBJECTS),
        help="world subject (default: %(default)s)",
    )
    p.add_argument("-o", "--out", default="cones-demo", help="report folder (default: %(default)s)")
    p.add_argument("--token", default="sks", help="identifier token (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="search steps (default: FindConfig's)")
    # Denser than FindConfig's 1% (the paper's SD 1.4 figure): on the embedded model the smiling star is
    # detected in 42-75% of images with 5% of cross-attention K/V shut and in 17-25% with 1% (this demo;
    # benchmarks/results/concepts.md, docs/world.md).
    p.add_argument(
        "--sparsity", type=float, default=0.05, help="share of K/V weights to shut (default: %(default)s)"
    )
    p.add_argument("--seeds", type=int, default=4, help="images per prompt (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")


def run(args) -> int:
    import dataclasses

    import cones_world
    from cones import files
    from cones.cli import UsageError
    from cones.evaluate import ClipScorer
    from cones.find import FindConfig
    from cones.generate import grid, save_atomic
    from cones.pipeline import load_pipeline
    from cones_world.concepts import find_subject_concept, references, score_subject, subject_detector
    from cones_world.subjects import SUBJECTS

    report_path = os.path.join(args.out, "report.json")
    if os.path.exists(report_path) and not args.overwrite:
        raise UsageError(f"{args.out} already holds a report; pass --overwrite or another --out.")
    os.makedirs(args.out, exist_ok=True)
    subject = SUBJECTS[args.subject]
    config = FindConfig()
    config = dataclasses.replace(
        config,
        steps=args.steps or config.steps,
        sparsity=args.sparsity or config.sparsity,
    )
    started = time.time()

    # 1. The base model, the evaluation CLIP, and the subject's detector calibrated on held-out renders as the
    #    model's VAE returns them (every generated image comes out of that decoder).
    print(f"[1/4] loading the embedded model and CLIP; subject: {subject.name} ({subject.description})")
    pipe = load_pipeline()
    scorer = ClipScorer()
    detector = subject_detector(scorer, subject, vae=pipe.vae, cache_dir=os.path.join(args.out, "detectors"))

    # 2. The search, from the 5 reference images.
    print(
        f"[2/4] searching concept neurons ({config.steps} steps, {100 * config.sparsity:.1f}% of cross-attention K/V)"
    )
    _, pictures, _ = references(subject)
    t = time.time()
    result = find_subject_concept(
        pipe,
        subject,
        config,
        token=args.token,
        cache_dir=os.path.join(args.out, "class-images"),
        disable=False,
    )
    search_seconds = time.time() - t
    concept = result.concept
    concept.metadata.update({"base_model": cones_world.NAME, "world_subject": subject.name})
    concept_path = os.path.join(args.out, f"{subject.name}.cones")
    concept.save(concept_path, overwrite=True)

    # 3. The same prompts and seeds, without and with the neurons shut.
    print("[3/4] generating the subject's prompts without and with the concept neurons shut")
    seeds = list(range(args.seeds))
    before = score_subject(pipe, scorer, subject, detector, args.token, seeds)
    with concept.shut(pipe.unet):
        after = score_subject(pipe, scorer, subject, detector, args.token, seeds)

    # 4. The report.
    print("[4/4] writing the report")
    rows, labels = [pictures], [f"references ({len(pictures)})\n{subject.description}"]
    for prompt, b, a in zip(before["prompts"], before["images"], after["images"], strict=True):
        rows += [b, a]
        labels += [f'"{prompt}"\nwithout concept', f'"{prompt}"\nwith concept (neurons shut)']
    title = (
        f"{subject.name}: {concept.num_neurons} neurons shut ({100 * concept.sparsity:.1f}% of "
        f"cross-attention K/V), {config.steps}-step search"
    )
    grid_path = os.path.join(args.out, "grid.png")
    save_atomic(
        grid(
            rows,
            scale=2,
            row_labels=labels,
            column_labels=[f"seed {s}" for s in seeds],
            header_row=1,
            title=title,
        ),
        grid_path,
        overwrite=True,
    )
    numbers = {
        "subject": subject.name,
        "description": subject.description,
        "prompts": before["prompts"],
        "seeds": seeds,
        "search": {**concept.metadata.get("search", {}), "seconds": round(search_seconds, 1)},
        "neurons": concept.num_neurons,
        "sparsity": concept.sparsity,
        "file_bytes": os.path.getsize(concept_path),
        "detector_auc": detector.auc,
        "without": {k: before[k] for k in ("image_alignment", "text_alignment", "subject_rate")},
        "with": {k: after[k] for k in ("image_alignment", "text_alignment", "subject_rate")},
        "seconds": round(time.time() - started, 1),
    }
    files.write_json(report_path, numbers, overwrite=True)
    w, a = numbers["without"], numbers["with"]
    print(
        f"\n{subject.name}: {concept.num_neurons} neurons ({100 * concept.sparsity:.2f}%), "
        f"{numbers['file_bytes'] / 1024:.1f} KiB, search {search_seconds:.0f} s"
    )
    print(f"{'':22}{'without':>10}{'with':>10}")
    print(f"{'image alignment':22}{w['image_alignment']:>10.3f}{a['image_alignment']:>10.3f}")
    print(f"{'text alignment':22}{w['text_alignment']:>10.3f}{a['text_alignment']:>10.3f}")
    print(f"{'subject detected':22}{w['subject_rate']:>10.0%}{a['subject_rate']:>10.0%}")
    print(f"\npicture: {grid_path}")
    print(
        f"  the top row holds the {len(pictures)} reference images of {subject.name} ({subject.description});"
    )
    print("  below, each prompt twice with the same seeds (one column per seed): first without the concept,")
    print('  then with its neurons shut. Look for the subject\'s pattern and colours in the "with" rows')
    print(f"  (detected in {a['subject_rate']:.0%} of them, {w['subject_rate']:.0%} without).")
    print(f"numbers: {report_path}; concept: {concept_path}")
    return 0
