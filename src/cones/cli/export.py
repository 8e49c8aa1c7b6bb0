"""Export a concept for the programs people generate with: its weight differences as a LoRA-style file.

  cones export dog.cones --format diff --out dog.safetensors
  cones export dog.cones --format diff --out dog.safetensors --model path/to/sd-v1-5

The file holds, for each layer with neurons, −θ at the shut positions and 0 elsewhere, under the
`lora_unet_<module path>.diff` keys that ComfyUI's and AUTOMATIC1111's LoRA/LyCORIS loaders read as a
full-weight difference: loaded at strength 1 on the same base model, it shuts exactly the concept's weights.
"""

from __future__ import annotations

import os

from cones.cli._options import add_model_arguments

NAME = "export"
HELP = "write a concept as a LoRA-style weight-difference file (ComfyUI, AUTOMATIC1111)"


def add_arguments(p) -> None:
    add_model_arguments(p, device=False)
    p.add_argument("concept", help="the .cones file")
    p.add_argument(
        "--format",
        choices=("diff",),
        default="diff",
        help="diff: full-weight differences under lora_unet_*.diff keys (default: diff)",
    )
    p.add_argument("-o", "--out", required=True, help="the .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args) -> int:
    from cones.cli import UsageError
    from cones.dtypes import resolve_dtype
    from cones.export import export_diff
    from cones.pipeline import load_pipeline, resolve_model
    from cones.storage import load_concept_file

    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"{args.out} exists; pass --overwrite to replace it.")
    if not args.out.endswith(".safetensors"):
        raise UsageError(f"`--out` {args.out!r} should end in .safetensors; e.g. --out dog.safetensors")
    concept = load_concept_file(args.concept)
    resolve_model(args.model)
    pipe = load_pipeline(args.model, config=args.config)
    concept.check_compatible(pipe.unet)
    dtype = resolve_dtype(args.dtype) if args.dtype else None
    tensors = export_diff(concept, pipe.unet, args.out, dtype=dtype, overwrite=args.overwrite)
    print(
        f"wrote {args.out}: {len(tensors)} weight differences ({concept.num_neurons} shut weights), "
        f"{os.path.getsize(args.out) / 1024:.1f} KiB; load it as a LoRA at strength 1 on the same base model"
    )
    return 0
