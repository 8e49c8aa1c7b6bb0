"""Does the identifier's cross-attention map outline the subject after its concept neurons are shut? (fig. 2)

On the embedded world model, for several object subjects:

1. find the subject's concept (`cones.find.find_concept` on its 5 reference renders, identifier "sks";
   cached under runs/concepts/);
2. take held-out renders of the subject, whose object mask is known exactly from the scene
   (`cones_world.render.thing_mask`); a generated image has no mask, so the measurement runs on these renders:
   each is noised to `strength` of the schedule and denoised with the subject prompt ("a sks circle"),
   once with the base model ("before") and once with the concept shut ("after"), recording the
   cross-attention maps at 64 x 64 (`attention_maps_for_image`);
3. score the identifier's map and, for reference, the class word's against the mask: the share of the map's
   mass inside the mask (a flat map scores the mask's area share) and the IoU of the map's top pixels
   (as many as the mask has) with the mask (a random map scores about a/(2-a) for area share a).

Both kinds of map are scored: "text" (the share of all text positions, as recorded) and "prompt" (the share
among the prompt's own tokens, start/end markers and padding left out). Differences after - before are
paired per render; the table gives their mean and standard error.

    python benchmarks/bench_attention.py [--quick]

Writes benchmarks/results/attention.json, attention.md and two example figures (attention-*.png).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from results_io import RESULTS, save_results

from cones import GUIDANCE_SCALE
from cones.evaluate import text_pathway

ROOT = Path(__file__).resolve().parent.parent
CONCEPT_CACHE = ROOT / "runs" / "concepts"
CLASS_CACHE = ROOT / "runs" / "class-cache"
TOKEN = "sks"
SUBJECTS = ("striped-circle", "checkered-square", "smiling-star", "two-tone-heart", "dotted-triangle")


def world_concept(
    pipe, subject_name: str, token: str = TOKEN, steps: int = 150, seed: int = 0, sparsity: float = 0.01
):
    """The concept of a world subject found with `find_concept` (FindConfig defaults but `steps` and
    `sparsity`), cached."""
    from cones.find import FindConfig
    from cones.fingerprint import model_fingerprint
    from cones.neurons import ConceptNeurons
    from cones_world.concepts import find_subject_concept
    from cones_world.subjects import SUBJECTS as CATALOGUE

    subject = CATALOGUE[subject_name]
    config = FindConfig(steps=steps, seed=seed, sparsity=sparsity)
    key = hashlib.sha256(  # the config holds the class images' guidance, on which the concept depends
        json.dumps([model_fingerprint(pipe), subject_name, token, repr(config)]).encode()
    ).hexdigest()[:12]
    path = CONCEPT_CACHE / f"{subject_name}-{token}-{steps}-{key}.cones"  # key: model and whole config
    if path.exists():
        return ConceptNeurons.load(path)
    result = find_subject_concept(pipe, subject, config, token=token, cache_dir=str(CLASS_CACHE))
    CONCEPT_CACHE.mkdir(parents=True, exist_ok=True)
    result.concept.metadata["subject"] = subject_name
    result.concept.save(path, overwrite=True)
    return result.concept


def scores(maps, words: dict[str, str], mask: np.ndarray) -> dict[str, float]:
    """Share inside the mask, its lift (share / mask area; 1 for a flat map) and top-pixel IoU of each word's
    map, for both normalisations."""
    from cones.attention import attention_share, top_iou

    out = {}
    for role, word in words.items():
        for over in ("text", "prompt"):
            m = maps.token_map(word, over=over)
            out[f"{role}_{over}_share"] = attention_share(m, mask)
            out[f"{role}_{over}_lift"] = out[f"{role}_{over}_share"] / float(mask.mean())
            out[f"{role}_{over}_iou"] = top_iou(m, mask)
    return out


def position_lifts(maps, mask: np.ndarray) -> dict[str, float]:
    """Lift of the text positions' raw maps: each prompt word's, the end marker's and all padding's together.
    Where the words' lifts are all alike and the end marker's differs, the model reads the object from the
    end of the prompt, not from its words."""
    from cones.attention import attention_share

    area = float(mask.mean())
    n = len(maps.tokens)
    probs = maps.probabilities
    out = {f"word{i}:{w}": attention_share(probs[1 + i], mask) / area for i, w in enumerate(maps.tokens)}
    out["end"] = attention_share(probs[1 + n], mask) / area
    if probs.shape[0] > 2 + n:
        out["padding"] = attention_share(probs[2 + n :].sum(0), mask) / area
    return out


def mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="4 subjects x 6 renders, one strength")
    parser.add_argument(
        "--model", default=None, help="a Stable Diffusion folder (default: the embedded model)"
    )
    parser.add_argument("--name", default="attention", help="results file name")
    parser.add_argument("--search-steps", type=int, default=150, help="A2 steps of each concept search")
    parser.add_argument(
        "--sparsity", type=float, default=0.01, help="share of cross-attention K/V weights shut"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    subjects = SUBJECTS[:4] if args.quick else SUBJECTS
    renders = 6 if args.quick else 12
    strengths = (0.6,) if args.quick else (0.4, 0.6, 0.8)
    steps = 25

    from cones.attention import attention_figure, attention_maps, attention_maps_for_image
    from cones.pipeline import load_pipeline
    from cones_world.concepts import pictures
    from cones_world.render import thing_mask
    from cones_world.subjects import SUBJECTS as CATALOGUE

    started = time.perf_counter()
    pipe = load_pipeline(args.model)
    rows, per_render, layers = [], [], 0
    for name in subjects:
        subject = CATALOGUE[name]
        t0 = time.perf_counter()
        concept = world_concept(pipe, name, steps=args.search_steps, sparsity=args.sparsity)
        search_s = time.perf_counter() - t0
        prompt = subject.prompt(TOKEN)
        words = {"identifier": TOKEN, "class": subject.class_word}
        for strength in strengths:
            records = []
            for i, (scene, _) in enumerate(subject.held_out(renders)):
                image = pictures(subject, [scene])[0]
                mask = thing_mask(scene.things[0], 64)
                before = attention_maps_for_image(
                    pipe, prompt, image, strength=strength, seed=i, steps=steps, resolution=64
                )
                after = attention_maps_for_image(
                    pipe,
                    prompt,
                    image,
                    strength=strength,
                    seed=i,
                    steps=steps,
                    resolution=64,
                    concept=concept,
                )
                layers = len(before.layers)
                area = float(mask.mean())
                record = {
                    "subject": name,
                    "strength": strength,
                    "render": i,
                    "mask_area": area,
                    "chance_iou": area / (2 - area),
                    "before": scores(before, words, mask),
                    "after": scores(after, words, mask),
                    "positions_before": position_lifts(before, mask),
                    "positions_after": position_lifts(after, mask),
                }
                records.append(record)
                if i == 0 and strength == strengths[0] and name == subjects[0]:
                    RESULTS.mkdir(exist_ok=True)
                    attention_figure([before, after], ["before", "after"]).save(
                        RESULTS / f"{args.name}-render.png"
                    )
            per_render += records
            row = {"subject": name, "strength": strength, "renders": len(records), "search_s": search_s}
            row["mask_area"] = float(np.mean([r["mask_area"] for r in records]))
            row["chance_iou"] = float(np.mean([r["chance_iou"] for r in records]))
            for key in records[0]["before"]:
                row[f"before_{key}"] = float(np.mean([r["before"][key] for r in records]))
                row[f"after_{key}"] = float(np.mean([r["after"][key] for r in records]))
                row[f"diff_{key}"], row[f"diff_{key}_se"] = mean_se(
                    [r["after"][key] - r["before"][key] for r in records]
                )
            rows.append(row)
            print(
                f"{name} strength {strength}: identifier IoU (prompt) {row['before_identifier_prompt_iou']:.3f} -> "
                f"{row['after_identifier_prompt_iou']:.3f}, chance {row['chance_iou']:.3f}",
                flush=True,
            )

    # Where the model reads the prompt from: the lift of every text position, and the text encoder's states.
    positions = {}
    for when in ("before", "after"):
        keys = {}
        for r in per_render:
            for k, v in r[f"positions_{when}"].items():
                role = "words" if k.startswith("word") else k
                keys.setdefault(role, []).append(v)
        positions[when] = {k: float(np.mean(v)) for k, v in keys.items()}
    first = CATALOGUE[subjects[0]]
    conditioning = text_pathway(
        pipe,
        first.prompt(TOKEN),
        first.prompt(None),
        first.prompt(None).replace(first.class_word, f"red {first.class_word}"),
    )

    # An example on a generated image (no mask: for the eye only).
    concept = world_concept(pipe, subjects[0], steps=args.search_steps, sparsity=args.sparsity)
    prompt = first.prompt(TOKEN) + " on a sea background"
    generated = [attention_maps(pipe, prompt, seed=0, concept=c) for c in (None, concept)]
    attention_figure(generated, ["before", "after"]).save(RESULTS / f"{args.name}-generated.png")

    # Pooled over subjects, per strength.
    pooled = []
    for strength in strengths:
        records = [r for r in per_render if r["strength"] == strength]
        entry = {"strength": strength, "renders": len(records)}
        entry["chance_iou"] = float(np.mean([r["chance_iou"] for r in records]))
        entry["mask_area"] = float(np.mean([r["mask_area"] for r in records]))
        for key in records[0]["before"]:
            entry[f"before_{key}"] = float(np.mean([r["before"][key] for r in records]))
            entry[f"after_{key}"] = float(np.mean([r["after"][key] for r in records]))
            entry[f"diff_{key}"], entry[f"diff_{key}_se"] = mean_se(
                [r["after"][key] - r["before"][key] for r in records]
            )
        pooled.append(entry)

    import cones

    report = {
        "benchmark": "attention",
        "cones_version": cones.__version__,
        "quick": args.quick,
        "name": args.name,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1},
        "model": args.model or "embedded world model (64 px, 16x16 latents)",
        "setup": {
            "token": TOKEN,
            "search_steps": args.search_steps,
            "sparsity": args.sparsity,
            "renders_per_subject": renders,
            "strengths": list(strengths),
            "sampling_steps": steps,
            "guidance_scale": GUIDANCE_SCALE,
            "map_resolution": 64,
            "cross_attention_layers": layers,
            "measured_on": "held-out renders noised to `strength` and denoised (masks from the scene)",
        },
        "rows": rows,
        "pooled": pooled,
        "position_lifts": positions,
        "conditioning": conditioning,
        "per_render": per_render,
        "total_s": time.perf_counter() - started,
    }
    save_results(args.name, report, markdown(report))


def markdown(report: dict) -> str:
    def cell(row: dict, key: str, digits: int = 3) -> str:
        return (
            f"{row[f'before_{key}']:.{digits}f} → {row[f'after_{key}']:.{digits}f} "
            f"({row[f'diff_{key}']:+.{digits}f} ± {row[f'diff_{key}_se']:.{digits}f})"
        )

    setup = report["setup"]
    lines = [
        "# Attention maps before → after shutting the concept (embedded world model)",
        "",
        f"Measured on held-out renders of each subject ({setup['renders_per_subject']} per subject), noised to "
        f'`strength` and denoised with the prompt "a {setup["token"]} <class>" ({setup["sampling_steps"]} steps, '
        f"guidance {setup['guidance_scale']}); maps averaged over steps, heads and the "
        f"{setup['cross_attention_layers']} cross-attention layers at "
        f"{setup['map_resolution']}x{setup['map_resolution']}, scored against the object's mask from the scene. "
        f"Concepts: A2 search, {setup['search_steps']} steps, {setup.get('sparsity', 0.01):.0%} of the cross-attention "
        "K/V weights. "
        "Cells: before → after (paired difference ± standard error). "
        "IoU: of the map's top pixels (as many as the mask) with the mask. Lift: the map's mass inside the mask "
        "divided by the mask's area share (1: no more attention inside than a flat map). "
        '"prompt": the map renormalised over the prompt\'s own tokens; "text": over all text positions.',
        "",
        "| subject | strength | mask area | chance IoU | identifier IoU (prompt) | identifier lift (prompt) "
        "| identifier IoU (text) | identifier lift (text) | class-word IoU (prompt) | class-word lift (prompt) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"] + [{**p, "subject": "**all**"} for p in report["pooled"]]:
        lines.append(
            f"| {r['subject']} | {r['strength']} | {r['mask_area']:.3f} | {r['chance_iou']:.3f} "
            f"| {cell(r, 'identifier_prompt_iou')} | {cell(r, 'identifier_prompt_lift', 4)} "
            f"| {cell(r, 'identifier_text_iou')} | {cell(r, 'identifier_text_lift', 4)} "
            f"| {cell(r, 'class_prompt_iou')} | {cell(r, 'class_prompt_lift', 4)} |"
        )
    pos, cond = report["position_lifts"], report["conditioning"]
    lines += [
        "",
        "Where the model reads the prompt from (lift of each text position's raw map, all renders; a flat map "
        "scores 1): "
        + "; ".join(f"{k} {pos['before'][k]:.2f} → {pos['after'][k]:.2f}" for k in pos["before"])
        + f". Text encoder: mean cosine between the states of the prompt's words {cond['word_state_cosine']:.3f}; "
        f"the identifier moves the whole conditioning by {cond['identifier_moves']:.4f} (1 - cosine), "
        f"a colour word by {cond['word_moves']:.4f}.",
    ]
    lines += [
        "",
        f"Total time {report['total_s']:.0f} s (concept searches cached under runs/concepts/). "
        f"Figures: {report['name']}-render.png (first subject, first render), {report['name']}-generated.png (generated image).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
