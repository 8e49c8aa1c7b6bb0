"""Does bf16 autocast speed up training the world model on this CPU? One training step, both ways, side by side.

A step as `cones train-world` takes it for the UNet phase: the shipped text encoder and UNet, a batch of 32
latents (4 x 16 x 16) with random captions and timesteps, forward, an MSE loss, backward and an AdamW update.
The two precisions alternate, so a busy machine slows both alike; the ratio is the result.

    python benchmarks/bench_train_precision.py [--repeats 6] [--threads 2]

Writes benchmarks/results/train-precision.json and .md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from results_io import save_results
from transformers import CLIPTextModel

from cones.pipeline import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeats", type=int, default=6, help="timed steps per precision (default: %(default)s)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default: %(default)s)")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = resolve_model(None)  # the embedded world model
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").float().train()
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").float().train()
    optimizer = torch.optim.AdamW([*unet.parameters(), *text_encoder.parameters()], lr=1e-6)
    latents = torch.randn(
        args.batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size
    )
    ids = torch.randint(
        0, text_encoder.config.vocab_size, (args.batch, text_encoder.config.max_position_embeddings)
    )
    timesteps = torch.randint(0, 1000, (args.batch,))

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = unet(latents, timesteps, text_encoder(ids)[0]).sample
            loss = (pred.float() - latents).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    for bf16 in (False, True, False, True):  # warm-up: allocations, oneDNN kernels
        step(bf16)
    seconds = {"float32": [], "bf16 autocast": []}
    for _ in range(args.repeats):
        seconds["float32"].append(step(False))
        seconds["bf16 autocast"].append(step(True))
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    report = {
        "benchmark": "train-precision",
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "batch": args.batch,
        "seconds": seconds,
        "median_seconds": medians,
        "bf16_over_float32": medians["bf16 autocast"] / medians["float32"],
    }
    table = "\n".join(
        [
            "# One training step of the world model's UNet and text encoder, float32 against bf16 autocast (CPU)",
            "",
            f"Batch {args.batch}, {args.threads} torch threads, {args.repeats} alternating repeats each, medians; "
            f"CPU capability {report['machine']['cpu_capability']}.",
            "",
            "| precision | median step | |",
            "|---|---:|---:|",
            *[f"| {name} | {m:.3f} s | {m / medians['float32']:.2f}x |" for name, m in medians.items()],
        ]
    )
    save_results("train-precision", report, table)


if __name__ == "__main__":
    main()
