"""Bake concepts into a model: one single-file Stable Diffusion checkpoint with their neurons shut.

  cones bake dog.cones --out dog-model.safetensors
  cones bake dog.cones cat.cones --out pets-model.safetensors --model sd-v1-5.safetensors --config sd-v1-5/

The checkpoint is in the original layout (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.*`) that SD programs load as a model, and diffusers through `from_single_file`. From a
single-file --model its own tensors are kept and the shut weights zeroed; a diffusers folder is converted
(CLIP text encoder, as SD 1.x).
"""

from __future__ import annotations

import os

from cones.cli._options import add_model_arguments

NAME = "bake"
HELP = "write a single-file SD checkpoint with concepts shut, for any SD program"


def add_arguments(p) -> None:
    add_model_arguments(p, device=False, dtype=False)
    p.add_argument("concepts", nargs="+", help="one or more .cones files (their union is shut)")
    p.add_argument("-o", "--out", required=True, help="the .safetensors checkpoint to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args) -> int:
    from cones.cli import UsageError
    from cones.export import bake_checkpoint
    from cones.pipeline import load_pipeline, resolve_model
    from cones.storage import load_concept_file

    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"{args.out} exists; pass --overwrite to replace it.")
    if not args.out.endswith(".safetensors"):
        raise UsageError(f"`--out` {args.out!r} should end in .safetensors; e.g. --out dog-model.safetensors")
    concepts = [load_concept_file(path) for path in args.concepts]
    model = resolve_model(args.model)
    pipe = load_pipeline(args.model, config=args.config)
    single = model if os.path.isfile(model) else None
    shut = bake_checkpoint(pipe, concepts, args.out, checkpoint=single, overwrite=args.overwrite)
    print(
        f"wrote {args.out}: {shut} weights shut ({len(concepts)} concept(s)), "
        f"{os.path.getsize(args.out) / 2**20:.1f} MiB"
    )
    return 0
