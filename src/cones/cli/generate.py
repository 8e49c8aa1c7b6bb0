"""Generate images from prompts, on the embedded model or any Stable Diffusion folder, with concepts shut.

cones generate "a red star on a sea background" --out out/
cones generate --concept circle.cones "a sks circle on a grass background" --seeds 0 1 2 3 --out out/
"""

from __future__ import annotations

import os
import warnings

from cones import GUIDANCE_SCALE
from cones.cli._options import add_model_arguments

NAME = "generate"
HELP = "generate images (optionally with concepts applied) into a folder, one PNG each plus a grid"


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("-o", "--out", required=True, help="folder for the PNG images and grid.png")
    p.add_argument(
        "--concept", action="append", default=[], help="a .cones file to apply; repeat for several"
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="one image per seed (default: 0 1 2 3)"
    )
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default: 25)")
    p.add_argument(
        "--guidance",
        type=float,
        default=GUIDANCE_SCALE,
        help="classifier-free guidance scale (default: %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace images already in --out")
    p.add_argument(
        "--force",
        action="store_true",
        help="apply a concept even if the base model's weights differ from those it was found on",
    )


def run(args) -> int:
    from cones import files
    from cones.basemodel import BaseTargets, check_concept
    from cones.cli import UsageError
    from cones.cli._options import reported_warnings
    from cones.errors import ConesWarning
    from cones.generate import generate, grid, save_all
    from cones.pipeline import load_pipeline, resolve_model
    from cones.storage import load_concept_file

    # 1. Everything the user gave, before the model loads: every output name, the concept files, and
    # whether the concepts belong to the model (from its files, when it is a diffusers folder).
    repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
    if repeated:
        raise UsageError(f"`--seeds` repeats {repeated[0]}; give each seed once")
    names = [f"prompt{i}-seed{seed}.png" for i in range(len(args.prompts)) for seed in args.seeds]
    paths = [os.path.join(args.out, name) for name in names + ["grid.png"]]
    files.check_output_folder(args.out, flag="--out")
    if os.path.isdir(args.out):
        files.check_outputs(paths, overwrite=args.overwrite)
    concepts = [load_concept_file(path) for path in args.concept]
    base = BaseTargets.from_model_path(resolve_model(args.model)) if concepts else None
    with reported_warnings(NAME):
        for path, concept in zip(args.concept, concepts, strict=True):
            if base is not None:
                check_concept(concept, base, force=args.force, name=path)

    # 2. The model, the concepts (checked again on the loaded UNet; warned about once), the images.
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, config=args.config)
    if concepts:
        from cones.loaders import load_concept, set_concepts

        with reported_warnings(NAME), warnings.catch_warnings():
            if base is not None:
                warnings.simplefilter("ignore", ConesWarning)  # said above, before the model loaded
            loaded = [load_concept(pipe, path, force=args.force) for path in args.concept]
        set_concepts(pipe, loaded)
    rows = generate(pipe, args.prompts, args.seeds, steps=args.steps, guidance_scale=args.guidance)

    # 3. All files or none.
    shut = (
        "concepts shut: " + ", ".join(os.path.basename(c) for c in args.concept)
        if args.concept
        else "no concept"
    )
    labels = [f'"{prompt}"\n{shut}' for prompt in args.prompts]
    picture = grid(
        rows,
        scale=2,
        row_labels=labels,
        column_labels=[f"seed {s}" for s in args.seeds],
        title=f"{args.steps} steps, guidance {args.guidance:g}",
    )
    images = [image for row in rows for image in row] + [picture]
    created = not os.path.isdir(args.out)
    os.makedirs(args.out, exist_ok=True)
    try:
        save_all(list(zip(paths, images, strict=True)), overwrite=args.overwrite)
    except BaseException:
        if created and not os.listdir(args.out):
            os.rmdir(args.out)
        raise
    print(f"wrote {len(args.prompts) * len(args.seeds)} images and grid.png to {args.out}")
    return 0
