"""A prepared GPU check: the concept-neuron search on a full-size SD 1.x UNet, beside Custom Diffusion.

On the real Stable Diffusion 1.x UNet (860M parameters, built from its config at random weights, nothing
downloaded) in float16 at 512x512 (64x64 latents), for batch 1 and 2, with and without gradient
checkpointing, it measures:

- the cones search (Algorithm A2 with Adam, the real `find_concept_neurons`, 32 cross-attention K/V
  targets): steps per second and peak memory (`torch.cuda.max_memory_allocated`);
- a Custom Diffusion-style step: AdamW on float32 master copies of the same 32 attn2 to_k / to_v weights,
  the rest frozen (the modifier-token embedding of Custom Diffusion is left out: there is no text encoder);
- once: which attention processors the UNet uses, whether torch's flash kernel takes SD's attention shapes,
  and how many float16 gradients of the targets underflow, with and without loss scaling.

Every configuration runs in its own try block (an out-of-memory error is recorded, not fatal), the results
are written after each one, and configurations still waiting when `--max-seconds` is spent are recorded as
skipped, so one run always leaves a complete report.

    python benchmarks/gpu_check.py                 # CUDA: full size, float16, ~2-4 min on an H100
    python benchmarks/gpu_check.py --smoke         # anywhere: a tiny UNet, 8x8 latents, 2 steps (a test)
    python benchmarks/gpu_check.py --device cpu --latent 8 --batches 1 --steps 1   # full size on a CPU

Needs only torch, diffusers, transformers, safetensors and this repository (its `src` is put on the path).
Writes gpu_check.json and gpu_check.md to `--out`, else $OUT when set, else benchmarks/results/.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402
from results_io import save_results  # noqa: E402

from cones.architectures import SD1_UNET  # noqa: E402
from cones.dtypes import LossScaled  # noqa: E402
from cones.memory import attention_processors, gradient_checkpointing  # noqa: E402
from cones.objective import step_generator  # noqa: E402
from cones.search import find_concept_neurons  # noqa: E402
from cones.targets import target_parameters  # noqa: E402

TINY_UNET = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
TOKENS = 77
SPARSITY = 0.0132
CONES_LR = 2e-5
CUSTOM_DIFFUSION_LR = 1e-5


class RandomObjective:
    """The diffusion loss of a fixed random batch (latents, noise, timesteps, text embeddings) per step.

    Same shape of work as `ConceptObjective.loss`: one UNet call on `batch` rows and an MSE against the noise,
    reduced in float32; the draw of step k depends only on (seed, k), on the CPU, then moved.
    """

    def __init__(self, unet: UNet2DConditionModel, batch: int, latent: int, seed: int = 0) -> None:
        self.unet, self.batch, self.latent, self.seed = unet, batch, latent, seed
        self.scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        g = torch.Generator().manual_seed(seed)
        dim = unet.config.cross_attention_dim
        self.embeds = torch.randn(batch, TOKENS, dim, generator=g).to(unet.device, unet.dtype)  # (B, 77, D)

    def loss(self, step: int) -> torch.Tensor:
        g = step_generator(self.seed, step)
        shape = (self.batch, self.unet.config.in_channels, self.latent, self.latent)
        x = torch.randn(shape, generator=g)  # (B, 4, h, w)
        noise = torch.randn(shape, generator=g)  # (B, 4, h, w)
        t = torch.randint(self.scheduler.config.num_train_timesteps, (self.batch,), generator=g)  # (B,)
        noisy = self.scheduler.add_noise(x, noise, t).to(self.unet.device, self.unet.dtype)
        pred = self.unet(noisy, t.to(self.unet.device), self.embeds).sample  # (B, 4, h, w)
        return F.mse_loss(pred.float(), noise.to(pred.device).float())


def build_unet(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> UNet2DConditionModel:
    """The UNet of `config` with diffusers' default initialisation, created on `device` (else moved there)."""
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(**config)
    except (RuntimeError, TypeError):  # a diffusers that cannot build under a device context
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config).to(device)
    return unet.to(dtype).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> int | None:
    """Reset the peak counter; the bytes allocated now (None off CUDA)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def run_cones(unet, objective, device, warmup: int, steps: int) -> dict:
    """`find_concept_neurons` for warmup + steps steps; the time of the last `steps` from its callback."""
    stamps = []

    def tick(progress) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())

    synchronize(device)
    stamps.append(time.perf_counter())
    result = find_concept_neurons(
        objective, unet, steps=warmup + steps, lr=CONES_LR, sparsity=SPARSITY, disable=True, callback=tick
    )
    timed = stamps[-1] - stamps[warmup]
    return {
        "seconds_per_step": timed / steps,
        "steps_per_second": steps / timed,
        "final_loss": result.losses[-1],
        "neurons": result.concept.num_neurons,
        "targets": len(result.scores),
    }


def run_custom_diffusion(unet, objective, device, warmup: int, steps: int) -> dict:
    """AdamW on float32 master copies of the attn2 to_k / to_v weights; the weights are put back after."""
    params = target_parameters(unet, "cross")
    originals = {name: p.detach().clone() for name, p in params.items()}
    masters = [p.detach().float().clone().requires_grad_(True) for p in params.values()]
    optimizer = torch.optim.AdamW(masters, lr=CUSTOM_DIFFUSION_LR, weight_decay=1e-2)
    flags = {p: p.requires_grad for p in unet.parameters()}
    try:
        for p in unet.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        for k in range(warmup + steps):
            if k == warmup:
                synchronize(device)
                start = time.perf_counter()
            with torch.no_grad():
                for p, m in zip(params.values(), masters, strict=True):
                    p.copy_(m)
            loss = objective.loss(k)
            loss.backward()
            for p, m in zip(params.values(), masters, strict=True):
                m.grad = p.grad.float()
                p.grad = None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        timed = time.perf_counter() - start
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(originals[name])
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {"seconds_per_step": timed / steps, "steps_per_second": steps / timed, "final_loss": loss.item()}


def gradient_underflow(unet, objective) -> dict:
    """Share of the targets' step-0 gradients that are 0 or below float16's smallest normal, with and without loss scale 1024."""
    params = target_parameters(unet, "cross")
    flags = {p: p.requires_grad for p in unet.parameters()}
    out = {}
    try:
        for p in unet.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        for label, scale in (("plain", 1.0), ("loss_scale_1024", 1024.0)):
            scaled = LossScaled(objective, scale)
            grads = torch.autograd.grad(scaled.loss(0), list(params.values()))
            raw = torch.cat([g.flatten() for g in grads])  # (weights,) in the model's dtype
            unscaled = torch.cat([g.flatten() for g in scaled.unscale(list(grads))])
            out[label] = {
                "zero": (raw == 0).float().mean().item(),
                "below_fp16_normal": (raw.float().abs() < 6.1e-5).float().mean().item(),
                "median_abs": unscaled.abs().median().item(),
                "finite": bool(torch.isfinite(unscaled).all()),
            }
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return out


def flash_probe(device: torch.device, dtype: torch.dtype, latent: int, heads: int = 8) -> dict:
    """Whether torch's flash / memory-efficient SDPA kernels accept SD 1.x's self-attention shapes."""
    if device.type != "cuda":
        return {"skipped": "not CUDA"}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for channels in (320, 640, 1280):
        tokens = (latent * 320 // channels) ** 2
        q = torch.randn(1, heads, tokens, channels // heads, device=device, dtype=dtype, requires_grad=True)
        for name, backend in (
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ):
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, q, q).sum().backward()
                out[f"{name}_{channels}"] = True
            except RuntimeError:
                out[f"{name}_{channels}"] = False
    return out


def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
    }
    if device.type == "cuda":
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["memory_total_bytes"] = torch.cuda.get_device_properties(device).total_memory
        env["sdp_enabled"] = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        }
    return env


def markdown(report: dict) -> str:
    gb = 2**30
    s = report["settings"]
    lines = [
        "# GPU check: cones search vs Custom Diffusion step",
        "",
        f"{report['environment']['device']}; torch {report['environment']['torch']}, diffusers "
        f"{report['environment']['diffusers']}. UNet `{s['unet']}` ({s['parameters']:,} parameters) at random "
        f"weights in {s['dtype']}, {s['latent']}x{s['latent']} latents; {s['steps']} timed steps after "
        f"{s['warmup']} warm-up. Weights alone: {_gb(s['weight_bytes'])}.",
        "",
        "| method | batch | grad. ckpt | steps/s | s/step | peak memory | peak - weights | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        note = r.get("error") or r.get("skipped") or ""
        rate = f"{r['steps_per_second']:.2f}" if "steps_per_second" in r else "-"
        sec = f"{r['seconds_per_step']:.3f}" if "seconds_per_step" in r else "-"
        lines.append(
            f"| {r['method']} | {r['batch']} | {'on' if r['gradient_checkpointing'] else 'off'} | {rate} | {sec} "
            f"| {_gb(r.get('peak_bytes'))} | {_gb(r.get('peak_over_weights_bytes'))} | {note[:80]} |"
        )
    lines += [
        "",
        f"Attention processors: {report['attention_processors']}. Flash / memory-efficient SDPA on SD shapes: "
        f"{report.get('flash_probe')}.",
        "",
        "Gradients of the cross-attention K/V targets at step 0, share exactly 0 and share below float16's "
        f"smallest normal (6.1e-5), without and with loss scale 1024: {report.get('gradient_underflow')}.",
        "",
        f"Total {report['seconds']:.0f} s. 1 GiB = {gb:,} bytes.",
    ]
    return "\n".join(lines) + "\n"


def _gb(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def write(report: dict, out: Path) -> None:
    save_results("gpu_check", report, markdown(report), out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny UNet, 8x8 latents, 1+2 steps: checks the script runs"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("float16", "bfloat16", "float32"),
        help="default: float16 on CUDA, float32 on the CPU",
    )
    parser.add_argument("--latent", type=int, default=None, help="latent side (default 64 = 512 px; smoke 8)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    parser.add_argument("--max-seconds", type=float, default=420.0, help="skip configurations after this")
    parser.add_argument("--out", default=None, help="default: $OUT, else benchmarks/results/")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (a shared CPU stalls with more)")
    args = parser.parse_args(argv)  # fmt: skip

    start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    config = TINY_UNET if args.smoke else SD1_UNET
    latent = args.latent or (8 if args.smoke else 64)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    steps = args.steps if args.steps is not None else (2 if args.smoke else 10)
    out = Path(args.out or os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    # 1. The UNet and what it runs on.
    unet = build_unet(config, device, dtype)
    weight_bytes = reset_peak(device)
    report = {
        "settings": {
            "unet": "tiny" if args.smoke else "sd1",
            "parameters": sum(p.numel() for p in unet.parameters()),
            "dtype": str(dtype).removeprefix("torch."),
            "latent": latent,
            "warmup": warmup,
            "steps": steps,
            "sparsity": SPARSITY,
            "weight_bytes": weight_bytes,
        },
        "environment": environment(device),
        "attention_processors": attention_processors(unet),
        "runs": [],
        "seconds": 0.0,
    }
    try:
        report["flash_probe"] = flash_probe(device, dtype, latent)
    except Exception as e:  # a probe must not cost the run
        report["flash_probe"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    try:
        report["gradient_underflow"] = gradient_underflow(unet, RandomObjective(unet, 1, latent))
    except Exception as e:
        report["gradient_underflow"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    write(report, out)

    # 2. Each configuration in turn; the report is rewritten after each.
    for checkpointing in (False, True):
        for batch in args.batches:
            for method, run in (("cones A2", run_cones), ("Custom Diffusion", run_custom_diffusion)):
                row = {"method": method, "batch": batch, "gradient_checkpointing": checkpointing}
                if time.perf_counter() - start > args.max_seconds:
                    row["skipped"] = f"time budget of {args.max_seconds:.0f} s spent"
                else:
                    try:
                        reset_peak(device)
                        with gradient_checkpointing(unet, checkpointing):
                            row.update(run(unet, RandomObjective(unet, batch, latent), device, warmup, steps))
                        row["peak_bytes"] = peak(device)
                        if row["peak_bytes"] is not None:
                            row["peak_over_weights_bytes"] = row["peak_bytes"] - weight_bytes
                    except Exception as e:  # out of memory and the like: record, free, go on
                        row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
                        row["traceback"] = traceback.format_exc()[-2000:]
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                report["runs"].append(row)
                report["seconds"] = time.perf_counter() - start
                write(report, out)
    ok = all("error" not in r for r in report["runs"])
    print(f"wrote {out / 'gpu_check.json'} and gpu_check.md in {report['seconds']:.0f} s; "
          f"{sum('error' in r for r in report['runs'])} errors")  # fmt: skip
    if not all(math.isfinite(r.get("final_loss", 0.0)) for r in report["runs"]):
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
