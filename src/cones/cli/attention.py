"""Draw the cross-attention map of every prompt token, before and after shutting a concept (paper figure 2).

  cones attention --concept circle.cones "a sks circle" --out map.png
  cones attention --concept circle.cones "a sks circle on a sea background" --seed 3 --out map.png
  cones attention --concept circle.cones "a sks circle" --image photo.png --strength 0.6 --out map.png

Writes one picture: a row per state (before shutting, after shutting; one row without --concept), each the
generated image followed by each token's map as a heatmap over it. Maps are averaged over the sampling
steps, the heads and the cross-attention layers. By default each map is the token's share among the
prompt's tokens (--over prompt); --over text shows the share of all text positions, start and end markers
included. With --image the picture is noised (--strength) and denoised instead of generated from noise.
"""

from __future__ import annotations

import os

from cones import GUIDANCE_SCALE
from cones.cli._options import add_model_arguments

NAME = "attention"
HELP = "draw per-token cross-attention maps, before and after shutting a concept, into one PNG"


def add_arguments(p) -> None:
    add_model_arguments(p, config=False, dtype=False)
    p.add_argument("prompt", help='the prompt, e.g. "a sks circle"')
    p.add_argument("-o", "--out", required=True, help="the PNG file to write")
    p.add_argument("--concept", default=None, help="a .cones file: adds a row with its neurons shut")
    p.add_argument("--seed", type=int, default=0, help="seed of the image (default: 0)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default: 25)")
    p.add_argument(
        "--guidance",
        type=float,
        default=GUIDANCE_SCALE,
        help="classifier-free guidance scale (default: %(default)s)",
    )
    p.add_argument("--image", default=None, help="denoise this picture instead of generating from noise")
    p.add_argument(
        "--strength", type=float, default=0.6, help="with --image: share of steps run (default: 0.6)"
    )
    p.add_argument(
        "--over",
        choices=("prompt", "text"),
        default="prompt",
        help="map = share among the prompt's tokens (prompt) or among all text positions (text); default: prompt",
    )
    p.add_argument("--panel", type=int, default=128, help="panel size in pixels (default: 128)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--force",
        action="store_true",
        help="shut the concept even if the base model's weights differ from those it was found on",
    )


def run(args) -> int:
    from cones.cli import UsageError
    from cones.files import check_output_folder

    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"`--out` {args.out!r} exists; pass --overwrite to replace it")
    if os.path.isdir(args.out):
        raise UsageError(f"`--out` {args.out!r} is a folder; pass a .png file name")
    check_output_folder(os.path.dirname(args.out) or ".", flag="the folder of --out")
    if not args.out.lower().endswith(".png"):
        raise UsageError(f"`--out` {args.out!r} is not a .png file; pass e.g. --out map.png")
    if args.panel < 16:
        raise UsageError(f"`--panel` {args.panel} is too small; pass 16 pixels or more, e.g. 128")

    from cones.attention import attention_figure, attention_maps, attention_maps_for_image
    from cones.basemodel import BaseTargets, check_concept
    from cones.cli._options import reported_warnings
    from cones.generate import save_atomic
    from cones.pipeline import load_pipeline, resolve_model
    from cones.storage import load_concept_file

    concept = load_concept_file(args.concept) if args.concept else None
    image = None
    if args.image:
        from cones.images import open_image

        image = open_image(args.image)
    base = BaseTargets.from_model_path(resolve_model(args.model)) if concept is not None else None
    with reported_warnings(NAME):
        if base is not None:  # decided before the model loads
            check_concept(concept, base, force=args.force, name=args.concept)
        pipe = load_pipeline(args.model, device=args.device)
        if concept is not None and base is None:
            check_concept(concept, BaseTargets.from_unet(pipe.unet), force=args.force, name=args.concept)

    def maps(shut):
        common = dict(seed=args.seed, steps=args.steps, guidance_scale=args.guidance, concept=shut)
        if image is None:
            return attention_maps(pipe, args.prompt, **common)
        return attention_maps_for_image(pipe, args.prompt, image, strength=args.strength, **common)

    rows = [maps(None)]
    labels = ["before"] if concept is not None else None
    if concept is not None:
        rows.append(maps(concept))
        labels = ["before", "after"]
    picture = attention_figure(rows, labels, over=args.over, panel=args.panel)
    folder = os.path.dirname(args.out)
    if folder:
        os.makedirs(folder, exist_ok=True)
    save_atomic(picture, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: {len(rows)} row(s) x {len(rows[0].tokens)} tokens {rows[0].tokens}")
    return 0
