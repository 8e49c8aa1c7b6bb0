"""Write docs/results.md from the benchmarks' own results, so that no number in it is copied by hand.

Every benchmark keeps one canonical result in benchmarks/results/: NAME.json (the numbers), NAME.md (the
table the benchmark printed) and at most one image. For each benchmark, in a fixed order, docs/results.md
gets a heading that says what it measures (the opening sentence of the benchmark's docstring), the command
that made the committed result, the usage lines of the docstring, a summary line computed from the JSON,
and the benchmark's own table, embedded as written (its headings moved two levels down). The output has
no dates and depends only on the committed files, so it regenerates byte for byte.

    python benchmarks/make_results.py            # writes docs/results.md
    python benchmarks/make_results.py --check    # exits 1 if docs/results.md is not what this writes
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

BENCHMARKS_DIR = Path(__file__).resolve().parent
ROOT = BENCHMARKS_DIR.parent
RESULTS = BENCHMARKS_DIR / "results"
OUTPUT = ROOT / "docs" / "results.md"


def pct(x: float) -> str:
    """0.6667 -> '67%'."""
    return f"{100 * x:.0f}%"


# 1. A summary line per benchmark, computed from its JSON.


def summary_world(r: dict) -> str:
    s, m = r["settings"], r["base_model"]
    many = r["clip_on_many_renders"]
    return (
        f"The base model's images ({s['prompts']} prompts x {s['seeds']} seeds, guidance "
        f"{s['guidance_scale']:g}) show the shape, colour and background asked for in {pct(m['shape'])} / "
        f"{pct(m['colour'])} / {pct(m['background'])} of cases, as the world CLIP judges them; that judge "
        f"names the shape of {100 * many['shape']:.1f}% of {many['renders']:,} renders (seed {many['seed']})."
    )


def summary_concepts(r: dict) -> str:
    sparsities = r["settings"]["sparsities"]
    top = max(sparsities)
    subjects = r["subjects"]
    most = [
        f"{name} ({pct(v[f'with_{top:g}']['subject_rate'])})"
        for name, v in subjects.items()
        if v[f"with_{top:g}"]["subject_rate"] > 0.5
    ]
    rises = sum(
        v[f"with_{top:g}"]["image_alignment"] > v["without"]["image_alignment"] for v in subjects.values()
    )
    return (
        f"With {100 * top:g}% of the cross-attention K/V shut ({r['settings']['steps']} search steps), the "
        f"subject is detected in more than half of its images for {len(most)} of {len(subjects)} subjects"
        f"{': ' + ', '.join(most) if most else ''}; image alignment rises for {rises} of {len(subjects)}."
    )


def summary_attention(r: dict) -> str:
    p, c = r["pooled"][0], r["conditioning"]
    return (
        f"The identifier's map against the subject's mask, all {p['renders']} renders: top-pixel IoU "
        f"{p['before_identifier_prompt_iou']:.3f} before, {p['after_identifier_prompt_iou']:.3f} after "
        f"shutting (chance {p['chance_iou']:.3f}). The text encoder's word states: mean cosine "
        f"{c['word_state_cosine']:.3f}; the identifier moves the conditioning by {c['identifier_moves']:.4f} "
        f"(1 - cosine), a colour word by {c['colour_moves']:.4f}."
    )


def summary_ceiling(r: dict) -> str:
    best = sorted(
        (
            (v["subject_rate"], subject, method)
            for subject, methods in r.items()
            for method, v in methods.items()
        ),
        key=lambda t: (-t[0], t[1], t[2]),
    )[0]
    return f"Highest subject rate: {best[1]} with {best[2]}, {pct(best[0])} of its identifier-prompt images."


def summary_guidance(r: dict) -> str:
    rate, subject, cell = max(
        (c["subject_rate"], subject, key)
        for subject, v in r["subjects"].items()
        for key, c in v["cells"].items()
    )
    guidance, sparsity = cell.split("/")
    return (
        f"Highest subject rate with the neurons shut: {subject}, {pct(rate)} at guidance {guidance} and "
        f"{100 * float(sparsity):g}% sparsity ({len(r['settings']['seeds'])} seeds per prompt)."
    )


def summary_ingredients(r: dict) -> str:
    rates = r["rates"]
    pattern = next(k for k in r["probe_auc"] if k.startswith("pattern"))
    return (
        f"Patterns (stripes, checkers, dots) in {pct(rates['model, guidance 7.5'][pattern])} of the model's "
        f"images at guidance 7.5, against {pct(rates['training renders, as drawn (truth)'][pattern])} of "
        f"training renders for the same prompts."
    )


def summary_multi(r: dict) -> str:
    parts = []
    for n in sorted({row["n_subjects"] for row in r["rows"]}):
        by = {row["method"]: row for row in r["rows"] if row["n_subjects"] == n}
        chain = " / ".join(
            f"{by[m]['image_alignment']:.3f}" for m in ("base", "concatenation", "refined") if m in by
        )
        parts.append(f"{n} subjects {chain}")
    most = max(row["all_present"] for row in r["rows"] if row["method"] != "renders")
    at_once = (
        f"every subject at once in at most {pct(most)} of any method's generated images"
        if most
        else "no generated image shows every subject at once"
    )
    return f"Mean image alignment, base / concatenation / refined: {'; '.join(parts)}; {at_once}."


def paper_labels() -> dict[str, str]:
    """`LABELS` of bench_paper.py, read without importing it (it imports torch)."""
    tree = ast.parse((BENCHMARKS_DIR / "bench_paper.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "LABELS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError("bench_paper.py has no LABELS")


def summary_paper(r: dict) -> str:
    labels = paper_labels()
    parts = []
    for n in sorted(r["groups"], key=int):
        methods = r["groups"][n]["methods"]
        best = max(methods, key=lambda m: (methods[m]["score"]["image_alignment"], m))
        parts.append(f"{n}: {labels[best]} ({methods[best]['score']['image_alignment']:.3f})")
    return f"Highest image alignment, by number of subjects: {'; '.join(parts)}."


def summary_precision(r: dict) -> str:
    variants = list(dict.fromkeys(row["variant"] for row in r["rows"]))
    rates = {v: mean(row["subject_rate"] for row in r["rows"] if row["variant"] == v) for v in variants}
    return (
        "Subject detected, mean over subjects: " + ", ".join(f"{v} {pct(x)}" for v, x in rates.items()) + "."
    )


def summary_storage(r: dict) -> str:
    rows = [row for row in r["rows"] if row["targets"] == "cross"]
    row = min(rows, key=lambda row: abs(row["sparsity"] - 0.0132))
    return (
        f"At {100 * row['sparsity']:g}% of the cross-attention K/V: the .cones file is "
        f"{row['cones_rice_bytes'] / 1e6:.3f} MB, {row['rice_over_bound']:.3f}x the entropy bound "
        f"(its index payload {row['rice_payload_over_bound']:.3f}x), against "
        f"{row['cones_int32_bytes'] / 1e6:.3f} MB as int32 indices."
    )


def summary_switching(r: dict) -> str:
    row = r["rows"][0]
    return (
        f"At {100 * row['sparsity']:g}%: apply {1000 * row['apply_s']:.1f} ms, remove "
        f"{1000 * row['remove_s']:.1f} ms, against {1000 * r['reload_kv_s']:.1f} ms to copy the K/V weights "
        f"back; a forward pass with the concept shut takes {r['forward']['ratio']:.3f}x as long."
    )


def summary_train_precision(r: dict) -> str:
    return f"A bf16-autocast training step takes {r['bf16_over_float32']:.2f}x as long as a float32 one."


def summary_gpu_check(r: dict) -> str:
    runs = [run for run in r["runs"] if "steps_per_second" in run]
    ratios = []
    for run in runs:
        if run["method"] != "cones A2":
            continue
        other = [
            o
            for o in runs
            if o["method"] != run["method"]
            and o["batch"] == run["batch"]
            and o["gradient_checkpointing"] == run["gradient_checkpointing"]
        ]
        if other:
            ratios.append(run["steps_per_second"] / other[0]["steps_per_second"])
    peak = max(run["peak_bytes"] for run in runs if run["method"] == "cones A2") / 2**30
    return (
        f"On {r['environment']['device']}: a search step runs at {min(ratios):.2f}-{max(ratios):.2f}x a "
        f"Custom Diffusion step's rate; its highest peak memory is {peak:.2f} GiB."
    )


# 2. The benchmarks, in the order the page shows them.


@dataclass(frozen=True)
class Benchmark:
    """One benchmark and its canonical result in benchmarks/results/."""

    name: str  # NAME.json and NAME.md
    script: str  # in benchmarks/
    command: str  # the command that made the committed result
    summary: Callable[[dict], str] | None  # None: no summary line (yet)
    image: str | None = None  # the one image kept, relative to benchmarks/results/
    note: str = ""  # where the result came from, when the command alone does not say
    see: str = ""  # the prose about it in docs/, a relative link


BENCHMARKS = (
    Benchmark(
        "world",
        "bench_world.py",
        "python benchmarks/bench_world.py --quick",
        summary_world,
        see="[world.md](world.md#world-v1-as-shipped)",
    ),
    Benchmark(
        "ingredients",
        "bench_ingredients.py",
        "python benchmarks/bench_ingredients.py",
        summary_ingredients,
        image="ingredients-model.png",
        see="[world.md](world.md#what-world-v1-taught-us)",
    ),
    Benchmark(
        "concepts",
        "bench_concepts.py",
        "python benchmarks/bench_concepts.py --steps 150 --sparsity 0.01 0.05 --seeds 2",
        summary_concepts,
        image="concepts-smiling-star.png",
        see="[world.md](world.md#what-world-v1-taught-us)",
    ),
    Benchmark(
        "guidance",
        "bench_guidance.py",
        "python benchmarks/bench_guidance.py --subjects striped-circle striped-diamond checkered-square",
        summary_guidance,
        image="guidance-striped-circle.png",
        note="Committed as guidance-a (a second run, guidance-b, measured the dotted triangle and the "
        "split hexagon; see docs/world.md).",
        see="[world.md](world.md#what-world-v1-taught-us)",
    ),
    Benchmark(
        "ceiling",
        "bench_ceiling.py",
        "STEPS=300 python benchmarks/bench_ceiling.py SUBJECT ...",
        summary_ceiling,
        image="ceiling-striped-circle.png",
        note="Four runs added to one file, which bench_ceiling.py names fine-tune-ceiling-300.json, made "
        "with its earlier form, tools/experiments/fine_tune_ceiling.py (commit 9c27049): the default "
        "methods (dreambooth, custom-diffusion) on striped-circle, checkered-square and "
        "two-tone-heart; `METHODS=custom-diffusion` on the other subjects and striped-circle again; "
        "`METHODS=custom-diffusion-kv-only,textual-inversion` on striped-circle. The table is built "
        "from the JSON: the share of identifier-prompt images in which the subject is detected "
        "(4 seeds), and where measured the same on class prompts.",
        see="[world.md](world.md#what-world-v1-taught-us)",
    ),
    Benchmark(
        "attention",
        "bench_attention.py",
        "python benchmarks/bench_attention.py --quick",
        summary_attention,
        image="attention-render.png",
        see="[world.md](world.md#what-world-v1-taught-us)",
    ),
    Benchmark(
        "precision", "bench_precision.py", "python benchmarks/bench_precision.py --quick", summary_precision
    ),
    Benchmark(
        "multi",
        "bench_multi.py",
        "python benchmarks/bench_multi.py --quick",
        summary_multi,
        image="multi-2.png",
    ),
    Benchmark(
        "paper",
        "bench_paper.py",
        "python benchmarks/bench_paper.py --fast",
        summary_paper,
        image="paper/fig7-2-subjects.png",
    ),
    Benchmark("storage", "bench_storage.py", "python benchmarks/bench_storage.py", summary_storage),
    Benchmark(
        "switching", "bench_switching.py", "python benchmarks/bench_switching.py --quick", summary_switching
    ),
    Benchmark(
        "gpu_check",
        "gpu_check.py",
        "python benchmarks/gpu_check.py",
        summary_gpu_check,
        note="Run on a borrowed GPU machine; see docs/training.md.",
    ),
    Benchmark(
        "train-precision",
        "bench_train_precision.py",
        "python benchmarks/bench_train_precision.py",
        summary_train_precision,
        see="[training.md](training.md)",
    ),
    Benchmark(
        "world-v2",
        "bench_world_v2.py",
        "python benchmarks/bench_world_v2.py --model M/sd --clip M/clip",
        None,
        see="[world.md](world.md#world-v2-under-construction)",
    ),
    Benchmark("cli-start", "bench_cli_start.py", "python benchmarks/bench_cli_start.py", None),
    Benchmark(
        "threads", "bench_threads.py", "python benchmarks/bench_threads.py --steps 30 --repeats 3", None
    ),
    Benchmark(
        "outside",
        "bench_outside.py",
        "python benchmarks/bench_outside.py --model M/sd --clip M/clip",
        None,
        see="[world.md](world.md#world-v2-under-construction)",
    ),
)


# 3. The page.


def docstring(script: str) -> str:
    return ast.get_docstring(ast.parse((BENCHMARKS_DIR / script).read_text())) or ""


def measures(doc: str) -> str:
    """The docstring's opening sentence: its first paragraph up to the first '?', or the whole paragraph."""
    first = " ".join(doc.split("\n\n")[0].split())
    return first[: first.index("?") + 1] if "?" in first else first


def usage(doc: str) -> list[str]:
    """The docstring's indented blocks that run a command, dedented."""
    blocks, block = [], []
    for line in [*doc.splitlines(), ""]:
        if line.startswith("    ") and line.strip():
            block.append(line[4:])
        else:
            if any("python " in b for b in block):
                blocks.append(block)
            block = []
    return [line for b in blocks for line in b]


def demote(markdown: str, levels: int = 2) -> str:
    """Move every heading of `markdown` down `levels` levels, so it sits under this page's headings."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("#"):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out).strip("\n")


def ceiling_table(r: dict) -> str:
    """The fine-tuning ceiling as a table: subject rate per subject and method, '–' where not run."""
    methods = list(dict.fromkeys(m for methods in r.values() for m in methods))
    lines = ["| subject | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for subject, done in r.items():
        cells = []
        for m in methods:
            if m not in done:
                cells.append("–")
                continue
            cell = pct(done[m]["subject_rate"])
            if "class_subject_rate" in done[m]:
                cell += f" (class prompts {pct(done[m]['class_subject_rate'])})"
            cells.append(cell)
        lines.append(f"| {subject} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(b: Benchmark) -> str:
    doc = docstring(b.script)
    json_path, md_path = RESULTS / f"{b.name}.json", RESULTS / f"{b.name}.md"
    made = "Made with" if json_path.exists() else "To be made with"
    out = [f"## `{b.name}`: {measures(doc)}", ""]
    out += [f"{made} `{b.command}` (`benchmarks/{b.script}`)." + (f" {b.note}" if b.note else ""), ""]
    lines = usage(doc)
    if lines:
        out += ["Usage, from the benchmark's docstring:", "", "```bash", *lines, "```", ""]
    if not json_path.exists():
        out += ["No result is committed yet.", ""]
        if b.see:
            out += [f"More: {b.see}.", ""]
        return "\n".join(out)
    result = json.loads(json_path.read_text())
    files = [f"[`{b.name}.json`](../benchmarks/results/{b.name}.json)"]
    if md_path.exists():
        files.append(f"[`{b.name}.md`](../benchmarks/results/{b.name}.md)")
    if b.image:
        files.append(f"[`{b.image}`](../benchmarks/results/{b.image})")
    if b.summary:
        out += [f"**In short:** {b.summary(result)}", ""]
    out += [f"Files: {', '.join(files)}." + (f" More: {b.see}." if b.see else ""), ""]
    out += [demote(md_path.read_text()) if md_path.exists() else ceiling_table(result), ""]
    if b.image:
        out += [f"![{b.name}: {b.image}](../benchmarks/results/{b.image})", ""]
    return "\n".join(out)


HEADER = """\
<!-- Written by `python benchmarks/make_results.py` from benchmarks/results/; edit those, not this. -->

# Results

Every number on this page is read from `benchmarks/results/` by `python benchmarks/make_results.py`:
each benchmark's JSON (the summary lines) and the table the benchmark itself wrote (embedded as it is).
Each section names the command that made the committed result. The embedded-model benchmarks ran on a
shared 2-core CPU, so absolute times are noisy and the ratios are the point; `bash benchmarks/run_world.sh`
reruns them (about 75 minutes). Earlier runs of the same benchmarks (other settings, other models) are in
the history at commit 72742ff; what they showed is told in [world.md](world.md#what-world-v1-taught-us).
"""


def render() -> str:
    contents = ["| benchmark | what it measures |", "|---|---|"]
    contents += [f"| `{b.name}` | {measures(docstring(b.script))} |" for b in BENCHMARKS]
    body = "\n".join(section(b) for b in BENCHMARKS)
    return f"{HEADER}\n" + "\n".join(contents) + f"\n\n{body}".rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/results.md would change")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(
                f"{OUTPUT.relative_to(ROOT)} is out of date; run: python benchmarks/make_results.py",
                file=sys.stderr,
            )
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
