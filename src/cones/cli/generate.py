"""Generate images from prompts, on the embedded model or any Stable Diffusion folder, with concepts shut.

  cones generate "a red star on a sea background" --out out/
  cones generate --concept circle.cones "a sks circle on a grass background" --seeds 0 1 2 3 --out out/
"""

from __future__ import annotations

import os

from cones import GUIDANCE_SCALE

NAME = "generate"
HELP = "generate images (optionally with concepts applied) into a folder, one PNG each plus a grid"


def add_arguments(p) -> None:
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("--out", required=True, help="folder for the PNG images and grid.png")
    p.add_argument("--model", default=None, help="Stable Diffusion folder (default: the embedded world model)")
    p.add_argument("--concept", action="append", default=[], help="a .cones file to apply; repeat for several")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="one image per seed (default: 0 1 2 3)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default: 25)")
    p.add_argument(
        "--guidance", type=float, default=GUIDANCE_SCALE, help="classifier-free guidance scale (default: %(default)s)"
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="weights' precision; fp16/bf16 on a GPU (default: fp32)")
    p.add_argument("--config", default=None,
                   help="a local diffusers folder of the same SD version, for a single-file --model checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace images already in --out")


def run(args) -> int:
    from cones.generate import generate, grid, save_atomic
    from cones.pipeline import load_pipeline

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, config=args.config)
    if args.concept:
        from cones.loaders import load_concept, set_concepts

        names = [load_concept(pipe, path) for path in args.concept]
        set_concepts(pipe, names)
    rows = generate(pipe, args.prompts, args.seeds, steps=args.steps, guidance_scale=args.guidance)
    os.makedirs(args.out, exist_ok=True)
    for i, row in enumerate(rows):
        for seed, image in zip(args.seeds, row, strict=True):
            save_atomic(image, os.path.join(args.out, f"prompt{i}-seed{seed}.png"), args.overwrite)
    shut = "concepts shut: " + ", ".join(os.path.basename(c) for c in args.concept) if args.concept else "no concept"
    labels = [f'"{prompt}"\n{shut}' for prompt in args.prompts]
    picture = grid(rows, scale=2, row_labels=labels, column_labels=[f"seed {s}" for s in args.seeds],
                   title=f"{args.steps} steps, guidance {args.guidance:g}")
    save_atomic(picture, os.path.join(args.out, "grid.png"), args.overwrite)
    print(f"wrote {len(args.prompts) * len(args.seeds)} images and grid.png to {args.out}")
    return 0
