"""Several subjects in one image on the embedded world model: concatenation, refinement, joint search,
disentanglement and sequential learning (paper sections 3.2-3.3, figures 4 and 7, table 1, appendix C.1).

Compositions of 2, 3 and 4 world subjects, each with its own identifier:

    2: striped-circle (sks) + sunset-sea (vlt)               "a sks circle on a vlt sea background"
    3: + banded-hat (xqz)                                    "a sks circle wearing a xqz hat on a vlt sea background"
    4: + checkered-square (pqm)                              "a sks circle wearing a xqz hat next to a pqm square ..."

For each composition and method, images for several prompts and seeds are scored as the paper does:
image alignment to each subject's references and its mean over subjects, text alignment to the prompt
without identifiers, and, what the paper cannot measure, the share of images in which each subject's
detector (`cones_world.concepts.subject_detector`, calibrated on single-subject renders) sees it, and in
which all subjects are seen at once. Methods:

    base           the base model, same prompts, no concept
    concatenation  the union of the single-subject concepts (tuning-free)
    refined        the union refined with the multi-concept loss (`cones.refine.refine_concepts`)
    joint          the multi-concept loss searched from scratch with the union's neuron budget
    renders        true renders of the composition by the world renderer (what a perfect model draws)

Disentanglement (figure 4): the share of neurons each pair of single concepts holds in common, against
chance, in total and per layer; the overlap between the concatenation and the joint search.

Sequential learning (appendix C.1): checkered-square is learned while striped-circle is shut; then
striped-circle's own prompts are scored with only its concept, with the union with the sequentially
learned square, and with the union with the independently learned square.

Single-subject concepts, refinements and joint searches are cached under runs/multi/ (keyed by the
settings and the model weights), class images under runs/class-cache/, so a rerun only generates and
scores.

    python benchmarks/bench_multi.py [--quick]

`--quick` took 7.8 min with one thread (another benchmark beside it) and nothing cached, 2.5 min cached.

Writes benchmarks/results/multi.json, multi.md and the grids multi-{2,3,4}.png, multi-overlap-*.png,
multi-sequential.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import sys
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from results_io import DETECTOR_CACHE, RESULTS, save_results

import cones
from cones.evaluate import ClipScorer, image_alignment, roc_auc, strip_identifiers, text_alignment
from cones.find import FindConfig, SubjectImages, find_concept, multi_objective, subject_objective
from cones.fingerprint import model_fingerprint
from cones.generate import generate
from cones.labels import labelled_grid
from cones.neurons import ConceptNeurons
from cones.overlap import overlap
from cones.patches import applied
from cones.pipeline import load_pipeline
from cones.plots import bar_chart, heatmap, layer_label
from cones.refine import concatenate, joint_search, refine_concepts, sequential_search
from cones.storage import load_concept_file, save_concept
from cones_world.concepts import (
    SubjectDetector,
    best_threshold,
    embed,
    references,
    subject_detector,
)
from cones_world.concepts import subject_data as world_subject_data
from cones_world.render import render
from cones_world.scene import RELATIONS, SIZES, Scene, place, radius_for
from cones_world.subjects import SUBJECTS

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "runs" / "multi"
CLASS_CACHE = ROOT / "runs" / "class-cache"

TOKENS = {"striped-circle": "sks", "banded-hat": "xqz", "checkered-square": "pqm", "sunset-sea": "vlt"}
COMPOSITIONS = {
    2: ("striped-circle", "sunset-sea"),
    3: ("striped-circle", "banded-hat", "sunset-sea"),
    4: ("striped-circle", "banded-hat", "checkered-square", "sunset-sea"),
}
PROMPTS = {
    2: (
        "a sks circle on a vlt sea background",
        "a big sks circle on a vlt sea background",
        "a small sks circle on a vlt sea background",
    ),
    3: (
        "a sks circle wearing a xqz hat on a vlt sea background",
        "a big sks circle wearing a xqz hat on a vlt sea background",
        "a small sks circle wearing a xqz hat on a vlt sea background",
    ),
    4: (
        "a sks circle wearing a xqz hat next to a pqm square on a vlt sea background",
        "a pqm square next to a sks circle wearing a xqz hat on a vlt sea background",
        "a sks circle wearing a xqz hat above a pqm square on a vlt sea background",
    ),
}
SEQUENTIAL = ("striped-circle", "checkered-square")  # learned first, learned second

SETTINGS = {
    # single: the search of each subject alone; multi: the refinement and joint searches (batch per subject)
    "quick": dict(
        joint_for=(2,),
        single_steps=100,
        refine_steps=40,
        joint_steps=100,
        batch=4,
        multi_batch=2,
        class_images=16,
        prompts=2,
        seeds=4,
        sequential_prompts=2,
    ),
    "full": dict(
        joint_for=(2, 3, 4),
        single_steps=300,
        refine_steps=100,
        joint_steps=300,
        batch=4,
        multi_batch=4,
        class_images=32,
        prompts=3,
        seeds=8,
        sequential_prompts=6,
    ),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fingerprint(*parts) -> str:
    """A cache key of `parts` (each key's parts include the FindConfig, and with it the class images' guidance)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cached(path: Path, make) -> tuple[ConceptNeurons, float]:
    """The concept stored at `path`, or `make()`'s, stored there; with the seconds it took to make (0: cached)."""
    if path.exists():
        return load_concept_file(path), 0.0
    start = time.perf_counter()
    concept = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_concept(concept, path)
    return concept, time.perf_counter() - start


def subject_data(name: str) -> SubjectImages:
    return world_subject_data(SUBJECTS[name], TOKENS[name])


def composition_renders(
    names: tuple[str, ...], n: int, seed: int = 0, swap: str | None = None
) -> list[Image.Image]:
    """True renders of a composition: the circle (wearing the hat), the square, on the sunset sea.

    With `swap`, that subject is replaced in every render by another member of its class (another circle,
    hat, square or sea), drawn from the subject's `class_negatives`: the negatives of a detector that must
    tell the subject apart inside the composition.
    """
    rng = random.Random(f"multi/{'+'.join(names)}/{seed}/{swap}")
    others = iter(SUBJECTS[swap].class_negatives(n, seed=1000 + seed)) if swap else None
    pictures = []
    for _ in range(n):
        other = next(others) if others else None
        background = SUBJECTS["sunset-sea"].sample(rng)[0].background
        if swap == "sunset-sea":
            background = other.background
        hat = SUBJECTS["banded-hat"].hat if "banded-hat" in names else None
        if swap == "banded-hat":
            hat = other.things[0].hat
        things = []
        for name in ("striped-circle", "checkered-square"):
            if name in names:
                thing = other.things[0] if name == swap else SUBJECTS[name].thing
                size = rng.choice(SIZES)
                thing = replace(thing, size=size, radius=radius_for(size, rng, False), hat=None)
                things.append(replace(thing, hat=hat) if name == "striped-circle" else thing)
        relation = rng.choice(RELATIONS) if len(things) == 2 else None
        pictures.append(Image.fromarray(render(Scene(background, place(things, relation, rng), relation))))
    return pictures


def composition_detector(
    scorer, detector: SubjectDetector, name: str, combo: tuple[str, ...], n: int = 100, vae=None
):
    """`detector` with its threshold re-fitted inside a composition: renders of the composition (positives)
    against renders with `name` swapped for another member of its class (negatives), passed through `vae`
    as the detector's own were; `auc` is measured there.
    """
    pos = detector.scores(embed(scorer, composition_renders(combo, n, seed=1), vae)).numpy()
    neg = detector.scores(embed(scorer, composition_renders(combo, n, seed=2, swap=name), vae)).numpy()
    return replace(detector, threshold=best_threshold(pos, neg), auc=roc_auc(pos, neg))


def score(scorer, rows, prompts, names, detectors) -> dict:
    """Paper metrics and detector rates of `rows[i][j]` (prompt i, seed j) for the subjects `names`."""
    flat = [im for row in rows for im in row]
    emb = scorer.images(flat)  # (images, d)
    tokens = [TOKENS[n] for n in TOKENS]
    texts = scorer.texts([strip_identifiers(p, tokens) for p in prompts])  # (prompts, d)
    per_prompt = emb.view(len(rows), len(rows[0]), -1)
    present = torch.stack([detectors[n].present(emb) for n in names])  # (subjects, images)
    subjects = {
        n: {
            "image_alignment": image_alignment(emb, detectors[n].references),
            "subject_rate": float(present[i].float().mean()),
        }
        for i, n in enumerate(names)
    }
    return {
        "image_alignment": float(np.mean([s["image_alignment"] for s in subjects.values()])),
        "text_alignment": float(np.mean([text_alignment(per_prompt[i], texts[i]) for i in range(len(rows))])),
        "subject_rate": float(np.mean([s["subject_rate"] for s in subjects.values()])),
        "all_present": float(present.all(0).float().mean()),
        "subjects": subjects,
        "images": len(flat),
    }


class MultiSearch:
    """The refinement and the joint search of one composition, sharing one multi-concept loss built on demand."""

    def __init__(self, pipe, subjects: list[SubjectImages], parts: list[ConceptNeurons], config: FindConfig):
        self.pipe, self.subjects, self.parts, self.config = pipe, subjects, parts, config
        self._objective = None

    @property
    def objective(self):
        if self._objective is None:
            self._objective = multi_objective(
                self.pipe, self.subjects, self.config, cache_dir=str(CLASS_CACHE)
            )
        return self._objective

    def refined(self, steps: int) -> ConceptNeurons:
        return refine_concepts(
            self.objective, self.pipe.unet, self.parts, steps=steps, lr=self.config.lr, disable=True
        ).concept

    def joint(self, steps: int) -> ConceptNeurons:
        return joint_search(
            self.objective, self.pipe.unet, self.parts, steps=steps, lr=self.config.lr, disable=True
        ).concept


def generate_with(pipe, concepts, prompts, seeds) -> list[list[Image.Image]]:
    with applied(pipe.unet, *concepts):
        return generate(pipe, prompts, seeds)


def overlap_summary(report) -> dict:
    return {k: v for k, v in report.to_dict().items() if k != "layers"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer steps, prompts and seeds (~10 min on 2 CPUs)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setting = "quick" if args.quick else "full"
    s = SETTINGS[setting]
    seeds = list(range(s["seeds"]))
    timings: dict[str, float] = {}
    started = time.perf_counter()

    # 1. The model, the evaluation CLIP and one detector per subject.
    pipe = load_pipeline()
    model_id = model_fingerprint(pipe)
    scorer = ClipScorer()
    names = sorted({n for c in COMPOSITIONS.values() for n in c}, key=list(TOKENS).index)
    detectors = {
        n: subject_detector(scorer, SUBJECTS[n], vae=pipe.vae, cache_dir=DETECTOR_CACHE) for n in names
    }
    subjects = {n: subject_data(n) for n in names}
    single_cfg = FindConfig(
        steps=s["single_steps"], batch_size=s["batch"], num_class_images=s["class_images"]
    )
    multi_cfg = replace(single_cfg, batch_size=s["multi_batch"])
    log(f"[{time.perf_counter() - started:.0f}s] model, CLIP and detectors ready")

    # 2. One concept per subject, found alone (cached).
    singles: dict[str, ConceptNeurons] = {}
    timings["single_searches_s"] = 0.0
    for n in names:
        key = fingerprint(model_id, n, TOKENS[n], asdict(single_cfg))
        data = subjects[n]

        def find(data=data):
            return find_concept(
                pipe,
                data.images,
                token=data.token,
                class_word=data.class_word,
                config=single_cfg,
                subject_prompts=data.subject_prompts,
                class_prompts=data.class_prompts,
                cache_dir=str(CLASS_CACHE),
                disable=True,
            ).concept

        singles[n], took = cached(CACHE / f"{n}-{TOKENS[n]}-{key}.cones", find)
        timings["single_searches_s"] += took
    log(f"[{time.perf_counter() - started:.0f}s] single-subject concepts ready")

    # 3. Each composition: concatenation, refinement, joint search; generate and score every method.
    rows, grids, searches, calibration = [], {}, {}, {}
    timings["refine_s"] = timings["joint_s"] = timings["generate_and_score_s"] = 0.0
    for k, combo in COMPOSITIONS.items():
        # 3a. The searches (cached).
        parts = [singles[n] for n in combo]
        union = concatenate(*parts)
        key = fingerprint(
            model_id, combo, [TOKENS[n] for n in combo], asdict(multi_cfg), [p.num_neurons for p in parts]
        )
        search = MultiSearch(pipe, [subjects[n] for n in combo], parts, multi_cfg)
        refined, took = cached(
            CACHE / f"refined-{k}-{s['refine_steps']}-{key}.cones", partial(search.refined, s["refine_steps"])
        )
        timings["refine_s"] += took
        concepts = {"base": [], "concatenation": [union], "refined": [refined]}
        searches[k] = {"union": union, "refined": refined}
        if k in s["joint_for"]:
            joint, took = cached(
                CACHE / f"joint-{k}-{s['joint_steps']}-{key}.cones", partial(search.joint, s["joint_steps"])
            )
            timings["joint_s"] += took
            concepts["joint"], searches[k]["joint"] = [joint], joint

        # 3b. Detectors re-calibrated inside this composition, then every method generated and scored.
        start = time.perf_counter()
        in_combo = {n: composition_detector(scorer, detectors[n], n, combo, vae=pipe.vae) for n in combo}
        calibration[k] = {n: {"auc": d.auc, "threshold": d.threshold} for n, d in in_combo.items()}
        prompts = list(PROMPTS[k][: s["prompts"]])
        images = {method: generate_with(pipe, shut_, prompts, seeds) for method, shut_ in concepts.items()}
        renders = composition_renders(combo, len(prompts) * len(seeds))
        images["renders"] = [renders[i * len(seeds) : (i + 1) * len(seeds)] for i in range(len(prompts))]
        for method, picture_rows in images.items():
            neurons = concepts[method][0].num_neurons if concepts.get(method) else 0
            rows.append(
                {
                    "n_subjects": k,
                    "composition": "+".join(combo),
                    "method": method,
                    "neurons": neurons,
                    "sparsity": neurons / union.total_weights,
                    **score(scorer, picture_rows, prompts, combo, in_combo),
                }
            )
        timings["generate_and_score_s"] += time.perf_counter() - start
        refs = [references(SUBJECTS[n])[1][0] for n in combo]
        methods = ["renders", *concepts]
        grids[k] = labelled_grid(
            [refs] + [images[m][0] for m in methods], ["references", *methods], title=prompts[0], scale=2
        )
        log(f"[{time.perf_counter() - started:.0f}s] {k} subjects done")

    # 4. Disentanglement (figure 4): pairs of single concepts; concatenation vs joint search vs refinement.
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pairs[f"{a}|{b}"] = overlap_summary(overlap(singles[a], singles[b]))
    two = searches[2]
    pair_report = overlap(singles["striped-circle"], singles["sunset-sea"])
    joint_report = overlap(two["union"], two["joint"])
    refined_reports = {k: overlap_summary(overlap(v["union"], v["refined"])) for k, v in searches.items()}
    joint_reports = {
        k: overlap_summary(overlap(v["union"], v["joint"])) for k, v in searches.items() if "joint" in v
    }
    labels = [layer_label(layer.name) for layer in pair_report.layers]
    layer_chart = bar_chart(
        labels,
        {
            "circle & sea / their union": [layer.jaccard for layer in pair_report.layers],
            "chance (pair)": [
                layer.chance / max(layer.size_a + layer.size_b - layer.chance, 1)
                for layer in pair_report.layers
            ],
            "concatenation & joint / concatenation": [
                layer.shared / layer.size_a if layer.size_a else 0.0 for layer in joint_report.layers
            ],
            "chance (joint)": [
                layer.chance / layer.size_a if layer.size_a else 0.0 for layer in joint_report.layers
            ],
        },
        title="Shared neurons per layer (circle + sea)",
        maximum=1.0,
    )
    short = [n.split("-")[1] for n in names]
    matrix = [
        [1.0 if a == b else pairs.get(f"{a}|{b}", pairs.get(f"{b}|{a}"))["jaccard"] for b in names]
        for a in names
    ]
    pair_chart = heatmap(
        matrix, short, short, title="Shared neurons: shared / union of the pair", maximum=0.25
    )

    # 5. Sequential learning (appendix C.1): the square learned while the circle is shut.
    first, second = SEQUENTIAL
    key = fingerprint(model_id, "sequential", first, second, asdict(single_cfg))

    def learn_second():
        objective = subject_objective(pipe, subjects[second], single_cfg, cache_dir=str(CLASS_CACHE))
        return sequential_search(
            objective,
            pipe.unet,
            singles[first],
            steps=single_cfg.steps,
            lr=single_cfg.lr,
            sparsity=single_cfg.sparsity,
            targets=single_cfg.targets,
            disable=True,
        ).concept

    sequential, took = cached(CACHE / f"sequential-{second}-after-{first}-{key}.cones", learn_second)
    timings["sequential_search_s"] = took
    start = time.perf_counter()
    conditions = {
        first: {
            "base": [],
            "alone": [singles[first]],
            "with independent second": [singles[first], singles[second]],
            "with sequential second": [singles[first], sequential],
        },
        second: {
            "base": [],
            "alone (independent)": [singles[second]],
            "with first (independent)": [singles[first], singles[second]],
            "with first (sequential)": [singles[first], sequential],
        },
    }
    sequential_rows, sequential_grid = [], []
    for subject, by_condition in conditions.items():
        prompts = SUBJECTS[subject].eval_prompts(TOKENS[subject])[: s["sequential_prompts"]]
        for condition, concepts in by_condition.items():
            picture_rows = generate_with(pipe, concepts, prompts, seeds)
            sequential_rows.append(
                {
                    "subject": subject,
                    "condition": condition,
                    **score(scorer, picture_rows, prompts, (subject,), detectors),
                }
            )
            sequential_grid.append((f"{subject.split('-')[1]}: {condition}", picture_rows[0]))
    timings["sequential_generate_and_score_s"] = time.perf_counter() - start
    retention = {}  # the share of the first concept's gain over the base model that the union keeps
    of_first = {r["condition"]: r for r in sequential_rows if r["subject"] == first}
    for union_key in ("with sequential second", "with independent second"):
        retention[union_key] = {}
        for metric in ("image_alignment", "subject_rate"):
            gain = of_first["alone"][metric] - of_first["base"][metric]
            kept = of_first[union_key][metric] - of_first["base"][metric]
            retention[union_key][metric] = kept / gain if gain > 0 else None
    seq_overlap = overlap_summary(overlap(singles[second], sequential))

    # 6. Write the results.
    timings["total_s"] = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    for k, picture in grids.items():
        picture.save(RESULTS / f"multi-{k}.png")
    layer_chart.save(RESULTS / "multi-overlap-layers.png")
    pair_chart.save(RESULTS / "multi-overlap-pairs.png")
    labelled_grid(
        [r for _, r in sequential_grid],
        [lab for lab, _ in sequential_grid],
        title="sequential learning",
        scale=2,
    ).save(RESULTS / "multi-sequential.png")
    report = {
        "benchmark": "multi",
        "cones_version": cones.__version__,
        "setting": setting,
        "settings": s,
        "seeds": seeds,
        "prompts": {k: list(v[: s["prompts"]]) for k, v in PROMPTS.items()},
        "tokens": TOKENS,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "device": "cpu",
        },
        "model": {"path": "embedded world model", "unet_sha256_12": model_id},
        "detectors": {n: {"auc": d.auc, "threshold": d.threshold} for n, d in detectors.items()},
        "detectors_in_compositions": calibration,
        "singles": {
            n: {"token": TOKENS[n], "neurons": c.num_neurons, "sparsity": c.sparsity}
            for n, c in singles.items()
        },
        "rows": rows,
        "disentanglement": {
            "pairs": pairs,
            "concatenation_vs_joint": joint_reports,
            "concatenation_vs_refined": refined_reports,
            "circle_sea_layers": pair_report.to_dict()["layers"],
        },
        "sequential": {
            "first": first,
            "second": second,
            "rows": sequential_rows,
            "retention_of_first": retention,
            "independent_vs_sequential_second": seq_overlap,
        },
        "timings": timings,
    }
    save_results("multi", report, markdown(report))


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [
        "# Several subjects at once on the embedded world model",
        "",
        f"Setting `{r['setting']}`: single-subject searches {s['single_steps']} A2 steps (batch {s['batch']}+{s['batch']}); "
        f"refinement {s['refine_steps']} steps, joint search {s['joint_steps']} steps (batch {s['multi_batch']}+{s['multi_batch']} "
        f"per subject); {s['prompts']} prompts x {len(r['seeds'])} seeds per composition and method; CPU, "
        f"{r['machine']['threads']} thread(s). Image alignment: CLIP cosine to each subject's references, mean over "
        "subjects (paper table 1). Text alignment: to the prompt without identifiers. Detector rate: share of images "
        "in which the subject's detector sees it, with its threshold fitted inside the composition (renders of the "
        "composition against renders with that subject swapped for another of its class; ROC AUC below); all "
        "present: every subject seen in the same image. `renders` are true renders of the composition by the world "
        "renderer: what a perfect model would draw.",
        "",
        "Detector AUC inside each composition (1.0: perfect, 0.5: chance): "
        + "; ".join(
            f"{k} subjects: " + ", ".join(f"{n.split('-')[1]} {v['auc']:.2f}" for n, v in cal.items())
            for k, cal in r["detectors_in_compositions"].items()
        )
        + ".",
        "",
        "| subjects | method | neurons | image align. (mean) | image align. per subject | text align. | detector rate per subject | all present |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        per_ia = ", ".join(
            f"{n.split('-')[1]} {v['image_alignment']:.3f}" for n, v in row["subjects"].items()
        )
        per_rate = ", ".join(
            f"{n.split('-')[1]} {pct(v['subject_rate'])}" for n, v in row["subjects"].items()
        )
        neurons = f"{row['neurons']:,} ({pct(row['sparsity'])})" if row["neurons"] else "–"
        lines.append(
            f"| {row['n_subjects']} | {row['method']} | {neurons} | {row['image_alignment']:.3f} | {per_ia} "
            f"| {row['text_alignment']:.3f} | {per_rate} | {pct(row['all_present'])} |"
        )
    d = r["disentanglement"]
    lines += [
        "",
        "## Disentanglement (figure 4)",
        "",
        "Shared neurons of two single-subject concepts, as a share of all their neurons (|A ∩ B| / |A ∪ B|; paper: "
        "2.42%), and what random sets with the same per-layer sizes would share.",
        "",
        "| pair | A | B | shared | share of union | chance (shared) |",
        "|---|---|---|---|---|---|",
    ]
    for pair, o in d["pairs"].items():
        a, b = pair.split("|")
        lines.append(
            f"| {a} & {b} | {o['size_a']:,} | {o['size_b']:,} | {o['shared']:,} | {pct(o['jaccard'])} | {o['chance']:,.0f} |"
        )
    lines += [
        "",
        "Concatenation against the joint search from scratch (same neuron budget; paper: they share 53.27%) and "
        "against the refinement (a subset of the concatenation):",
        "",
        "| subjects | concatenation | joint | shared (share of concatenation) | chance | refined | refined / concatenation |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, j in d["concatenation_vs_joint"].items():
        ref = d["concatenation_vs_refined"][k]
        lines.append(
            f"| {k} | {j['size_a']:,} | {j['size_b']:,} | {j['shared']:,} ({pct(j['share_of_a'])}) | {j['chance']:,.0f} "
            f"| {ref['size_b']:,} | {pct(ref['share_of_a'])} |"
        )
    q = r["sequential"]
    lines += [
        "",
        f"## Sequential learning (appendix C.1): {q['second']} learned while {q['first']} is shut",
        "",
        "| subject | concepts shut | image align. | text align. | detector rate |",
        "|---|---|---|---|---|",
    ]
    for row in q["rows"]:
        lines.append(
            f"| {row['subject']} | {row['condition']} | {row['image_alignment']:.3f} | {row['text_alignment']:.3f} "
            f"| {pct(row['subject_rate'])} |"
        )
    lines.append("")
    for condition, kept in q["retention_of_first"].items():
        ia, rate = (
            "– (no gain over the base model)" if kept[m] is None else f"{kept[m]:.2f}"
            for m in ("image_alignment", "subject_rate")
        )
        lines.append(
            f"- {q['first']} {condition}: share of its own gain over the base model kept: image alignment {ia}, "
            f"detector rate {rate}"
        )
    o = q["independent_vs_sequential_second"]
    lines.append(
        f"- the sequentially learned {q['second']} shares {o['shared']:,} of its {o['size_b']:,} neurons with the "
        f"independently learned one ({pct(o['share_of_b'])}; chance {o['chance']:,.0f})"
    )
    t = r["timings"]
    lines += [
        "",
        "Wall time: "
        + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in t.items())
        + " (0: cached).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
