"""Measure CLIP text and image alignment (paper section 4.1) of generated images, or generate them first.

  cones evaluate --concept circle.cones --reference striped-circle --prompt-set world --out eval/
  cones evaluate --concept circle.cones --concept sea.cones --reference striped-circle --reference sunset-sea \\
      --prompt-set world --images-per-prompt 8 --out eval/
  cones evaluate --images eval/ --reference striped-circle --token sks          # re-score a folder
  cones evaluate --weights circle-cd.safetensors --reference photos/ --token sks --class-word dog \\
      --prompt-set sd --model path/to/sd-v1-4 --clip path/to/clip-vit-large-patch14 --out eval/

Text alignment: cosine similarity of each image to its prompt with the identifiers removed ("a sks dog on
the beach" -> "a dog on the beach"), averaged over images and prompts. Image alignment: cosine similarity
of each image to each reference image of a subject, averaged; with several subjects, the mean over subjects
(and each subject's own value). A --reference is a world subject's name (its reference renders) or a
folder of images, one per subject. Without --images, images are generated for every prompt and seed with
the --concept files (or --weights of a baseline) applied, and written to --out with a prompts.json, so the
folder can be scored again with --images. Writes evaluation.json and evaluation.md to --out.
"""

from __future__ import annotations

import json
import os
import re

from cones import GUIDANCE_SCALE
from cones.cli._options import add_model_arguments

NAME = "evaluate"
HELP = "CLIP text and image alignment of a concept's images (generated here, or a folder of them)"


def add_arguments(p) -> None:
    p.add_argument(
        "--reference",
        action="append",
        required=True,
        help="a subject's reference images: a world subject name (e.g. striped-circle) or a folder; "
        "repeat for several subjects",
    )
    src = p.add_argument_group("images (a folder, or generated with concepts applied)")
    src.add_argument(
        "--images",
        default=None,
        help="folder of images to score (with prompts.json, or named "
        "prompt<i>-seed<s>.png as `cones generate` writes them)",
    )
    src.add_argument(
        "--concept", action="append", default=[], help="a .cones file to apply; repeat for several"
    )
    src.add_argument(
        "--weights",
        default=None,
        help="a baseline's .safetensors (DreamBooth, Custom Diffusion, Textual Inversion) to apply instead",
    )
    prompts = p.add_argument_group("prompts")
    prompts.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    prompts.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    prompts.add_argument(
        "--prompt-set",
        choices=("world", "sd"),
        default=None,
        help="the 20 standard prompts (cones.prompts) for the subjects' kind: world (the embedded "
        "model's vocabulary; several subjects get composition prompts) or sd (real models)",
    )
    prompts.add_argument(
        "--token",
        action="append",
        default=[],
        help="identifier of each --reference, in order (default: the concepts' tokens)",
    )
    prompts.add_argument(
        "--class-word",
        action="append",
        default=[],
        help="class word of each --reference (default: the world subject's, or the concept's)",
    )
    prompts.add_argument(
        "--kind",
        choices=("object", "background", "accessory"),
        default="object",
        help="kind of a folder --reference, for --prompt-set (default: %(default)s)",
    )
    gen = p.add_argument_group("generation")
    add_model_arguments(gen, config=False, dtype=False)
    gen.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds, one image each per prompt")
    gen.add_argument(
        "--images-per-prompt", type=int, default=4, help="images per prompt (default: %(default)s)"
    )
    gen.add_argument(
        "--seed", type=int, default=0, help="first seed when --seeds is not given (default: %(default)s)"
    )
    gen.add_argument("--steps", type=int, default=25, help="sampling steps (default: %(default)s)")
    gen.add_argument(
        "--guidance",
        type=float,
        default=GUIDANCE_SCALE,
        help="classifier-free guidance (default: %(default)s)",
    )
    p.add_argument(
        "--clip", default=None, help="transformers CLIPModel folder (default: the embedded world CLIP)"
    )
    p.add_argument(
        "-o", "--out", default=None, help="folder for evaluation.json, evaluation.md (and generated images)"
    )
    p.add_argument(
        "--format", choices=("text", "json"), default="text", help="what to print (default: %(default)s)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace files already in --out")


# -- the command -------------------------------------------------------------------------------------------


def _references(args, scorer) -> tuple[dict, list]:
    """name -> (r, d) embeddings, and each reference's world subject (or None for a folder)."""
    from cones.cli import UsageError
    from cones.images import list_images, open_image
    from cones.registry import default_model

    examples = default_model().subjects()

    embeddings, subjects = {}, []
    for ref in args.reference:
        if ref in examples:
            subjects.append(examples[ref])
            pictures = examples[ref].reference_images()
        elif os.path.isdir(ref):
            subjects.append(None)
            pictures = [open_image(path) for path in list_images(ref)]
        else:
            raise UsageError(
                f"`--reference` {ref!r} is neither a world subject ({', '.join(examples)}) nor a folder of images."
            )
        name = ref if ref in examples else os.path.basename(os.path.normpath(ref))
        if name in embeddings:
            raise UsageError(f"`--reference` {ref!r} is given twice; give each subject once.")
        embeddings[name] = scorer.images(pictures)
    return embeddings, subjects


def _per_reference(values: list, n: int, flag: str) -> list:
    from cones.cli import UsageError

    if values and len(values) != n:
        raise UsageError(
            f"`{flag}` is given {len(values)} times for {n} --reference; give one per reference, in order."
        )
    return values or [None] * n


def _prompts(args, subjects: list, tokens: list, class_words: list) -> list[str]:
    from cones.cli import UsageError
    from cones.prompts import SubjectWords, composition_prompts, prompt_set

    given = [bool(args.prompt), args.prompts_file is not None, args.prompt_set is not None]
    if sum(given) != 1:
        raise UsageError("give prompts one way: --prompt (repeatable), --prompts-file or --prompt-set.")
    if args.prompt:
        return list(args.prompt)
    if args.prompts_file is not None:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise UsageError(f"`--prompts-file` {args.prompts_file!r} holds no prompts; put one per line.")
        return prompts
    if None in tokens or None in class_words:
        raise UsageError(
            "`--prompt-set` needs each reference's identifier and class word: pass --token and "
            "--class-word once per --reference (or --concept files that carry them)."
        )
    kinds = [s.kind if s is not None else args.kind for s in subjects]
    if args.prompt_set == "sd":
        if len(subjects) != 1:
            raise UsageError(
                "`--prompt-set sd` is for one subject; for several, write the prompts (--prompts-file)."
            )
        return prompt_set(kinds[0], tokens[0], class_words[0], family="sd")
    slots = [SubjectWords(k, t, c) for k, t, c in zip(kinds, tokens, class_words, strict=True)]
    return composition_prompts(slots)


def _read_folder(folder: str, prompts: list[str]) -> tuple[list[str], list[list]]:
    """The prompts and images of a folder: from its prompts.json, or `prompt<i>-seed<s>.png` names + `prompts`."""
    from cones.cli import UsageError
    from cones.images import list_images, open_image

    index = os.path.join(folder, "prompts.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
        return data["prompts"], [
            [open_image(os.path.join(folder, name)) for name in row] for row in data["images"]
        ]
    if not prompts:
        raise UsageError(
            f"`--images` {folder!r} has no prompts.json; pass the prompts it was generated from (--prompt ...)."
        )
    rows: list[list] = [[] for _ in prompts]
    for path in list_images(folder):
        m = re.fullmatch(r"prompt(\d+)-seed(-?\d+)\.\w+", os.path.basename(path))
        if m and int(m.group(1)) < len(prompts):
            rows[int(m.group(1))].append((int(m.group(2)), open_image(path)))
    if any(not r for r in rows):
        raise UsageError(
            f"`--images` {folder!r} lacks prompt<i>-seed<s>.png images for some of the {len(prompts)} prompts."
        )
    return prompts, [[im for _, im in sorted(r, key=lambda x: x[0])] for r in rows]


def _write(path: str, text: str, overwrite: bool) -> None:
    from cones import files

    files.write_text(path, text, overwrite=overwrite)


def run(args) -> int:
    from cones.cli import UsageError
    from cones.evaluate import ClipScorer, markdown, score

    # 1. Check what can be checked before loading models.
    if args.images is not None and (args.concept or args.weights):
        raise UsageError(
            "`--images` scores a folder as it is; drop --concept/--weights, or drop --images to generate."
        )
    if args.concept and args.weights:
        raise UsageError("apply either --concept files or --weights of a baseline, not both.")
    if args.images_per_prompt < 1:
        raise UsageError(f"`--images-per-prompt` must be at least 1, got {args.images_per_prompt}.")
    seeds = (
        args.seeds if args.seeds is not None else list(range(args.seed, args.seed + args.images_per_prompt))
    )
    n = len(args.reference)
    tokens = _per_reference(args.token, n, "--token")
    class_words = _per_reference(args.class_word, n, "--class-word")

    # 2. What is applied: concepts or baseline weights, and the identifiers they bring.
    concepts, weights = [], None
    if args.concept:
        from cones.storage import load_concept_file

        concepts = [load_concept_file(path) for path in args.concept]
        if len(concepts) == n:
            tokens = [t or c.token for t, c in zip(tokens, concepts, strict=True)]
            class_words = [w or c.class_word for w, c in zip(class_words, concepts, strict=True)]
    if args.weights:
        from cones.baselines import load

        weights = load(args.weights)
        trained = list(weights.tokens) or [s.get("token") for s in weights.metadata.get("subjects", [])]
        if len(trained) == n and tokens == [None] * n:
            tokens = trained
    scorer = ClipScorer(args.clip, device=args.device)
    references, subjects = _references(args, scorer)
    class_words = [
        w or (s.class_word if s is not None else None) for w, s in zip(class_words, subjects, strict=True)
    ]
    identifiers = sorted({t for t in tokens if t} | {c.token for c in concepts if c.token})

    # 3. The images: a folder, or generated for every prompt and seed.
    if args.images is not None:
        prompts = (
            _prompts(args, subjects, tokens, class_words)
            if (args.prompt or args.prompts_file or args.prompt_set)
            else []
        )
        prompts, rows = _read_folder(args.images, prompts)
    else:
        prompts = _prompts(args, subjects, tokens, class_words)
        rows = _generate(args, prompts, seeds, concepts, weights)

    # 4. Score and write.
    result = score(scorer, rows, prompts, references, identifiers)
    result["settings"] = {
        "references": args.reference,
        "identifiers": identifiers,
        "clip": args.clip or "embedded world CLIP",
        "concepts": args.concept,
        "weights": args.weights,
        "images": args.images,
        "seeds": seeds if args.images is None else None,
        "steps": args.steps,
        "guidance": args.guidance,
    }
    table = markdown(result)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        _write(os.path.join(args.out, "evaluation.json"), json.dumps(result, indent=2) + "\n", args.overwrite)
        _write(os.path.join(args.out, "evaluation.md"), table, args.overwrite)
    print(
        json.dumps(result, indent=2) if args.format == "json" else table,
        end="" if args.format == "text" else "\n",
    )
    return 0


def _generate(args, prompts: list[str], seeds: list[int], concepts: list, weights) -> list[list]:
    from cones.generate import generate, save_atomic
    from cones.pipeline import load_pipeline

    pipe = load_pipeline(args.model, device=args.device)
    if concepts:
        from cones.loaders import load_concept

        for concept in concepts:
            load_concept(pipe, concept)
    if weights is not None:
        weights.apply(pipe)
    rows = generate(pipe, prompts, seeds, steps=args.steps, guidance_scale=args.guidance)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        names = [[f"prompt{i}-seed{s}.png" for s in seeds] for i in range(len(prompts))]
        for row, row_names in zip(rows, names, strict=True):
            for image, name in zip(row, row_names, strict=True):
                save_atomic(image, os.path.join(args.out, name), args.overwrite)
        _write(
            os.path.join(args.out, "prompts.json"),
            json.dumps({"prompts": prompts, "seeds": seeds, "images": names}, indent=2) + "\n",
            args.overwrite,
        )
    return rows
