"""The embedded world model that cones ships: loads offline in standard classes, small, generates."""

import math
import os

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

import cones_world as world


def test_shipped_weights_are_small():
    total = 0
    for root, _, files in os.walk(world.WEIGHTS):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    assert total < 40 * 1024 * 1024


def test_stable_diffusion_pipeline_loads_it_offline(monkeypatch):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(world.model_path())
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red star on a sea background", num_inference_steps=3, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)
    assert pipe.tokenizer.tokenize("a sks circle") == ["a</w>", "sks</w>", "circle</w>"]


def test_clip_loads_and_prefers_the_true_caption():
    from PIL import Image

    from cones.evaluate import ClipScorer
    from cones_world.render import render
    from cones_world.scene import Background, Scene, Thing

    scorer = ClipScorer()
    scene = Scene(Background("grass"), (Thing("square", "blue", "big", x=0.5, y=0.6, radius=0.25),))
    emb = scorer.images([Image.fromarray(render(scene))])
    texts = scorer.texts(["a big blue square on a grass background", "a big red star on a night background"])
    sims = (emb @ texts.T)[0]
    assert sims[0] > sims[1]


@pytest.mark.slow
def test_training_code_runs_every_phase_and_exports(tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    from cones_world.train import TrainConfig, train

    cfg = TrainConfig(
        out=str(tmp_path),
        device="cpu",
        pool_size=48,
        workers=1,
        vae_steps=2,
        vae_batch=4,
        unet_steps=2,
        unet_batch=4,
        clip_steps=2,
        clip_batch=8,
        checkpoint_every=1,
    )
    report = train(cfg)
    assert set(report["seconds"]) >= {"render", "vae", "unet", "clip"}
    # the pool's latents are kept for a resumed run, under the fingerprint of the VAE that made them
    assert len([f for f in os.listdir(tmp_path) if f.startswith("latents-48-")]) == 1
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(tmp_path, "sd"))
    assert pipe.vae.config.scaling_factor > 0
    CLIPModel.from_pretrained(os.path.join(tmp_path, "clip"))
    # a second run resumes from the finished checkpoints instead of training again: same weights out
    first = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    train(cfg)
    state = torch.load(os.path.join(tmp_path, "checkpoint-unet.pt"), weights_only=False)
    assert state["step"] == 2 and state["finished"]
    again = StableDiffusionPipeline.from_pretrained(os.path.join(tmp_path, "sd")).unet.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    # exporting the checkpoint as it stands gives the same model as the finished phase did
    os.rename(os.path.join(tmp_path, "sd"), os.path.join(tmp_path, "finished"))
    train(cfg, ("export",))
    exported = StableDiffusionPipeline.from_pretrained(os.path.join(tmp_path, "sd")).unet.state_dict()
    assert all(torch.equal(first[k], exported[k]) for k in first)


@pytest.mark.slow
def test_a_unet_phase_can_read_a_frozen_clip_text_tower(tmp_path):
    """Stable Diffusion's recipe: the text encoder is a CLIP's text tower, kept fixed; its tokenizer comes
    with it, cut to the diffusion model's length and words, and the exported pipeline holds both."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from cones_world import models
    from cones_world.train import TrainConfig, train

    cfg = TrainConfig(
        out=str(tmp_path),
        device="cpu",
        pool_size=16,
        workers=1,
        unet_steps=2,
        unet_batch=4,
        init_from=world.model_path(),
        text_encoder_from=world.clip_path(),
        checkpoint_every=1,
    )
    # the shipped diffusion tokenizer already in `out` (as tools/train_world_on_gpu.sh puts it) gives way
    CLIPTokenizer.from_pretrained(world.model_path(), subfolder="tokenizer").save_pretrained(
        tmp_path / "tokenizer"
    )
    train(cfg, ("unet",))
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(tmp_path, "sd"))
    tower = CLIPTextModel.from_pretrained(world.clip_path(), torch_dtype=torch.float32).state_dict()
    exported = pipe.text_encoder.float().state_dict()
    assert all(torch.equal(tower[k].half().float(), exported[k]) for k in tower)  # frozen (shipped in fp16)
    clip_vocab = CLIPTokenizer.from_pretrained(world.clip_path()).get_vocab()
    assert pipe.tokenizer.get_vocab().items() <= clip_vocab.items()  # the tower's ids, fewer words
    assert len(pipe.tokenizer.tokenize("stripes")) > 1 and pipe.tokenizer.tokenize("circle") == ["circle</w>"]
    assert pipe.tokenizer.model_max_length == models.MAX_TOKENS
    slow = CLIPTokenizer(
        vocab=str(tmp_path / "sd" / "tokenizer" / "vocab.json"),
        merges=str(tmp_path / "sd" / "tokenizer" / "merges.txt"),
    )
    for text in ("a sks circle with white stripes", "a big red star next to a blue square"):
        assert (
            slow(text).input_ids == pipe.tokenizer(text).input_ids
        )  # the BPE files agree with tokenizer.json
    shipped = StableDiffusionPipeline.from_pretrained(world.model_path()).unet.state_dict()
    assert not all(torch.equal(shipped[k], v) for k, v in pipe.unet.state_dict().items())  # the UNet learned


@pytest.mark.slow
def test_a_clip_can_learn_the_diffusion_captions_alone(tmp_path):
    """A text tower to condition a UNet on must not know the detail words that would name the subjects."""
    from transformers import CLIPModel

    from cones_world.train import TrainConfig, train

    cfg = TrainConfig(
        out=str(tmp_path),
        device="cpu",
        pool_size=16,
        workers=1,
        clip_steps=2,
        clip_batch=8,
        clip_captions="diffusion",
        init_from=world.model_path(),
    )
    train(cfg, ("clip",))
    clip = tmp_path / "clip"
    vocab = CLIPTokenizer.from_pretrained(clip).get_vocab()
    assert vocab == CLIPTokenizer.from_pretrained(world.model_path(), subfolder="tokenizer").get_vocab()
    assert "stripes</w>" not in vocab and "sks</w>" in vocab
    with (
        open(clip / "vocab.json") as a,
        open(os.path.join(world.model_path(), "tokenizer", "vocab.json")) as b,
    ):
        assert a.read() == b.read()
    assert CLIPModel.from_pretrained(clip).config.text_config.hidden_size == 192
    with pytest.raises(ValueError, match="--clip-captions 'both' is not one of 'detailed', 'diffusion'"):
        train(TrainConfig(out=str(tmp_path / "run"), clip_captions="both"), ("clip",))


def test_a_text_encoder_source_that_cannot_serve_is_refused_before_any_work(tmp_path):
    from transformers import CLIPTextConfig

    from cones_world.train import TrainConfig, train

    with pytest.raises(FileNotFoundError, match="has no config.json; pass a transformers CLIPModel folder"):
        train(TrainConfig(out=str(tmp_path / "run"), text_encoder_from=str(tmp_path)), ("unet",))
    CLIPTextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has text width 64, but the world UNet's cross-attention reads 192"):
        train(TrainConfig(out=str(tmp_path / "run"), text_encoder_from=str(tmp_path)), ("unet",))
    assert not (tmp_path / "run").exists()  # refused before the pool was rendered


def test_a_resumed_phase_goes_on_with_the_time_already_spent(tmp_path):
    """The wall-clock cap and the cosine schedule count the seconds of every run of a phase, so that an
    interrupted time-capped run does not start its learning rate over when it resumes."""
    from cones_world.train import Phase, TrainConfig

    cfg = TrainConfig(out=str(tmp_path), phase_seconds={"unet": 100.0})
    layer = torch.nn.Linear(2, 2)

    def phase():
        return Phase(cfg, "unet", 10**6, {"layer": layer}, torch.optim.SGD(layer.parameters(), lr=0.1))

    first = phase()
    first.seconds_before = 60.0  # as if the first run had trained for a minute before it was killed
    first.save()
    resumed = phase()
    assert 0.6 <= resumed.progress() < 0.7
    assert resumed.lr(1.0, warmup=0) < 0.5 * (1 + math.cos(math.pi * 0.6)) + 1e-6
    assert resumed.should_continue()
    resumed.seconds_before = 101.0
    resumed.save()
    assert not phase().should_continue()


def test_the_probe_finds_the_one_direction_that_separates_two_classes():
    from cones.evaluate import roc_auc
    from cones_world.concepts import fit_probe

    g = torch.Generator().manual_seed(0)

    def sample(n, shift):
        x = torch.randn(n, 16, generator=g) * torch.linspace(0.5, 3.0, 16)  # loud dimensions everywhere
        x[:, 5] = (
            torch.randn(n, generator=g) * 0.3 + shift
        )  # ... and a quiet one that tells the classes apart
        return x

    mean, scale, weight, bias = fit_probe(sample(300, 1.0), sample(300, 0.0))
    assert int(weight.abs().argmax()) == 5

    def logit(x):
        return ((x - mean) / scale) @ weight + bias

    assert roc_auc(logit(sample(200, 1.0)).numpy(), logit(sample(200, 0.0)).numpy()) > 0.95


def test_the_threshold_splits_two_separated_sets_in_the_middle_of_their_gap():
    from cones_world.concepts import best_threshold

    assert best_threshold(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.5
    assert (
        best_threshold(np.array([0.0, 1.0, 3.0]), np.array([-1.0])) == -0.5
    )  # everything above a lone negative
    # Overlapping sets: the split with the best balanced accuracy (here 5/6), halfway between two scores.
    assert best_threshold(np.array([1.5, 2.0, 3.0]), np.array([0.0, 1.0, 2.5])) == 1.25


def test_the_subject_detector_tells_a_subject_from_its_class_on_renders():
    from cones.evaluate import ClipScorer
    from cones_world.concepts import pictures, subject_detector
    from cones_world.subjects import SUBJECTS

    scorer = ClipScorer()
    subject = SUBJECTS["striped-circle"]
    detector = subject_detector(scorer, subject, n=40, n_fit=120)
    assert detector.auc > 0.95
    fresh = scorer.images(pictures(subject, subject.held_out(20, seed=7)))
    others = scorer.images(pictures(subject, subject.class_negatives(20, seed=7)))
    assert detector.present(fresh).float().mean() > 0.8
    assert detector.present(others).float().mean() < 0.2


@pytest.mark.slow
def test_the_detector_for_generated_images_learns_renders_as_the_vae_returns_them():
    from diffusers import AutoencoderKL

    from cones.evaluate import ClipScorer
    from cones_world.concepts import pictures, subject_detector, through_vae
    from cones_world.subjects import SUBJECTS

    vae = AutoencoderKL.from_pretrained(world.model_path(), subfolder="vae").eval()
    renders = pictures(SUBJECTS["striped-circle"], SUBJECTS["striped-circle"].held_out(3, seed=7))
    decoded = through_vae(vae, renders, batch=2)  # two batches
    assert [im.size for im in decoded] == [im.size for im in renders]
    difference = [
        np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()
        for a, b in zip(renders, decoded, strict=True)
    ]
    assert all(0 < d < 25 for d in difference)  # close to the render, but not the render itself

    scorer = ClipScorer()
    subject = SUBJECTS["striped-circle"]
    detector = subject_detector(scorer, subject, n=40, n_fit=120, vae=vae)
    assert detector.decoded and detector.auc > 0.95
    fresh = scorer.images(through_vae(vae, pictures(subject, subject.held_out(20, seed=7))))
    others = scorer.images(through_vae(vae, pictures(subject, subject.class_negatives(20, seed=7))))
    assert detector.present(fresh).float().mean() > 0.8
    assert detector.present(others).float().mean() < 0.2


def test_a_cached_detector_is_read_back_whole_and_only_for_the_same_inputs(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from cones.evaluate import ClipScorer
    from cones_world import concepts
    from cones_world.subjects import SUBJECTS

    vae = AutoencoderKL.from_pretrained(world.model_path(), subfolder="vae").eval()
    scorer, subject = ClipScorer(), SUBJECTS["dotted-triangle"]
    fitted = concepts.subject_detector(scorer, subject, n=8, n_fit=24, vae=vae, cache_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == 1

    def no_fitting(*args):
        raise AssertionError("refitted a cached detector")

    monkeypatch.setattr(concepts, "_fit_detector", no_fitting)
    cached = concepts.subject_detector(scorer, subject, n=8, n_fit=24, vae=vae, cache_dir=str(tmp_path))
    for field in ("references", "mean", "scale", "weight"):
        assert torch.equal(getattr(cached, field), getattr(fitted, field))
    for field in ("bias", "threshold", "auc", "similarity_auc", "decoded"):
        assert getattr(cached, field) == getattr(fitted, field)
    with pytest.raises(AssertionError, match="refitted"):  # other sizes, another subject, no VAE: a new key
        concepts.subject_detector(scorer, subject, n=8, n_fit=32, vae=vae, cache_dir=str(tmp_path))
    with pytest.raises(AssertionError, match="refitted"):
        concepts.subject_detector(
            scorer, SUBJECTS["smiling-star"], n=8, n_fit=24, vae=vae, cache_dir=str(tmp_path)
        )
    with pytest.raises(AssertionError, match="refitted"):
        concepts.subject_detector(scorer, subject, n=8, n_fit=24, cache_dir=str(tmp_path))
    with torch.no_grad():  # another VAE
        next(vae.parameters()).add_(1e-3)
    with pytest.raises(AssertionError, match="refitted"):
        concepts.subject_detector(scorer, subject, n=8, n_fit=24, vae=vae, cache_dir=str(tmp_path))


def test_a_continued_model_keeps_its_vocabulary(tmp_path):
    from transformers import CLIPTokenizer

    from cones_world.train import world_tokenizers

    sd = os.path.join(world.WEIGHTS, "sd")
    clip = os.path.join(world.WEIGHTS, "clip")
    sd_tokenizer, clip_tokenizer = world_tokenizers(str(tmp_path), sd, clip)

    assert sd_tokenizer.get_vocab() == CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer").get_vocab()
    assert clip_tokenizer.get_vocab() == CLIPTokenizer.from_pretrained(clip).get_vocab()


def test_exporting_a_run_that_never_trained_the_unet_says_so(tmp_path):
    from cones_world.train import TrainConfig, train

    cfg = TrainConfig(
        out=str(tmp_path),
        device="cpu",
        pool_size=8,
        workers=1,
        vae_steps=1,
        vae_batch=4,
        init_from=os.path.join(world.WEIGHTS, "sd"),
    )
    with pytest.raises(FileNotFoundError, match="no UNet checkpoint to export.*--out of a run"):
        train(cfg, ("export",))


def test_decoded_images_keep_their_own_captions():
    """The CLIP sees some pool images as the VAE returns them; each batch image still carries the index of
    the pool image it shows, so it is paired with that image's captions."""
    from cones_world.train import with_decoded

    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 2, 2, 3)
    decoded = 100 + images[:4]  # decoded copies exist for the first four pool images only
    idx = torch.tensor([0, 3, 5, 9, 6, 2])
    use = torch.tensor([True, False, True, True, False, False])
    batch, which = with_decoded(images, decoded, idx, use)
    assert which.tolist() == [0, 3, 1, 1, 6, 2]
    assert batch[:, 0, 0, 0].tolist() == [100, 3, 101, 101, 6, 2]


def test_the_clip_phase_can_see_decoded_images_and_caches_them(tmp_path, monkeypatch):
    from cones_world import train as training

    cfg = training.TrainConfig(
        out=str(tmp_path),
        device="cpu",
        pool_size=12,
        workers=1,
        clip_steps=1,
        clip_batch=4,
        clip_decoded_share=0.5,
        clip_decoded_pool=6,
        init_from=os.path.join(world.WEIGHTS, "sd"),
        clip_init_from=os.path.join(world.WEIGHTS, "clip"),
    )
    training.train(cfg, ("clip",))
    (cache,) = [f for f in os.listdir(tmp_path) if f.startswith("decoded-6-")]
    decoded = torch.load(os.path.join(tmp_path, cache))
    pool = torch.from_numpy(training.render_pool(cfg)["images"])
    assert decoded.shape == (6, *pool.shape[1:]) and decoded.dtype == torch.uint8
    # close to the renders (a good autoencoder) but not them (what generated images look like)
    diff = (decoded.float() - pool[:6].float()).abs().mean()
    assert 0 < diff < 12
    # the second time, the decoded images come from the cache, not from the VAE
    vae = training.AutoencoderKL.from_pretrained(cfg.init_from, subfolder="vae").eval()
    monkeypatch.setattr(vae, "encode", lambda *a, **k: pytest.fail("decoded again"))
    assert torch.equal(training.decode_pool(cfg, vae, pool), decoded)
