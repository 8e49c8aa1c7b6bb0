"""Concatenate concepts into one file, tuning-free (paper sec. 3.2): the union of their neurons.

Each concept keeps its own identifier; the merged file lists them in its metadata ("parts"), and prompts
name them all: "a sks circle wearing a xqz hat on a vlt sea background". Concepts made for different base
models (parameters of different shapes) are refused.

  cones merge circle.cones hat.cones sea.cones -o scene.cones
  cones merge circle.cones sea.cones -o pair.cones --plot overlap.png --format json
  cones generate --concept scene.cones "a sks circle wearing a xqz hat on a vlt sea background" --out out/
"""

from __future__ import annotations

import json
import os
import sys

from cones.cli import UsageError

NAME = "merge"
HELP = "concatenate .cones files into one (the union of their neurons; each keeps its identifier)"


def add_arguments(p) -> None:
    p.add_argument("concepts", nargs="+", metavar="CONCEPT", help="two or more .cones files")
    p.add_argument(
        "-o", "--out", "--output", dest="output", required=True, help="the merged .cones file to write"
    )
    p.add_argument(
        "--plot", default=None, help="also draw the per-layer overlap of the concepts into this PNG"
    )
    p.add_argument(
        "--format", choices=("text", "json"), default="text", help="summary format (default: text)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out (and --plot) if they exist")


def overlap_summary(concepts, names: list[str]) -> list[dict]:
    """Pairwise shared neurons of the concepts, for the summary and the plot."""
    from cones.overlap import overlap

    pairs = []
    for i in range(len(concepts)):
        for j in range(i + 1, len(concepts)):
            report = overlap(concepts[i], concepts[j])
            pairs.append(
                {
                    "a": names[i],
                    "b": names[j],
                    "shared": report.shared,
                    "jaccard": report.jaccard,
                    "chance": report.chance,
                    "report": report,
                }
            )
    return pairs


def overlap_plot(pairs: list[dict]):
    """Per layer, the share of each pair's neurons that both hold (|A ∩ B| / |A ∪ B|)."""
    from cones.plots import bar_chart, layer_label

    layers = pairs[0]["report"].layers
    series = {
        f"{pair['a']} & {pair['b']}": [layer.jaccard for layer in pair["report"].layers] for pair in pairs[:9]
    }
    maximum = max([v for values in series.values() for v in values] + [1e-9])
    return bar_chart(
        [layer_label(layer.name) for layer in layers],
        series,
        title="Shared neurons per layer (shared / union of the pair)",
        maximum=maximum,
    )


def run(args) -> int:
    from cones import files
    from cones.refine import concatenate, parts_of
    from cones.storage import concept_to_bytes, load_concept_file

    if len(args.concepts) < 2:
        raise UsageError(f"`CONCEPT` got {len(args.concepts)} file; give two or more .cones files to merge.")
    outputs = [args.output] + ([args.plot] if args.plot else [])
    files.check_outputs(outputs, overwrite=args.overwrite)
    concepts = [load_concept_file(path) for path in args.concepts]
    names = [os.path.basename(path) for path in args.concepts]
    try:
        merged = concatenate(*concepts)
    except ValueError as e:
        raise UsageError(f"cannot merge {', '.join(names)}: {e}") from None
    tokens = [part["token"] for part in parts_of(merged)]
    repeated = sorted({t for t in tokens if t is not None and tokens.count(t) > 1})
    if repeated:
        print(
            f"cones merge: warning: identifier {repeated[0]!r} is used by several concepts; prompts cannot "
            "address them separately (find each subject with its own --token)",
            file=sys.stderr,
        )
    pairs = overlap_summary(concepts, names)
    written: list[tuple[str, bytes | object]] = [(args.output, concept_to_bytes(merged))]
    if args.plot:
        written.append((args.plot, files.image_writer(overlap_plot(pairs), args.plot)))
    files.write_files(written, overwrite=args.overwrite)  # both or neither

    summary = {
        "output": args.output,
        "neurons": merged.num_neurons,
        "sparsity": merged.sparsity,
        "parts": [
            {"file": name, **part}
            for name, concept in zip(names, concepts, strict=True)
            for part in parts_of(concept)
        ],
        "overlaps": [{k: v for k, v in pair.items() if k != "report"} for pair in pairs],
    }
    if args.format == "json":
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"wrote {args.output}: {merged.num_neurons:,} neurons ({merged.sparsity:.3%} of the target weights)"
    )
    for part in summary["parts"]:
        print(f"  {part['file']}: {part['token']} {part['class_word']}, {part['num_neurons']:,} neurons")
    for pair in summary["overlaps"]:
        print(
            f"  {pair['a']} & {pair['b']}: {pair['shared']:,} shared ({pair['jaccard']:.2%} of their union; "
            f"{pair['chance']:,.0f} expected by chance)"
        )
    return 0
