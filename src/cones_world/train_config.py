"""The settings of a world training run (`TrainConfig`) and the flags made from them.

Apart from the training code (`cones_world.train`), so that `cones train-world --help` answers without
importing torch or diffusers.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    out: str = field(metadata={"help": "folder for the pool, checkpoints and exported models"})
    device: str = field(
        default="auto", metadata={"help": "torch device; auto: cuda where there is one, else cpu"}
    )
    seed: int = field(default=0, metadata={"help": "seeds scenes, captions, initialisation and batches"})
    pool_size: int = field(default=200_000, metadata={"help": "scenes rendered once and reused every epoch"})
    captions_per_scene: int = field(default=2, metadata={"help": "caption variants drawn per scene"})
    workers: int = field(default=max(1, (os.cpu_count() or 2) - 1), metadata={"help": "render processes"})
    vae_steps: int = 6000
    vae_batch: int = 128
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 20000
    unet_batch: int = 256
    unet_lr: float = 4e-4
    caption_dropout: float = field(default=0.1, metadata={"help": "share of empty captions, for guidance"})
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    clip_steps: int = 8000
    clip_batch: int = 512
    clip_lr: float = 5e-4
    clip_decoded_share: float = field(
        default=0.0,
        metadata={
            "help": "share of the CLIP's training images shown as the VAE returns them (encoded, then "
            "decoded), so that it judges generated images, which come through that decoder, as "
            "well as crisp renders"
        },
    )
    clip_decoded_pool: int = field(default=20_000, metadata={"help": "pool images given a decoded copy"})
    clip_captions: str = field(
        default="detailed",
        metadata={
            "help": "what the CLIP learns to read: 'detailed' captions that name every detail (the "
            "evaluation CLIP), or the diffusion model's own 'diffusion' captions and vocabulary, "
            "for a text tower to condition a UNet on (--text-encoder-from) that cannot name "
            "the subjects' details"
        },
    )
    phase_seconds: dict = field(default_factory=dict, metadata={"help": "wall-clock cap per phase name"})
    checkpoint_every: int = 500
    mixed_precision: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA"})
    clip_init_from: str = field(
        default="", metadata={"help": "exported CLIP folder to continue training from"}
    )
    init_from: str = field(
        default="",
        metadata={
            "help": "exported SD folder to continue from: its UNet and text encoder are trained on, its VAE "
            "kept (or trained on, when the vae phase is asked for)"
        },
    )
    world: str = field(
        default="v1",
        metadata={
            "help": "which world to render and caption: v1 (the shipped model's: named shapes, colours and "
            "places only) or v2 (continuous colours and patterns, alt-text captions that name "
            "ingredients, one tokenizer for the CLIP and the UNet, whose text tower is frozen)"
        },
    )
    text_encoder_from: str = field(
        default="",
        metadata={
            "help": "a CLIP folder whose text tower and tokenizer become the text encoder, kept frozen, "
            "as Stable Diffusion takes CLIP's: the UNet's cross-attention then learns to read words "
            "that stay apart"
        },
    )
    freeze_text_encoder: bool = field(
        default=False,
        metadata={
            "help": "keep the text encoder as it is (1/0); always so with --text-encoder-from. Trained "
            "jointly with the UNet, a small encoder folds every word into the end of the prompt"
        },
    )

    def __post_init__(self) -> None:
        if self.device == "auto":  # torch is imported here, at run time, not for --help
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training flags, one per `TrainConfig` field, plus `--phases`."""
    parser.add_argument(
        "--phases",
        default="vae,unet,clip",
        help="comma-separated: pool, vae, unet, clip; or export: the UNet phase's EMA weights "
        "as they stand in its last checkpoint, exported as OUT/sd",
    )
    parser.add_argument("--out", required=True, help=TrainConfig.__dataclass_fields__["out"].metadata["help"])
    parser.add_argument("--phase-seconds", default="{}", help='wall-clock cap per phase, JSON: {"unet": 300}')
    for f in TrainConfig.__dataclass_fields__.values():
        if f.name in ("out", "phase_seconds"):
            continue
        kind = int if isinstance(f.default, bool) else type(f.default)
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=kind,
            default=f.default,
            help=f.metadata.get("help", " ") + " (default: %(default)s)",
        )


def from_arguments(args: argparse.Namespace) -> tuple[TrainConfig, tuple[str, ...]]:
    """The config and the phases named by parsed flags."""
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    values["phase_seconds"] = json.loads(args.phase_seconds)
    for flag in ("mixed_precision", "freeze_text_encoder"):
        values[flag] = bool(values[flag])
    phases = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    return TrainConfig(**values), phases


def parse_args(argv=None) -> tuple[TrainConfig, tuple[str, ...]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return from_arguments(parser.parse_args(argv))
