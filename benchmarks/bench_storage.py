"""How many bytes a concept costs on disk, side by side with the alternatives, on Stable Diffusion 1.x.

For concepts of 0.5 to 8 % sparsity over the SD-1.x attention key/value weights ("cross": the 32 attn2
to_k/to_v matrices the paper searches; "all": self-attention too), it reports the bytes of:

- our `.cones` file (Rice-coded indices + JSON header), and the same file in the plain int32 form;
- a dense bitmask over the target weights;
- Custom Diffusion's fp32 copies of all attn2 to_k/to_v (fixed: it stores whole matrices);
- a rank-4 LoRA (fp32) on the same target matrices;
- the entropy bound: sum over parameters of log2 C(numel, count) bits (the file stores each count);

and the ratio to the bound of the `.cones` file and of its index payload alone (the file less its
safetensors/JSON header, which names and shapes every target parameter), plus the time to encode and
to decode (load and validate) it.
The shapes come from the SD-1.x UNet config, built on the meta device (no weights are allocated).
Neurons are drawn uniformly at random per parameter, which is what the codec's bound assumes.

    python benchmarks/bench_storage.py [--quick]

Writes benchmarks/results/storage.json and benchmarks/results/storage.md.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from results_io import save_results

import cones
from cones.architectures import SD1_UNET
from cones.codec import entropy_bound_bits
from cones.neurons import ConceptNeurons
from cones.storage import concept_from_bytes, concept_to_bytes
from cones.targets import parameter_shapes

SPARSITIES = (0.005, 0.01, 0.0132, 0.02, 0.04, 0.08)
LORA_RANK = 4


def random_concept(shapes: dict[str, tuple[int, ...]], sparsity: float, seed: int) -> ConceptNeurons:
    rng = np.random.default_rng(seed)
    indices = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        indices[name] = torch.from_numpy(np.sort(rng.choice(numel, round(sparsity * numel), replace=False)))
    return ConceptNeurons(
        indices, shapes, token="sks", class_word="dog", metadata={"search": {"sparsity": sparsity}}
    )


def measure(
    shapes: dict[str, tuple[int, ...]], cross_shapes: dict[str, tuple[int, ...]], sparsity: float
) -> dict:
    concept = random_concept(shapes, sparsity, seed=round(sparsity * 1e4))
    start = time.perf_counter()
    rice = concept_to_bytes(concept, encoding="rice")
    encoded = time.perf_counter()
    loaded = concept_from_bytes(rice)
    decoded = time.perf_counter()
    assert loaded == concept
    int32 = concept_to_bytes(concept, encoding="int32")
    header_bytes = 8 + int.from_bytes(rice[:8], "little")
    bound_bits = sum(entropy_bound_bits(math.prod(concept.shapes[n]), c) for n, c in concept.counts().items())
    total = concept.total_weights
    return {
        "sparsity": sparsity,
        "neurons": concept.num_neurons,
        "target_weights": total,
        "cones_rice_bytes": len(rice),
        "cones_int32_bytes": len(int32),
        "int32_indices_bytes": 4 * concept.num_neurons,
        "dense_bitmask_bytes": math.ceil(total / 8),
        "custom_diffusion_kv_bytes": 4 * sum(math.prod(s) for s in cross_shapes.values()),
        "lora_rank4_bytes": 4 * LORA_RANK * sum(sum(s) for s in shapes.values()),
        "entropy_bound_bytes": bound_bits / 8,
        "cones_header_bytes": header_bytes,
        "rice_over_bound": len(rice) / (bound_bits / 8),
        "rice_payload_over_bound": (len(rice) - header_bytes) / (bound_bits / 8),
        "encode_s": encoded - start,
        "decode_s": decoded - encoded,
    }


def markdown(rows: list[dict]) -> str:
    mb = 1e6
    lines = [
        "| targets | sparsity | neurons | .cones (rice) | .cones (int32, paper) | dense bitmask | Custom Diffusion K/V "
        "| LoRA r=4 | entropy bound | file / bound | payload / bound | encode | decode |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['targets']} | {100 * r['sparsity']:.2f}% | {r['neurons']:,} | {r['cones_rice_bytes'] / mb:.3f} MB "
            f"| {r['cones_int32_bytes'] / mb:.3f} MB | {r['dense_bitmask_bytes'] / mb:.3f} MB "
            f"| {r['custom_diffusion_kv_bytes'] / mb:.1f} MB | {r['lora_rank4_bytes'] / mb:.3f} MB "
            f"| {r['entropy_bound_bytes'] / mb:.3f} MB | {r['rice_over_bound']:.4f} | {r['rice_payload_over_bound']:.4f} "
            f"| {1e3 * r['encode_s']:.0f} ms | {1e3 * r['decode_s']:.0f} ms |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="cross-attention targets only")
    args = parser.parse_args()

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD1_UNET)
    cross_shapes = parameter_shapes(unet, "cross")
    rows = []
    for targets in ("cross",) if args.quick else ("cross", "all"):
        shapes = parameter_shapes(unet, targets)
        for sparsity in SPARSITIES:
            rows.append({"targets": targets, **measure(shapes, cross_shapes, sparsity)})

    report = {
        "benchmark": "storage",
        "cones_version": cones.__version__,
        "quick": args.quick,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor(),
        },
        "model": "SD-1.x UNet2DConditionModel config (shapes only)",
        "rows": rows,
    }
    save_results(
        "storage",
        report,
        "# Storage of one concept, SD-1.x attention K/V\n\n"
        "Sizes in MB (10^6 bytes). Custom Diffusion stores fp32 copies of all cross-attention K/V "
        "(the paper reports 72-77 MB); LoRA is fp32, rank 4, on the same target matrices.\n\n"
        + markdown(rows),
    )


if __name__ == "__main__":
    main()
