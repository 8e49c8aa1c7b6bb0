"""The world's subjects as concept-search problems: reference images, prompts, and a subject detector.

What a user brings to `cones find` (a folder of photos, an identifier, a class word), the world provides for
each subject in its catalogue, together with what a user cannot have: held-out renders and a detector that
says whether a generated image shows the subject.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cones import GUIDANCE_SCALE
from cones.evaluate import ClipScorer, roc_auc
from cones.find import SubjectImages
from cones.images import to_tensor
from cones_world.subjects import Subject  # or world v2's: the same interface


def pictures(subject: Subject, scenes) -> list[Image.Image]:
    """Renders of `scenes` (each a scene or a (scene, ...) tuple), by the renderer of `subject`'s world."""
    return [
        Image.fromarray(subject.render(scene[0] if isinstance(scene, tuple) else scene)) for scene in scenes
    ]


def through_vae(vae, images: list[Image.Image], batch: int = 256) -> list[Image.Image]:
    """The images as the VAE returns them (encoded, decoded): what a UNet that drew them exactly would
    produce, since every generated image comes out of that decoder."""
    from cones_world.train import vae_roundtrip

    arrays = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images]))
    decoded = [vae_roundtrip(vae, arrays[i : i + batch]).cpu() for i in range(0, len(arrays), batch)]
    return [Image.fromarray(a) for a in torch.cat(decoded).numpy()]


def embed(scorer: ClipScorer, images: list[Image.Image], vae=None) -> torch.Tensor:
    """CLIP embeddings of `images`, passed through `vae` first when one is given (as generated images are)."""
    return scorer.images(through_vae(vae, images) if vae is not None else images)


def references(subject: Subject, n: int = 5) -> tuple[torch.Tensor, list[Image.Image], list[str] | None]:
    """The subject's reference images as a tensor and as pictures, with per-image prompts for accessories."""
    images = pictures(subject, subject.references(n))
    return to_tensor(images), images, subject.reference_prompts("{token}")


def find_subject_concept(
    pipe, subject: Subject, config=None, token: str = "sks", cache_dir=None, disable: bool = True
):
    """`cones.find.find_concept` on a world subject: its 5 references, per-image prompts for accessories,
    its class prompts for the prior; returns the `SearchResult`."""
    from cones.find import find_concept

    images, _, _ = references(subject)
    return find_concept(
        pipe,
        images,
        token=token,
        class_word=subject.class_word,
        config=config,
        subject_prompts=subject.reference_prompts(token),
        class_prompts=subject.prior_prompts(),
        cache_dir=cache_dir,
        disable=disable,
    )


def subject_data(subject: Subject, token: str) -> SubjectImages:
    """A world subject as the multi-subject searches take it: references, prompts and class prompts."""
    images, _, _ = references(subject)
    return SubjectImages(
        images,
        token,
        subject.class_word,
        subject_prompts=subject.reference_prompts(token),
        class_prompts=subject.prior_prompts(),
    )


@dataclass
class SubjectDetector:
    """Says whether an image shows the subject: a linear probe on the evaluation CLIP's image embeddings.

    Logistic regression, fitted on renders of the subject against renders of its class without it (the same
    shape, place or accessory in other looks). A probe rather than plain similarity to the references,
    because a subject can differ from its class in a detail that is a small part of the picture (a hat's
    band): the probe finds that detail's direction, where a mean similarity is swamped by everything else.
    `threshold` and `auc` are measured on other renders than those it was fitted on. A detector for generated
    images sees every render as the model's VAE returns it (`decoded`): its threshold then sits in the gap
    between the subject and its class as generated images can show them, not as crisp renders do.
    """

    references: torch.Tensor  # (r, d) normalised embeddings of the reference images (for image alignment)
    mean: torch.Tensor  # (d,) feature standardisation of the fitting embeddings
    scale: torch.Tensor  # (d,)
    weight: torch.Tensor  # (d,) the probe
    bias: float
    threshold: float
    auc: float
    similarity_auc: (
        float  # the plain detector's AUC (similarity to references minus to the class), to compare
    )
    decoded: bool = False  # fitted and measured on renders passed through a VAE

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The probe's logit per image: above `threshold` means the subject is there."""
        return ((embeddings - self.mean) / self.scale) @ self.weight + self.bias

    def present(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.scores(embeddings) > self.threshold


def fit_probe(
    positives: torch.Tensor, negatives: torch.Tensor, weight_decay: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """L2-regularised logistic regression (L-BFGS) on standardised features: (mean, scale, weight, bias)."""
    x = torch.cat([positives, negatives]).double()
    y = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))]).double()
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ weight + bias, y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return mean.float(), scale.float(), weight.detach().float(), float(bias.detach())


def best_threshold(positives: np.ndarray, negatives: np.ndarray) -> float:
    """The score threshold with the best balanced accuracy between the two sets (a score above it is a
    positive). Candidates lie halfway between neighbouring scores, so that two separated sets are split in
    the middle of their gap, not at the top negative score, which new negatives would exceed half the time."""
    scores = np.unique(np.concatenate([positives, negatives]))
    candidates = np.concatenate([scores[:1] - 1.0, (scores[:-1] + scores[1:]) / 2])
    accuracy = [((positives > t).mean() + (negatives <= t).mean()) / 2 for t in candidates]
    return float(candidates[int(np.argmax(accuracy))])


def subject_detector(
    scorer: ClipScorer,
    subject: Subject,
    n: int = 200,
    n_fit: int = 1000,
    vae=None,
    cache_dir: str | None = None,
) -> SubjectDetector:
    """Fit the probe on `n_fit` renders of the subject and as many of its class, then set its threshold and
    measure its ROC AUC on `n` other renders of each (seeds disjoint from the fitting ones). With `vae`, every
    one of those renders is first passed through it: the detector to judge that model's generated images.

    With `cache_dir`, a detector fitted before from the same CLIP, VAE, renders and sizes is read back instead
    (fitting one through a VAE takes about a minute of round trips on a CPU)."""
    path = None
    if cache_dir is not None:
        key = detector_key(scorer, subject, n, n_fit, vae)
        path = os.path.join(cache_dir, f"detector-{subject.name}-{key}.safetensors")
        if os.path.exists(path):
            return load_detector(path)
    detector = _fit_detector(scorer, subject, n, n_fit, vae)
    if path is not None:
        save_detector(detector, path)
    return detector


def _fit_detector(scorer: ClipScorer, subject: Subject, n: int, n_fit: int, vae) -> SubjectDetector:
    def renders(n: int, seed: int) -> torch.Tensor:  # the subject's held-out renders
        return embed(scorer, pictures(subject, subject.held_out(n, seed=seed)), vae)

    def class_renders(n: int, seed: int) -> torch.Tensor:  # its class without it
        return embed(scorer, pictures(subject, subject.class_negatives(n, seed=seed)), vae)

    refs = scorer.images(pictures(subject, subject.references()))
    mean, scale, weight, bias = fit_probe(renders(n_fit, seed=1), class_renders(n_fit, seed=3))
    pos_emb, neg_emb = renders(n, seed=0), class_renders(n, seed=2)
    detector = SubjectDetector(refs, mean, scale, weight, bias, 0.0, 0.0, 0.0, decoded=vae is not None)
    pos, neg = detector.scores(pos_emb).numpy(), detector.scores(neg_emb).numpy()
    detector.threshold, detector.auc = best_threshold(pos, neg), roc_auc(pos, neg)
    class_emb = class_renders(64, seed=1)
    pos, neg = ((e @ refs.T).mean(1) - (e @ class_emb.T).mean(1) for e in (pos_emb, neg_emb))
    detector.similarity_auc = roc_auc(pos.numpy(), neg.numpy())
    return detector


def detector_key(scorer: ClipScorer, subject: Subject, n: int, n_fit: int, vae) -> str:
    """A digest of everything a detector depends on: the CLIP's and the VAE's weights, the image
    normalisation, the sizes, and the subject's renders (so a change to the renderer or the subject shows)."""
    from cones.fingerprint import weights_fingerprint

    weights = [weights_fingerprint(scorer.model), weights_fingerprint(vae) if vae is not None else None]
    settings = [subject.name, n, n_fit, list(scorer.mean), list(scorer.std), weights]
    digest = hashlib.sha256(json.dumps(settings).encode())
    negatives = subject.class_negatives(2, seed=3)
    for image in pictures(subject, [*subject.references(), *subject.held_out(2, seed=1), *negatives]):
        digest.update(np.asarray(image).tobytes())
    return digest.hexdigest()[:16]


def save_detector(detector: SubjectDetector, path: str) -> None:
    """Write a detector as safetensors (tensors, and its numbers as metadata), atomically."""
    from safetensors.torch import save

    from cones import files

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tensors = {k: getattr(detector, k).contiguous() for k in ("references", "mean", "scale", "weight")}
    numbers = {k: getattr(detector, k) for k in ("bias", "threshold", "auc", "similarity_auc", "decoded")}
    files.write_bytes(path, save(tensors, metadata={"detector": json.dumps(numbers)}), overwrite=True)


def load_detector(path: str) -> SubjectDetector:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        numbers = json.loads(f.metadata()["detector"])
    return SubjectDetector(**tensors, **numbers)


def score_subject(
    pipe,
    scorer: ClipScorer,
    subject: Subject,
    detector: SubjectDetector,
    token: str,
    seeds=range(4),
    steps: int = 25,
    guidance_scale: float = GUIDANCE_SCALE,
) -> dict:
    """Generate the subject's evaluation prompts with the pipeline as it is (concepts applied or not).

    Returns the images and: image alignment to the references, text alignment to the prompts without the
    identifier, and the share of images in which the detector sees the subject.
    """
    from cones.evaluate import image_alignment, strip_identifiers, text_alignment
    from cones.generate import generate

    prompts = subject.eval_prompts(token)
    rows = generate(pipe, prompts, list(seeds), steps=steps, guidance_scale=guidance_scale)
    flat = [im for row in rows for im in row]
    emb = scorer.images(flat)
    texts = scorer.texts([strip_identifiers(p, [token]) for p in prompts])
    per_prompt = emb.view(len(prompts), len(seeds), -1)
    return {
        "images": rows,
        "prompts": prompts,
        "image_alignment": image_alignment(emb, detector.references),
        "text_alignment": float(
            np.mean([text_alignment(per_prompt[i], texts[i]) for i in range(len(prompts))])
        ),
        "subject_rate": float(detector.present(emb).float().mean()),
    }


@dataclass(frozen=True)
class WorldExample:
    """A world subject as `cones.registry.ExampleSubject`: what `cones refine --world-subject` and
    `cones evaluate --reference NAME` take in place of a folder of photos."""

    subject: Subject

    @property
    def name(self) -> str:
        return self.subject.name

    @property
    def kind(self) -> str:
        return self.subject.kind

    @property
    def class_word(self) -> str:
        return self.subject.class_word

    @property
    def description(self) -> str:
        return self.subject.description

    def reference_images(self) -> list[Image.Image]:
        return references(self.subject)[1]

    def subject_data(self, token: str) -> SubjectImages:
        return subject_data(self.subject, token)


def example_subjects() -> dict[str, WorldExample]:
    """The world's catalogue of subjects, by name, as the default model offers them."""
    from cones_world.subjects import SUBJECTS

    return {name: WorldExample(subject) for name, subject in SUBJECTS.items()}
