"""Full-size Stable Diffusion UNets at random weights, on the CPU: real names, shapes, sizes, one search step.

The SD 1.x UNet (860M parameters, 3.4 GB in float32) is built once for the module from its config, on the
meta device and then filled with random numbers (much faster than its default initialisation); one A2 step
runs on 8x8 latents with random text embeddings in place of a CLIP text encoder. SD 2.x is built on the
meta device only, for its names and shapes. The GPU check's smoke run is here too.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors import safe_open

from cones.architectures import SD1_UNET, SD2_UNET
from cones.codec import entropy_bound_bits
from cones.export import unet_to_ldm
from cones.neurons import ConceptNeurons
from cones.objective import step_generator
from cones.pipeline import checkpoint_family
from cones.search import find_concept_neurons
from cones.storage import concept_to_bytes
from cones.targets import parameter_shapes, target_parameters

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD1_CROSS_KV_WEIGHTS = 19_169_280  # 2 x 768 x (2 x (320 + 640 + 1280) + 1280 + 3 x (1280 + 640 + 320))
PAPER_SPARSITY = 0.0132


def fill_random(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Every parameter from one seeded N(0, std²) buffer, read cyclically from a different offset per
    parameter; norms get weight 1 and bias 0. Random enough for shapes and gradients, and fast."""
    n = 1 << 20
    buffer = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * std  # (n,)
    twice = torch.cat([buffer, buffer])  # (2n,): any n consecutive values from any offset
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            flat, offset = p.view(-1), (i * 7919) % n
            for start in range(0, flat.numel(), n):
                size = min(n, flat.numel() - start)
                flat[start : start + size] = twice[offset : offset + size]
        for m in module.modules():
            if isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm) and m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()


class EmbeddingObjective:
    """The diffusion loss on random 8x8 latents with fixed random text embeddings (B, 77, 768): a stand-in
    for `ConceptObjective` that needs no text encoder or VAE; step k's draw depends only on (seed, k)."""

    def __init__(self, unet, batch: int = 1, latent: int = 8, seed: int = 0) -> None:
        self.unet, self.batch, self.latent, self.seed = unet, batch, latent, seed
        self.scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        g = torch.Generator().manual_seed(seed)
        self.embeds = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)  # (B, 77, D)

    def loss(self, step: int) -> torch.Tensor:
        g = step_generator(self.seed, step)
        x = torch.randn(self.batch, 4, self.latent, self.latent, generator=g)  # (B, 4, h, w)
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(1000, (self.batch,), generator=g)
        pred = self.unet(self.scheduler.add_noise(x, noise, t), t, self.embeds).sample
        return F.mse_loss(pred, noise)


@pytest.fixture(scope="module")
def sd1_unet():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD1_UNET)
    unet = unet.to_empty(device="cpu").eval()
    fill_random(unet, seed=0)
    return unet


@pytest.fixture(scope="module")
def sd1_search(sd1_unet):
    """One A2 step at the paper's sparsity; the target weights before it, to check the restore."""
    before = {name: p.detach().clone() for name, p in target_parameters(sd1_unet).items()}
    result = find_concept_neurons(
        EmbeddingObjective(sd1_unet),
        sd1_unet,
        steps=1,
        sparsity=PAPER_SPARSITY,
        token="sks",
        class_word="dog",
        disable=True,
    )
    return result, before


def sd1_names() -> list[str]:
    blocks = [f"down_blocks.{i}.attentions.{j}" for i in range(3) for j in range(2)]
    blocks += ["mid_block.attentions.0"]
    blocks += [f"up_blocks.{i}.attentions.{j}" for i in (1, 2, 3) for j in range(3)]
    return [f"{b}.transformer_blocks.0.attn2.{kv}.weight" for b in blocks for kv in ("to_k", "to_v")]


def test_sd1_targets_are_the_32_cross_attention_kv(sd1_unet):
    shapes = parameter_shapes(sd1_unet, "cross")
    assert sorted(shapes) == sorted(sd1_names()) and len(shapes) == 32
    assert {s[1] for s in shapes.values()} == {768} and {s[0] for s in shapes.values()} == {320, 640, 1280}
    assert sum(math.prod(s) for s in shapes.values()) == SD1_CROSS_KV_WEIGHTS
    assert len(parameter_shapes(sd1_unet, "all")) == 64
    assert sum(p.numel() for p in sd1_unet.parameters()) == 859_520_964


def test_one_a2_step_scores_all_32_targets_and_restores_the_unet(sd1_unet, sd1_search):
    result, before = sd1_search
    assert list(result.scores) == list(target_parameters(sd1_unet))
    for name, s in result.scores.items():
        assert s.shape == before[name].shape and s.dtype == torch.float32 and torch.isfinite(s).all()
    # After one Adam step M_p = ±1 (to eps) wherever the gradient is not 0: about half are positive.
    flat = torch.cat([s.flatten() for s in result.scores.values()])
    assert 0.3 < (flat > 0).float().mean() < 0.7 and flat.abs().max() <= 1.0001
    assert result.concept.num_neurons == round(PAPER_SPARSITY * SD1_CROSS_KV_WEIGHTS)
    assert math.isfinite(result.losses[0])
    for name, p in target_parameters(sd1_unet).items():
        assert torch.equal(p, before[name]) and p.requires_grad


def test_apply_and_remove_restore_the_full_unet_bit_for_bit(sd1_unet, sd1_search):
    concept, before = sd1_search[0].concept, sd1_search[1]
    params = target_parameters(sd1_unet)
    with concept.shut(sd1_unet):
        for name, p in params.items():
            mask = concept.mask_for(name)
            assert (p[mask] == 0).all() and torch.equal(p[~mask], before[name][~mask])
    for name, p in params.items():
        assert torch.equal(p, before[name])


def test_cones_file_has_the_diffusers_names_and_the_benchmarked_size(sd1_unet, sd1_search, tmp_path):
    concept = sd1_search[0].concept
    path = str(tmp_path / "dog.cones")
    concept.save(path)
    with safe_open(path, framework="np") as f:
        header = json.loads(f.metadata()["cones"])
        assert set(f.keys()) == {name for name, n in concept.counts().items() if n} <= set(sd1_names())
    assert list(header["parameters"]) == list(target_parameters(sd1_unet))
    assert ConceptNeurons.load(path) == concept
    bound = sum(entropy_bound_bits(math.prod(concept.shapes[n]), c) for n, c in concept.counts().items()) / 8
    assert os.path.getsize(path) < 1.06 * bound + 10_000  # the payload near the bound, plus the JSON header

    # The benchmark's concept (uniform per parameter, its seed) on the real UNet's shapes: its size exactly.
    with open(os.path.join(ROOT, "benchmarks", "results", "storage.json")) as f:
        row = next(
            r for r in json.load(f)["rows"] if r["targets"] == "cross" and r["sparsity"] == PAPER_SPARSITY
        )
    rng = np.random.default_rng(round(PAPER_SPARSITY * 1e4))
    indices = {}
    for name, shape in concept.shapes.items():
        numel = math.prod(shape)
        indices[name] = torch.from_numpy(
            np.sort(rng.choice(numel, round(PAPER_SPARSITY * numel), replace=False))
        )
    bench = ConceptNeurons(
        indices,
        concept.shapes,
        token="sks",
        class_word="dog",
        metadata={"search": {"sparsity": PAPER_SPARSITY}},
    )
    assert bench.num_neurons == row["neurons"] == 253_032
    assert len(concept_to_bytes(bench)) == row["cones_rice_bytes"]


def test_sd2_names_and_shapes():
    with torch.device("meta"):
        sd1, sd2 = UNet2DConditionModel(**SD1_UNET), UNet2DConditionModel(**SD2_UNET)
    shapes1, shapes2 = parameter_shapes(sd1, "cross"), parameter_shapes(sd2, "cross")
    assert list(shapes2) == list(shapes1)  # the same diffusers names ...
    assert all(shapes2[n] == (shapes1[n][0], 1024) for n in shapes1)  # ... keys and values read 1024-d text
    assert {s[0] for n, s in shapes2.items() if "to_k" in n} == {320, 640, 1280}
    assert list(parameter_shapes(sd2, "self")) == [n.replace("attn2", "attn1") for n in shapes1]
    concept = ConceptNeurons({}, shapes1)
    with pytest.raises(ValueError, match=r"has shape \(320, 1024\) .* but \(320, 768\) in the concept"):
        concept.check_compatible(sd2)


@pytest.mark.parametrize("config,family", [(SD1_UNET, "v1"), (SD2_UNET, "v2")])
def test_original_layout_of_full_size_unets(config, family):
    # The inverse conversion (cones.export, what cones bake writes), checked against diffusers' own conversion at full size.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    state = unet.state_dict()
    ldm = unet_to_ldm(state, unet.config)
    back = convert_ldm_unet_checkpoint(ldm, unet.config)
    assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state)
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight" in ldm
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in ldm  # the upsampler of up block 0
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    shapes["first_stage_model.encoder.conv_in.weight"] = (128, 3, 3, 3)
    shapes["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = (768,)
    assert checkpoint_family(shapes) == family


def test_gpu_check_smoke_run(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert len(report["runs"]) == 8 and all(
        "steps_per_second" in r and "error" not in r for r in report["runs"]
    )
    assert {r["method"] for r in report["runs"]} == {"cones A2", "Custom Diffusion"}
    assert report["attention_processors"] == {"AttnProcessor2_0": 8}
    assert report["gradient_underflow"]["loss_scale_1024"]["finite"]
    assert "| cones A2 | 2 | on |" in (out / "gpu_check.md").read_text()
