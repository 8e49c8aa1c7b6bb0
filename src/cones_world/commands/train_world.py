"""Train the embedded world model (VAE, UNet and text encoder, evaluation CLIP) from scratch, or continue.

Renders its own data, checkpoints every few hundred steps and resumes from --out, so an interrupted run
loses little. On a CPU this takes many hours; on one GPU, minutes (see the README).

  cones train-world --out runs/world --device cuda
  cones train-world --out runs/world --phases unet --init-from src/cones_world/weights/sd --device cuda
"""

from __future__ import annotations

NAME = "train-world"
HELP = "train (or continue training) the embedded world model and its evaluation CLIP"


def add_arguments(p) -> None:
    from cones_world.train_config import add_arguments

    add_arguments(p)


def run(args) -> int:
    from cones_world.train import train
    from cones_world.train_config import from_arguments

    config, phases = from_arguments(args)
    report = train(config, phases)
    print(f"trained {', '.join(phases)} in {report['seconds']['total']:.0f} s; models in {config.out}")
    return 0
