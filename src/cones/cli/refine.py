"""Refine concatenated concepts together (paper sec. 3.3): search the sum of the subjects' losses inside
the union of their neurons, and keep the neurons whose shutting helps all subjects at once.

Give the concepts (single-subject .cones files, or a merged one) and, in the same order, one picture
source per subject: `--images DIR` (3-5 photos; the identifier and class word come from the .cones file)
or `--world-subject NAME` (a subject of the embedded world, with its reference renders and prompts).
`--joint` also searches the same loss from scratch over all candidate weights, with as many neurons as
the union, and reports how much it shares with the concatenation (paper figure 4b).

  cones refine cat.cones pot.cones --images photos/cat --images photos/pot -o cat-pot.cones
  cones refine circle.cones sea.cones --world-subject striped-circle --world-subject sunset-sea \\
      -o circle-sea.cones --joint circle-sea-joint.cones --plot overlap.png
  cones generate --concept circle-sea.cones "a sks circle on a vlt sea background" --out out/
"""

from __future__ import annotations

import json
import os
from dataclasses import fields

from cones.cli import UsageError
from cones.cli._options import add_model_arguments

NAME = "refine"
HELP = "refine the union of several concepts with their joint loss (multi-subject generation)"


def _default(cls, name: str):
    return next(f for f in fields(cls) if f.name == name).default


def _help(cls, name: str, extra: str = "") -> str:
    field = next(f for f in fields(cls) if f.name == name)
    return f"{field.metadata['help']}{extra} (default: {field.default})"


def add_arguments(p) -> None:
    from cones.config import METHOD_NAMES, REFINE_STEPS, FindConfig

    add_model_arguments(p, config=False, dtype=False)
    p.add_argument("concepts", nargs="+", metavar="CONCEPT", help="the .cones files to refine together")
    p.add_argument(
        "--images",
        dest="sources",
        action="append",
        type=lambda v: ("images", v),
        default=[],
        metavar="DIR",
        help="a folder of pictures of the next subject, in the order of the concepts' subjects",
    )
    p.add_argument(
        "--world-subject",
        dest="sources",
        action="append",
        type=lambda v: ("world", v),
        metavar="NAME",
        help="the next subject is this subject of the embedded world (e.g. striped-circle, sunset-sea)",
    )
    p.add_argument(
        "-o", "--out", "--output", dest="output", required=True, help="the refined .cones file to write"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=REFINE_STEPS,
        help="K, gradient steps of the refinement (default: %(default)s)",
    )
    p.add_argument("--lr", type=float, default=_default(FindConfig, "lr"), help=_help(FindConfig, "lr"))
    p.add_argument(
        "--method",
        choices=sorted(METHOD_NAMES),
        default=_default(FindConfig, "method"),
        help=_help(FindConfig, "method"),
    )
    select = p.add_mutually_exclusive_group()
    select.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="τ: keep the union's neurons with joint score M_p > τ (default: 0, every neuron whose "
        "shutting lowers the joint loss)",
    )
    select.add_argument(
        "--keep",
        type=float,
        default=None,
        help="instead of τ: the share of the union's neurons to keep, e.g. 0.8",
    )
    for name in ("batch_size", "prior_weight", "num_class_images", "seed"):
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=type(_default(FindConfig, name)),
            default=_default(FindConfig, name),
            help=_help(FindConfig, name, ", per subject" if name == "batch_size" else ""),
        )
    p.add_argument("--cache-dir", default=None, help="cache generated class images here (default: no cache)")
    p.add_argument("--joint", default=None, metavar="PATH", help="also search from scratch and write it here")
    p.add_argument(
        "--joint-steps",
        type=int,
        default=_default(FindConfig, "steps"),
        help="steps of the --joint search (default: %(default)s)",
    )
    p.add_argument(
        "--plot", default=None, help="draw per-layer overlaps (concepts, refined, joint) into this PNG"
    )
    p.add_argument("--checkpoint", default=None, help="checkpoint file of the refinement, to resume it")
    p.add_argument(
        "--format", choices=("text", "json"), default="text", help="summary format (default: text)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace output files that exist")


def _subjects(parts: list[dict], sources: list[tuple[str, str]]) -> list:
    """Check one source per part and turn each into a `SubjectImages` (images not yet loaded: a loader)."""
    from cones.images import list_images

    if len(sources) != len(parts):
        tokens = ", ".join(f"{p['token']} ({p['class_word']})" for p in parts)
        raise UsageError(
            f"the concepts hold {len(parts)} subjects [{tokens}] but {len(sources)} `--images`/`--world-subject` "
            "were given; give one per subject, in the same order."
        )
    plans = []
    for i, (part, (kind, value)) in enumerate(zip(parts, sources, strict=True)):
        if not part.get("token") or not part.get("class_word"):
            raise UsageError(
                f"subject {i + 1} of the concepts has no identifier token or class word ({part}); refine "
                "concepts found with `--token` and `--class-word`."
            )
        if kind == "images":
            plans.append(("images", list_images(value), part))
            continue
        from cones.registry import default_model

        examples = default_model().subjects()
        if value not in examples:
            raise UsageError(
                f"`--world-subject` {value!r} is not a world subject; choose from {sorted(examples)}."
            )
        subject = examples[value]
        if subject.class_word != part["class_word"]:
            raise UsageError(
                f"`--world-subject` {value!r} is a {subject.class_word}, but subject {i + 1} of the concepts "
                f"({part['token']}) is a {part['class_word']}; give the sources in the order of the concepts."
            )
        plans.append(("world", subject, part))
    return plans


def _subject_data(pipe, plan):
    from cones.find import SubjectImages
    from cones.images import load_pictures, model_resolution

    kind, source, part = plan
    token, class_word = part["token"], part["class_word"]
    if kind == "images":
        return SubjectImages(load_pictures(source, model_resolution(pipe)), token, class_word)
    return source.subject_data(token)


def _mean_loss(losses: list[float], first: bool) -> float:
    """Mean loss over the first (or last) tenth of the steps: each step draws its own batch, so one is noisy."""
    n = max(1, len(losses) // 10)
    part = losses[:n] if first else losses[-n:]
    return sum(part) / len(part)


def run(args) -> int:
    from cones.find import FindConfig, multi_objective
    from cones.overlap import overlap
    from cones.pipeline import load_pipeline
    from cones.refine import concatenate, joint_search, parts_of, refine_concepts
    from cones.storage import load_concept_file, save_concept

    # 1. Check everything that can be checked before the model loads.
    outputs = [args.output] + [path for path in (args.joint, args.plot) if path]
    for path in outputs:
        if os.path.exists(path) and not args.overwrite:
            raise FileExistsError(f"`{path}` exists; pass --overwrite to replace it.")
    if args.keep is not None and not 0 < args.keep <= 1:
        raise UsageError(f"`--keep` must be a share in (0, 1], got {args.keep}; e.g. 0.8.")
    concepts = [load_concept_file(path) for path in args.concepts]
    try:
        union = concatenate(*concepts)
    except ValueError as e:
        raise UsageError(
            f"cannot refine {', '.join(map(os.path.basename, args.concepts))} together: {e}"
        ) from None
    parts = parts_of(union)
    if len(parts) < 2:
        raise UsageError(
            f"`CONCEPT` holds {len(parts)} subject; refinement needs two or more (several files, or a merged one)."
        )
    plans = _subjects(parts, args.sources)

    # 2. The model, the subjects' pictures and the multi-concept loss.
    pipe = load_pipeline(args.model, device=args.device)
    union.check_compatible(pipe.unet)
    config = FindConfig(
        steps=args.steps,
        lr=args.lr,
        method=args.method,
        batch_size=args.batch_size,
        prior_weight=args.prior_weight,
        num_class_images=args.num_class_images,
        seed=args.seed,
    )
    subjects = [_subject_data(pipe, plan) for plan in plans]
    objective = multi_objective(pipe, subjects, config, cache_dir=args.cache_dir)

    # 3. The refinement inside the union, and optionally the joint search from scratch.
    refined = refine_concepts(
        objective,
        pipe.unet,
        concepts,
        method=args.method,
        steps=args.steps,
        lr=args.lr,
        threshold=args.threshold,
        sparsity=args.keep,
        disable=args.quiet,
        checkpoint_path=args.checkpoint,
    )
    save_concept(refined.concept, args.output, overwrite=args.overwrite)
    joint = None
    if args.joint:
        joint = joint_search(
            objective,
            pipe.unet,
            concepts,
            method=args.method,
            steps=args.joint_steps,
            lr=args.lr,
            disable=args.quiet,
        )
        save_concept(joint.concept, args.joint, overwrite=args.overwrite)

    # 4. Overlaps, plot and summary.
    compared = {"refined": refined.concept} | ({"joint": joint.concept} if joint else {})
    reports = {name: overlap(union, concept) for name, concept in compared.items()}
    if args.plot:
        from cones.generate import save_atomic
        from cones.plots import bar_chart, layer_label

        series = {}
        if len(concepts) >= 2:  # two single concepts: how disentangled they are (paper figure 4a)
            pair = {layer.name: layer.jaccard for layer in overlap(concepts[0], concepts[1]).layers}
            first, second = (parts_of(c)[0]["token"] for c in concepts[:2])
            series[f"{first} & {second} / union"] = [
                pair.get(layer.name, 0.0) for layer in reports["refined"].layers
            ]
        for name, r in reports.items():  # figure 4b: how much of the concatenation each search keeps
            series[f"concatenation & {name} / concatenation"] = [
                layer.shared / layer.size_a if layer.size_a else 0.0 for layer in r.layers
            ]
        labels = [layer_label(layer.name) for layer in reports["refined"].layers]
        save_atomic(
            bar_chart(labels, series, title="Shared neurons per layer", maximum=1.0),
            args.plot,
            args.overwrite,
        )
    summary = {
        "output": args.output,
        "union_neurons": union.num_neurons,
        "refined_neurons": refined.concept.num_neurons,
        "parts": refined.concept.metadata["parts"],
        "loss_start": _mean_loss(refined.losses, first=True),
        "loss_end": _mean_loss(refined.losses, first=False),
        "refined_vs_concatenation": {k: v for k, v in reports["refined"].to_dict().items() if k != "layers"},
    }
    if joint:
        summary["joint"] = args.joint
        summary["joint_vs_concatenation"] = {
            k: v for k, v in reports["joint"].to_dict().items() if k != "layers"
        }
    if args.format == "json":
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"wrote {args.output}: kept {refined.concept.num_neurons:,} of the union's {union.num_neurons:,} neurons "
        f"(mean loss {summary['loss_start']:.4g} over the first tenth of the steps, {summary['loss_end']:.4g} over the last)"
    )
    for part in summary["parts"]:
        kept = "" if part["kept"] is None else f", kept {part['kept']:,}"
        print(f"  {part['token']} {part['class_word']}: {part['num_neurons']:,} neurons{kept}")
    if joint:
        r = reports["joint"]
        print(
            f"wrote {args.joint}: {r.size_b:,} neurons from scratch; it shares {r.shared:,} with the concatenation "
            f"({r.share_of_a:.2%} of it; {r.chance:,.0f} expected by chance)"
        )
    return 0
