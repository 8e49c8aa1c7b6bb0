"""The concept-implanting loss against its definition (paper eqs. 2-4), on the tiny real SD pipeline.

The reference computations below rebuild x_t = √ᾱ_t·x + √(1−ᾱ_t)·ε from the beta schedule by hand
and take the mean squared error against ε, v or x themselves, so they do not reuse the objective's code.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from cones.objective import ConceptObjective, ObjectiveConfig, SumObjective


def images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 16, 16) random images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1


def make_objective(pipe, *, class_images=True, prediction_type=None, **config) -> ConceptObjective:
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if prediction_type is not None:
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    return ConceptObjective(
        pipe.unet,
        pipe.text_encoder,
        pipe.tokenizer,
        scheduler,
        pipe.vae,
        images(3, seed=1),
        token="sks",
        class_word="dog",
        class_images=images(4, seed=2) if class_images else None,
        config=ObjectiveConfig(**config),
    )


def alphas_cumprod(pipe) -> torch.Tensor:
    """ᾱ_t of SD's "scaled_linear" schedule, from its definition, in float64."""
    cfg = pipe.scheduler.config
    betas = (
        torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=torch.float64)
        ** 2
    )
    return torch.cumprod(1 - betas, 0)


def reference_loss(obj: ConceptObjective, pipe, step: int, prediction_type: str) -> torch.Tensor:
    """L_sub + λ·L_pr of `step`, from the drawn batch and the definitions of x_t and the targets."""
    batch = obj.draw(step)
    a = alphas_cumprod(pipe)[batch.timesteps].view(-1, 1, 1, 1)  # (rows, 1, 1, 1)
    x, eps = batch.latents.double(), batch.noise.double()
    x_t = a.sqrt() * x + (1 - a).sqrt() * eps
    target = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x, "sample": x}[
        prediction_type
    ]
    with torch.no_grad():
        pred = pipe.unet(x_t.float(), batch.timesteps, batch.prompt_embeds).sample.double()
    n = batch.num_subject
    loss = F.mse_loss(pred[:n], target[:n])
    if len(pred) > n:
        loss = loss + obj.config.prior_weight * F.mse_loss(pred[n:], target[n:])
    return loss


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_matches_the_definition(tiny_pipe, prediction_type):
    obj = make_objective(tiny_pipe, prediction_type=prediction_type, prior_weight=0.7)
    for step in (0, 3):
        expected = reference_loss(obj, tiny_pipe, step, prediction_type)
        assert obj.loss(step).item() == pytest.approx(expected.item(), rel=1e-5)


def test_without_class_images_the_loss_is_the_subject_term(tiny_pipe):
    obj = make_objective(tiny_pipe, class_images=False)
    batch = obj.draw(0)
    assert len(batch.latents) == obj.config.batch_size == batch.num_subject
    assert obj.loss(0).item() == pytest.approx(reference_loss(obj, tiny_pipe, 0, "epsilon").item(), rel=1e-5)


def test_loss_is_affine_in_the_prior_weight(tiny_pipe):
    # L_con(λ) = L_sub + λ·L_pr with the same draw for every λ.
    losses = {lam: make_objective(tiny_pipe, prior_weight=lam).loss(2).item() for lam in (0.0, 1.0, 3.0)}
    l_sub, l_pr = losses[0.0], losses[1.0] - losses[0.0]
    assert l_pr > 0
    assert losses[3.0] == pytest.approx(l_sub + 3 * l_pr, rel=1e-5)


def test_latents_are_scaled_vae_means(tiny_pipe):
    obj = make_objective(tiny_pipe)
    with torch.no_grad():
        mean = tiny_pipe.vae.encode(images(3, seed=1)).latent_dist.mean  # (3, 4, 8, 8)
    torch.testing.assert_close(obj.subject_latents, mean * tiny_pipe.vae.config.scaling_factor)
    assert obj.class_latents.shape == (4, 4, 8, 8)


def test_prompts_are_the_templates_filled_in_and_encoded(tiny_pipe):
    obj = make_objective(tiny_pipe)
    assert obj.subject_prompts == ["a sks dog", "a photo of a sks dog"]
    assert obj.class_prompts == ["a dog", "a photo of a dog"]
    tok = tiny_pipe.tokenizer
    ids = tok(
        ["a photo of a dog"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
    )
    with torch.no_grad():
        expected = tiny_pipe.text_encoder(ids.input_ids)[0]  # (1, 16, 32)
    torch.testing.assert_close(obj.class_embeds[1:2], expected)


def test_batch_layout(tiny_pipe):
    obj = make_objective(tiny_pipe, batch_size=3)
    batch = obj.draw(7)
    assert batch.latents.shape == (6, 4, 8, 8) and batch.noise.shape == (6, 4, 8, 8)
    assert batch.prompt_embeds.shape == (6, 16, 32) and batch.num_subject == 3
    assert ((batch.timesteps >= 0) & (batch.timesteps < 1000)).all()
    # Subject rows hold subject latents with identifier prompts, class rows class latents with class prompts.
    for row in range(6):
        source, prompts = (
            (obj.subject_latents, obj.subject_embeds) if row < 3 else (obj.class_latents, obj.class_embeds)
        )
        assert any(torch.equal(batch.latents[row], x) for x in source)
        assert any(torch.equal(batch.prompt_embeds[row], e) for e in prompts)


def test_same_seed_same_losses_in_any_order(tiny_pipe):
    a, b = make_objective(tiny_pipe, seed=5), make_objective(tiny_pipe, seed=5)
    forward = [a.loss(k).item() for k in range(3)]
    backward = [b.loss(k).item() for k in (2, 1, 0)][::-1]
    assert forward == backward
    assert a.loss(1).item() == forward[1]
    other = make_objective(tiny_pipe, seed=6)
    assert [other.loss(k).item() for k in range(3)] != forward
    assert len(set(forward)) == 3  # each step draws anew


def test_loss_has_gradients_for_the_unet_only_in_float32(tiny_pipe):
    obj = make_objective(tiny_pipe)
    loss = obj.loss(0)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    weight = tiny_pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight
    (grad,) = torch.autograd.grad(loss, [weight])
    assert grad.abs().sum() > 0


def test_dtype_and_device_parameters(tiny_pipe):
    expected = make_objective(tiny_pipe).loss(1).item()
    tiny_pipe.unet.double()
    obj = ConceptObjective.from_pipeline(
        tiny_pipe,
        images(3, seed=1),
        token="sks",
        class_word="dog",
        class_images=images(4, seed=2),
        dtype=torch.float64,
    )
    assert obj.subject_latents.dtype == obj.subject_embeds.dtype == torch.float64
    assert obj.device == torch.device("cpu")
    assert obj.loss(1).item() == pytest.approx(expected, rel=1e-4)


def test_sum_objective_adds_the_parts(tiny_pipe):
    dog = make_objective(tiny_pipe, seed=0)
    cat = ConceptObjective.from_pipeline(tiny_pipe, images(2, seed=3), token="xqz", class_word="cat")
    total = SumObjective([dog, cat])
    assert total.loss(4).item() == pytest.approx(dog.loss(4).item() + cat.loss(4).item(), rel=1e-6)
    assert total.token is None and total.class_word is None
    assert SumObjective([dog]).token == "sks"


@pytest.mark.parametrize(
    "change, match",
    [
        ({"batch_size": 0}, "`batch_size`"),
        ({"prior_weight": -1.0}, "`prior_weight`"),
        ({"seed": -1}, "`seed`"),
        ({"subject_templates": ("a photo of a {class_word}",)}, "lacks `{token}`"),
        ({"class_templates": ("a {token} {class_word}",)}, "`class_templates`"),
        ({"subject_templates": ("a {tokn} dog",)}, "`subject_templates`"),
        ({"subject_templates": ()}, "`subject_templates`"),
    ],
)
def test_config_errors_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(ObjectiveConfig(), **change)


def test_input_errors(tiny_pipe):
    with pytest.raises(ValueError, match=r"`subject_images` must lie in \[-1, 1\]"):
        ConceptObjective.from_pipeline(tiny_pipe, images(2, 0) * 255, token="sks", class_word="dog")
    with pytest.raises(ValueError, match=r"`subject_images` must be a \(N, 3, H, W\)"):
        ConceptObjective.from_pipeline(tiny_pipe, images(2, 0)[0], token="sks", class_word="dog")
    with pytest.raises(ValueError, match="`class_images` give latents of shape"):
        small = torch.zeros(1, 3, 8, 8)
        ConceptObjective.from_pipeline(
            tiny_pipe, images(2, 0), token="sks", class_word="dog", class_images=small
        )
    with pytest.raises(ValueError, match="over the tokenizer's 16"):
        long = ObjectiveConfig(subject_templates=("a photo of a {token} " + "red " * 20 + "{class_word}",))
        ConceptObjective.from_pipeline(tiny_pipe, images(2, 0), token="sks", class_word="dog", config=long)
    with pytest.raises(ValueError, match="`noise_scheduler` predicts 'flow'"):
        make_objective(tiny_pipe, prediction_type="flow")


def test_per_image_prompts_pair_each_image_with_its_own_prompt(tiny_pipe):
    from cones.objective import ConceptObjective, ObjectiveConfig

    images = torch.linspace(-1, 1, 3 * 3 * 16 * 16).reshape(3, 3, 16, 16)
    prompts = ["a sks dog", "a sks cat", "a sks mug"]
    objective = ConceptObjective.from_pipeline(
        tiny_pipe,
        images,
        token="sks",
        class_word="dog",
        subject_prompts=prompts,
        config=ObjectiveConfig(batch_size=8, seed=3),
    )
    batch = objective.draw(0)
    for row in range(8):
        image = next(i for i in range(3) if torch.equal(objective.subject_latents[i], batch.latents[row]))
        assert torch.equal(batch.prompt_embeds[row], objective.subject_embeds[image])
    with pytest.raises(ValueError, match="one prompt per image"):
        ConceptObjective.from_pipeline(
            tiny_pipe, images, token="sks", class_word="dog", subject_prompts=prompts[:2]
        )
