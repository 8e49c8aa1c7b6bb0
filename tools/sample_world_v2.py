"""A labelled grid of what a world v2 model draws: eight prompts, a row each, one column per seed.

The prompts try what the model must learn: colour, shape, background, patterns named as ingredients, a face,
a hat, two things, a proper noun, colours and patterns outside a single word, and the identifier alone.

    python tools/sample_world_v2.py MODEL_FOLDER samples.png [--seeds 4] [--device cuda]
"""

from __future__ import annotations

import argparse

from cones.generate import generate
from cones.labels import labelled_grid
from cones.pipeline import load_pipeline

PROMPTS = (
    "a red circle with stripes on a grass background",
    "a big blue star with a face",
    "a small yellow heart next to a green square on a night background",
    "a purple triangle wearing a hat on a snow background",
    "a cyan hexagon with rings on a pink background",
    "a dax",
    "a sks circle",
    "a circle",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    pipe = load_pipeline(args.model, device=args.device)
    seeds = list(range(args.seeds))
    rows = generate(pipe, list(PROMPTS), seeds)
    grid = labelled_grid(
        rows, list(PROMPTS), column_labels=[f"seed {s}" for s in seeds], title=f"{args.model}, 25 steps"
    )
    grid.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
