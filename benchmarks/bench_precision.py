"""Float32, float16, quaternary and binary concept neurons side by side (paper figure 3).

On the embedded world model, for 2-3 object subjects: the subject's concept (found as in
bench_attention.py, cached under runs/concepts/) is used

- binary: shut, no tuning (Cones);
- quaternary / float16 / float32: its neurons' values tuned with the concept-implanting loss (every other
  weight frozen), starting from the shut state, by `cones.precision.tune_values` (Adam on ξ, θ = ξ·θ0;
  quaternary: ξ on the levels {0, 1/3, 2/3, 1}, straight-through estimator);

and the base model without a concept is measured for reference. For each variant: CLIP image alignment to the
references, text alignment to the prompts without the identifier, the share of images in which the world's
subject detector sees the subject (all from `cones_world.concepts.score_subject`, 6 prompts x the seeds),
the concept-implanting loss on held-out draws (same draws for every variant), and the storage: the `.cones`
file (indices, rice-coded) plus the `.cones-values` file (values), in bytes on disk.

    python benchmarks/bench_precision.py [--quick]

Writes benchmarks/results/precision.json and precision.md; the values files go to runs/precision/.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import time

import torch
from bench_attention import CLASS_CACHE, ROOT, TOKEN, world_concept
from results_io import DETECTOR_CACHE, save_results

OUT = ROOT / "runs" / "precision"
VARIANTS = ("base", "binary", "quaternary", "float16", "float32")


def concept_objective(pipe, subject, seed: int = 0):
    """The concept-implanting loss of `subject` as `find_concept` builds it (same class images, cached)."""
    from cones.find import FindConfig, class_images
    from cones.images import to_tensor
    from cones.objective import ConceptObjective, ObjectiveConfig
    from cones_world.concepts import references

    cfg = FindConfig(seed=seed)
    images, _, _ = references(subject)
    subject_prompts, class_prompts = subject.reference_prompts(TOKEN), subject.prior_prompts()
    pictures, prompts = [], []
    for i, prompt in enumerate(class_prompts):
        n = max(1, cfg.num_class_images // len(class_prompts))
        made = class_images(pipe, prompt, n, seed=cfg.seed * 1000 + i, cache_dir=str(CLASS_CACHE))
        pictures += made
        prompts += [prompt] * len(made)
    return ConceptObjective.from_pipeline(
        pipe,
        images,
        token=TOKEN,
        class_word=subject.class_word,
        class_images=to_tensor(pictures),
        config=ObjectiveConfig(
            subject_templates=cfg.templates,
            class_templates=("a {class_word}",),
            batch_size=cfg.batch_size,
            prior_weight=cfg.prior_weight,
            seed=cfg.seed,
        ),
        subject_prompts=subject_prompts,
        class_prompts=prompts,
    )


@torch.no_grad()
def held_out_loss(objective, draws: int) -> float:
    """Mean L_con over `draws` batches that no tuning step used (steps 1,000,000 and up)."""
    return sum(objective.loss(1_000_000 + k).item() for k in range(draws)) / draws


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 subjects, 40 tuning steps, 2 seeds")
    parser.add_argument("--search-steps", type=int, default=150, help="A2 steps of each concept search")
    parser.add_argument("--lr", type=float, default=0.02, help="Adam's rate on ξ while tuning")
    args = parser.parse_args()
    torch.set_num_threads(1)
    subjects = (
        ("striped-circle", "smiling-star")
        if args.quick
        else ("striped-circle", "smiling-star", "checkered-square")
    )
    tune_steps = 40 if args.quick else 200
    seeds = list(range(2 if args.quick else 8))
    detector_n = 100 if args.quick else 200
    draws = 16 if args.quick else 64

    from cones.evaluate import ClipScorer
    from cones.pipeline import load_pipeline
    from cones.precision import TunedConcept, tune_values
    from cones_world.concepts import score_subject, subject_detector
    from cones_world.subjects import SUBJECTS

    started = time.perf_counter()
    pipe = load_pipeline()
    scorer = ClipScorer()
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in subjects:
        subject = SUBJECTS[name]
        concept = world_concept(pipe, name, steps=args.search_steps)
        cones_path = OUT / f"{name}.cones"
        concept.save(cones_path, overwrite=True)
        cones_bytes = cones_path.stat().st_size
        objective = concept_objective(pipe, subject)
        detector = subject_detector(scorer, subject, n=detector_n, vae=pipe.vae, cache_dir=DETECTOR_CACHE)
        for variant in VARIANTS:
            row = {
                "subject": name,
                "variant": variant,
                "neurons": concept.num_neurons,
                "detector_auc": detector.auc,
            }
            t0 = time.perf_counter()
            if variant == "base":
                tuned, losses = None, []
            elif variant == "binary":
                tuned, losses = TunedConcept(concept, "binary"), []
            else:
                result = tune_values(
                    objective,
                    pipe.unet,
                    concept,
                    precision=variant,
                    steps=tune_steps,
                    lr=args.lr,
                    disable=True,
                )
                tuned, losses = result.tuned, result.losses
            row["tune_s"] = time.perf_counter() - t0
            row["tune_loss_first10"] = sum(losses[:10]) / 10 if losses else None
            row["tune_loss_last10"] = sum(losses[-10:]) / 10 if losses else None
            if tuned is None:
                row["file_bytes"] = row["values_bytes"] = row["values_file_bytes"] = 0
                row["cones_bytes"] = 0
            else:
                row["cones_bytes"] = cones_bytes
                row["values_bytes"] = tuned.values_bytes
                row["values_file_bytes"] = 0
                if variant != "binary":
                    values_path = OUT / f"{name}.{variant}.cones-values"
                    tuned.save(values_path, overwrite=True)
                    row["values_file_bytes"] = values_path.stat().st_size
                row["file_bytes"] = cones_bytes + row["values_file_bytes"]
            t0 = time.perf_counter()
            if tuned is None:
                row["held_out_loss"] = held_out_loss(objective, draws)
                scored = score_subject(pipe, scorer, subject, detector, TOKEN, seeds=seeds)
            else:
                with tuned.applied(pipe.unet):
                    row["held_out_loss"] = held_out_loss(objective, draws)
                    scored = score_subject(pipe, scorer, subject, detector, TOKEN, seeds=seeds)
            row["eval_s"] = time.perf_counter() - t0
            row.update({k: scored[k] for k in ("image_alignment", "text_alignment", "subject_rate")})
            rows.append(row)
            print(
                f"{name} {variant}: image {row['image_alignment']:.3f} text {row['text_alignment']:.3f} "
                f"detected {row['subject_rate']:.2f} L {row['held_out_loss']:.4f} bytes {row['file_bytes']} "
                f"(tune {row['tune_s']:.0f} s, eval {row['eval_s']:.0f} s)",
                flush=True,
            )
            if variant == "float32" and name == subjects[0]:
                shutil.copyfile(values_path, OUT / "example.cones-values")

    import cones

    report = {
        "benchmark": "precision",
        "cones_version": cones.__version__,
        "quick": args.quick,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1},
        "model": "embedded world model (64 px, 16x16 latents)",
        "setup": {
            "token": TOKEN,
            "search_steps": args.search_steps,
            "tune_steps": tune_steps,
            "tune_lr": args.lr,
            "tune_init": "shut",
            "quaternary": "levels {0, 1/3, 2/3, 1} x original weight, 2-bit codes, straight-through estimator",
            "eval_seeds": seeds,
            "eval_images_per_variant": 6 * len(seeds),
            "held_out_draws": draws,
            "detector_renders": detector_n,
        },
        "rows": rows,
        "total_s": time.perf_counter() - started,
    }
    save_results("precision", report, markdown(report))


def markdown(report: dict) -> str:
    setup = report["setup"]
    lines = [
        "# Concept neurons at float32 / float16 / quaternary / binary precision (embedded world model)",
        "",
        f"Concepts: A2 search, {setup['search_steps']} steps, 1% of the cross-attention K/V weights, identifier "
        f'"{setup["token"]}". Tuning: {setup["tune_steps"]} Adam steps (rate {setup["tune_lr"]} on ξ, θ = ξ·θ0) '
        f"from the shut state; quaternary: {setup['quaternary']}. Evaluation: {setup['eval_images_per_variant']} "
        f"images per variant (6 prompts x {len(setup['eval_seeds'])} seeds); held-out L_con: mean over "
        f"{setup['held_out_draws']} draws the tuning never saw, the same for every variant. Bytes: the .cones "
        "file plus the .cones-values file on disk (values: the raw payload alone).",
        "",
        "| subject | variant | image align. | text align. | detected | held-out L_con | bytes on disk "
        "| values payload | tune s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['subject']} | {r['variant']} | {r['image_alignment']:.3f} | {r['text_alignment']:.3f} "
            f"| {r['subject_rate']:.2f} | {r['held_out_loss']:.4f} | {r['file_bytes']:,} | {r['values_bytes']:,} "
            f"| {r['tune_s']:.0f} |"
        )
    variants = list(dict.fromkeys(r["variant"] for r in report["rows"]))
    lines += [
        "",
        "Mean over subjects:",
        "",
        "| variant | image align. | text align. | detected | held-out L_con | bytes on disk |",
        "|---|---|---|---|---|---|",
    ]
    for v in variants:
        rs = [r for r in report["rows"] if r["variant"] == v]
        n = len(rs)
        lines.append(
            f"| {v} | {sum(r['image_alignment'] for r in rs) / n:.3f} | {sum(r['text_alignment'] for r in rs) / n:.3f} "
            f"| {sum(r['subject_rate'] for r in rs) / n:.2f} | {sum(r['held_out_loss'] for r in rs) / n:.4f} "
            f"| {sum(r['file_bytes'] for r in rs) / n:,.0f} |"
        )
    lines += ["", f"Total time {report['total_s']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
