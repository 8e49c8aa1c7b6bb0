"""Show what a .cones file holds: metadata, neurons per layer, sparsity, size on disk.

  cones inspect circle.cones
  cones inspect circle.cones --format json
  cones inspect circle.cones --plot layers.png

The file is fully validated first (a damaged file is one error line). --plot writes a bar chart of the
neurons per target parameter. A .cones-values file (tuned neuron values, see cones.precision) is
recognised too: its precision, neurons and size are shown.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

NAME = "inspect"
HELP = "show the metadata, neurons per layer, sparsity and size of a .cones file"


def add_arguments(p) -> None:
    p.add_argument("path", help="a .cones file (or a .cones-values file)")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    p.add_argument("--plot", default=None, help="write a per-layer bar chart to this PNG file")
    p.add_argument("--overwrite", action="store_true", help="replace the --plot file if it exists")


def summary(path: str) -> dict[str, Any]:
    """Everything `inspect` reports about a validated `.cones` file, as JSON-ready data."""
    from cones import files
    from cones.codec import entropy_bound_bits
    from cones.storage import METADATA_KEY, load_concept_file

    concept = load_concept_file(path)  # validates the whole file, within bounds
    raw, header_bytes, size = files.read_safetensors_header(path)
    header = json.loads(raw["__metadata__"][METADATA_KEY])
    bound_bits = sum(
        entropy_bound_bits(math.prod(shape), concept.indices[name].numel())
        for name, shape in concept.shapes.items()
    )
    neurons = concept.num_neurons
    return {
        "kind": "cones",
        "path": path,
        "bytes": size,
        "index_bytes": size - header_bytes,
        "bits_per_neuron": 8 * (size - header_bytes) / neurons if neurons else None,
        "entropy_bound_bytes": math.ceil(bound_bits / 8),
        "encoding": header["encoding"],
        "format_version": header["format_version"],
        "library_version": header["library_version"],
        "token": concept.token,
        "class_word": concept.class_word,
        "neurons": neurons,
        "weights": concept.total_weights,
        "sparsity": concept.sparsity,
        "metadata": concept.metadata,
        "parameters": [
            {
                "name": name,
                "shape": list(shape),
                "neurons": concept.indices[name].numel(),
                "weights": math.prod(shape),
                "sparsity": concept.per_layer_sparsity()[name],
            }
            for name, shape in concept.shapes.items()
        ],
    }


def values_summary(path: str) -> dict[str, Any]:
    """What `inspect` reports about a `.cones-values` file (its header; the values need their concept)."""
    from cones.precision import read_values_file_header, values_bytes

    info = read_values_file_header(path)
    counts = info["counts"]
    neurons = sum(counts.values())
    return {
        "kind": "cones-values",
        "path": path,
        "bytes": os.path.getsize(path),
        "precision": info["precision"],
        "format_version": info["format_version"],
        "concept_fingerprint": info["concept"],
        "neurons": neurons,
        "values_bytes": values_bytes(info["precision"], neurons),
        "metadata": info["metadata"],
        "parameters": [{"name": name, "neurons": n} for name, n in counts.items()],
    }


def short_name(name: str) -> str:
    """`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight` -> `down.1.a0.t0.attn2.to_k`."""
    for long, short in (
        ("down_blocks.", "down."),
        ("up_blocks.", "up."),
        ("mid_block.", "mid."),
        ("attentions.", "a"),
        ("transformer_blocks.", "t"),
    ):
        name = name.replace(long, short)
    return name.removesuffix(".weight")


def layer_chart(info: dict[str, Any], width: int = 760):
    """A horizontal bar per target parameter: its sparsity (bar) and neuron count (text)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    rows = info["parameters"]
    labels = [short_name(r["name"]) for r in rows]
    bar_h, gap, top = 14, 4, 40
    left = 20 + max([int(font.getlength(t)) for t in labels] + [40])
    right = 130  # room for the text after the longest bar
    height = top + len(rows) * (bar_h + gap) + 30
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    title = (
        f"{os.path.basename(info['path'])}: token {info['token']!r}, class {info['class_word']!r}, "
        f"{info['neurons']:,} neurons, sparsity {100 * info['sparsity']:.3f}%, {info['bytes']:,} bytes"
    )
    draw.text((10, 8), title, fill="black", font=font)
    draw.text((10, 22), "bar: neurons / weights of each parameter", fill=(90, 90, 90), font=font)
    scale = max([r["sparsity"] for r in rows] + [1e-12])
    span = width - left - right
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        y = top + i * (bar_h + gap)
        draw.text((10, y + 1), label, fill="black", font=font)
        length = round(span * row["sparsity"] / scale)
        colour = (214, 96, 77) if ".to_k" in row["name"] else (67, 147, 195)
        if length:
            draw.rectangle((left, y, left + length, y + bar_h), fill=colour)
        draw.text(
            (left + length + 6, y + 1),
            f"{row['neurons']:,} ({100 * row['sparsity']:.2f}%)",
            fill="black",
            font=font,
        )
    y = top + len(rows) * (bar_h + gap) + 6
    draw.text((left, y), "red: to_k   blue: to_v", fill=(90, 90, 90), font=font)
    return picture


def _flatten(meta: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metadata as one line per leaf: {"search": {"steps": 300}} -> {"search.steps": 300}."""
    flat: dict[str, Any] = {}
    for key, value in (meta or {}).items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _text(info: dict[str, Any]) -> str:
    if info["kind"] == "cones-values":
        lines = [
            f"file          {info['path']}",
            f"size on disk  {info['bytes']:,} bytes ({info['values_bytes']:,} of values)",
            f"format        cones-values {info['format_version']}, precision {info['precision']}",
            f"neurons       {info['neurons']:,}",
            f"concept       {info['concept_fingerprint']}",
            f"metadata      {json.dumps(info['metadata'])}",
        ]
        return "\n".join(lines)
    bits = f", {info['bits_per_neuron']:.2f} bits per neuron" if info["bits_per_neuron"] else ""
    with_neurons = sum(1 for p in info["parameters"] if p["neurons"])
    lines = [
        f"file          {info['path']}",
        f"size on disk  {info['bytes']:,} bytes: {info['index_bytes']:,} of {info['encoding']}-encoded indices"
        f"{bits} (entropy bound {info['entropy_bound_bytes']:,} bytes), the rest header",
        f"format        cones {info['format_version']}, written by cones {info['library_version']}",
        f"token         {info['token']}",
        f"class word    {info['class_word']}",
        f"neurons       {info['neurons']:,} of {info['weights']:,} target weights "
        f"(sparsity {100 * info['sparsity']:.4f}%), in {with_neurons} of {len(info['parameters'])} parameters",
    ]
    meta = _flatten(info["metadata"]) or {"": None}
    for i, (key, value) in enumerate(meta.items()):
        text = "" if key == "" else f"{key}: {json.dumps(value)}"
        lines.append(f"{'metadata' if i == 0 else '':<14}{text}")
    lines += ["", f"{'neurons':>9} {'weights':>10} {'sparsity':>9}  parameter"]
    for p in info["parameters"]:
        lines.append(f"{p['neurons']:>9,} {p['weights']:>10,} {100 * p['sparsity']:>8.3f}%  {p['name']}")
    return "\n".join(lines)


def run(args) -> int:
    from cones import files
    from cones.cli import UsageError
    from cones.precision import ValuesFileError
    from cones.storage import ConceptFileError

    if args.plot:
        files.check_outputs([args.plot], overwrite=args.overwrite, flag="--plot")
    try:
        info = summary(args.path)
    except ConceptFileError as concept_error:
        if not os.path.isfile(args.path):
            raise  # missing, a folder, a device: the reader's line says so
        try:
            info = values_summary(args.path)
        except ValuesFileError:
            raise concept_error from None  # neither kind: the .cones reader's message says why
    if args.plot:
        if info["kind"] != "cones":
            raise UsageError("`--plot` draws the layers of a .cones file; pass the concept's .cones file")
        from cones.generate import save_atomic

        save_atomic(layer_chart(info), args.plot, overwrite=args.overwrite)
    print(json.dumps(info, indent=2) if args.format == "json" else _text(info))
    return 0
