"""How long it takes to switch a concept on and off in a live Stable Diffusion 1.x UNet.

On a randomly initialised SD-1.x-sized `UNet2DConditionModel` (860 M parameters, fp32, CPU) it times:

- `apply` and `remove` of a cross-attention concept at 1.32 % (the paper's single-subject average) and
  8 % sparsity, alone and with another concept already active (the overlap bookkeeping path);
- the alternative a Custom-Diffusion-style delta needs: copying saved fp32 K/V matrices back into all
  32 attn2 to_k/to_v weights (timed with torch's default threads and with one thread; the faster counts);
- one UNet forward pass with and without a concept applied (shutting should not change its cost).

Times are medians over many repeats. On a CPU shared with other work, absolute numbers move; the ratios
are the point.

    python benchmarks/bench_switching.py [--quick]

Writes benchmarks/results/switching.json and benchmarks/results/switching.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel
from results_io import save_results

import cones
from cones.architectures import SD1_UNET
from cones.neurons import ConceptNeurons
from cones.search import select_neurons
from cones.targets import parameter_shapes, target_parameters


def median_time(step: Callable[[], None], repeats: int, undo: Callable[[], None] | None = None) -> float:
    """Median seconds of `step`, running the untimed `undo` after each repeat."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if undo is not None:
            undo()
    return statistics.median(times)


def random_concept(unet: torch.nn.Module, sparsity: float, seed: int) -> ConceptNeurons:
    g = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(s, generator=g) for n, s in parameter_shapes(unet, "cross").items()}
    return ConceptNeurons.from_mask(select_neurons(scores, sparsity=sparsity))


def reload_kv(params: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor], threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])
    torch.set_num_threads(before)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a 256x256 forward pass")
    args = parser.parse_args()
    repeats = 9 if args.quick else 31
    latent, forward_repeats = (32, 2) if args.quick else (64, 3)

    # 1. The model and the saved K/V weights a delta-swapping method would copy back.
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD1_UNET).eval()
    params = target_parameters(unet, "cross")
    saved = {name: p.detach().clone() for name, p in params.items()}
    kv_bytes = sum(t.numel() * t.element_size() for t in saved.values())

    # 2. Switching.
    rows = []
    other = random_concept(unet, 0.0132, seed=99)
    for sparsity in (0.0132, 0.08):
        concept = random_concept(unet, sparsity, seed=1)
        row = {"sparsity": sparsity, "neurons": concept.num_neurons}
        row["apply_s"] = median_time(
            lambda c=concept: c.apply(unet), repeats, undo=lambda c=concept: c.remove(unet)
        )
        times = []
        for _ in range(repeats):
            concept.apply(unet)
            start = time.perf_counter()
            concept.remove(unet)
            times.append(time.perf_counter() - start)
        row["remove_s"] = statistics.median(times)
        other.apply(unet)
        row["apply_over_active_s"] = median_time(
            lambda c=concept: c.apply(unet), repeats, undo=lambda c=concept: c.remove(unet)
        )
        other.remove(unet)
        rows.append(row)
    reload = {
        threads: median_time(lambda t=threads: reload_kv(params, saved, t), repeats)
        for threads in sorted({torch.get_num_threads(), 1})
    }
    reload_s = min(reload.values())
    assert all(torch.equal(p, saved[n]) for n, p in params.items())

    # 3. One forward pass, with and without a concept.
    sample = torch.randn(1, 4, latent, latent)
    text = torch.randn(1, 77, 768)
    concept = random_concept(unet, 0.0132, seed=1)

    def forward() -> None:
        with torch.no_grad():
            unet(sample, 500, encoder_hidden_states=text)

    forward()  # warm-up
    forward_plain = median_time(forward, forward_repeats)
    with concept.shut(unet):
        forward_shut = median_time(forward, forward_repeats)

    # 4. Report.
    report = {
        "benchmark": "switching",
        "cones_version": cones.__version__,
        "quick": args.quick,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor(),
        },
        "model": "SD-1.x UNet2DConditionModel, random weights, fp32, CPU",
        "repeats": repeats,
        "cross_kv_bytes": kv_bytes,
        "reload_kv_s_by_threads": reload,
        "reload_kv_s": reload_s,
        "rows": [
            {
                **r,
                "reload_over_apply": reload_s / r["apply_s"],
                "reload_over_remove": reload_s / r["remove_s"],
            }
            for r in rows
        ],
        "forward": {
            "latent": latent,
            "plain_s": forward_plain,
            "with_concept_s": forward_shut,
            "ratio": forward_shut / forward_plain,
        },
    }
    lines = [
        "| sparsity | neurons | apply | remove | apply with another active | reload K/V (delta swap) "
        "| reload / apply | reload / remove |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {100 * r['sparsity']:.2f}% | {r['neurons']:,} | {1e3 * r['apply_s']:.2f} ms "
            f"| {1e3 * r['remove_s']:.2f} ms | {1e3 * r['apply_over_active_s']:.2f} ms | {1e3 * reload_s:.2f} ms "
            f"| {r['reload_over_apply']:.1f}x | {r['reload_over_remove']:.1f}x |"
        )
    table = "\n".join(lines) + "\n"
    fwd = report["forward"]
    forward_line = (
        f"UNet forward pass ({8 * latent}x{8 * latent} px, batch 1): {fwd['plain_s']:.2f} s plain, "
        f"{fwd['with_concept_s']:.2f} s with a 1.32% concept shut (ratio {fwd['ratio']:.3f}).\n"
    )
    save_results(
        "switching",
        report,
        "# Switching a concept in an SD-1.x UNet (CPU)\n\n"
        f"Medians of {repeats} repeats; {report['machine']['threads']} torch threads on a shared CPU. "
        f"Reloading copies {kv_bytes / 1e6:.1f} MB of saved fp32 K/V back into the 32 attn2 to_k/to_v weights "
        f"(best of default threads and one thread: {', '.join(f'{t}: {1e3 * s:.1f} ms' for t, s in reload.items())}).\n\n"
        + table
        + "\n"
        + forward_line,
    )


if __name__ == "__main__":
    main()
