"""The world's subjects as concept-search problems: reference images, prompts, and a subject detector.

What a user brings to `cones find` (a folder of photos, an identifier, a class word), the world provides for
each subject in its catalogue, together with what a user cannot have: held-out renders and a detector that
says whether a generated image shows the subject.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cones.evaluate import ClipScorer, roc_auc
from cones.images import to_tensor
from cones.refine import SubjectData
from cones.world.render import render
from cones.world.scene import BACKGROUNDS, SHAPES
from cones.world.subjects import Subject


def pictures(scenes) -> list[Image.Image]:
    return [Image.fromarray(render(scene)) for scene, *_ in scenes]


def references(subject: Subject, n: int = 5) -> tuple[torch.Tensor, list[Image.Image], list[str] | None]:
    """The subject's reference images as a tensor and as pictures, with per-image prompts for accessories."""
    refs = subject.references(n)
    images = pictures(refs)
    prompts = [subject.prompt("{token}", carrier) for _, carrier in refs] if subject.kind == "accessory" else None
    return to_tensor(images), images, prompts


def search_prompts(subject: Subject, token: str) -> tuple[list[str] | None, list[str]]:
    """Per-image subject prompts (accessories only) and the class prompts for prior preservation."""
    refs = subject.references(5)
    subject_prompts = (
        [subject.prompt(token, carrier) for _, carrier in refs] if subject.kind == "accessory" else None
    )
    if subject.kind == "accessory":
        class_prompts = [subject.prompt(None, shape) for shape in SHAPES]
    else:
        class_prompts = [subject.prompt(None)]
    return subject_prompts, class_prompts


def subject_data(subject: Subject, token: str) -> SubjectData:
    """A world subject as the multi-subject searches take it: references, prompts and class prompts."""
    images, _, _ = references(subject)
    subject_prompts, class_prompts = search_prompts(subject, token)
    return SubjectData(
        images, token, subject.class_word, subject_prompts=subject_prompts, class_prompts=class_prompts
    )


def eval_prompts(subject: Subject, token: str | None) -> list[str]:
    """Prompts that ask for the subject in several contexts (without `token`: the class prompts)."""
    places = [b for b in BACKGROUNDS if b != subject.class_word]
    if subject.kind == "object":
        base = subject.prompt(token)
        return [base] + [f"{base} on a {b} background" for b in places[:5]]
    if subject.kind == "background":
        bg = " ".join(subject.prompt(token).split()[1:])  # "sks sea background"
        return [subject.prompt(token)] + [
            f"a {size} {colour} {shape} on a {bg}"
            for size, colour, shape in (("big", "red", "circle"), ("small", "yellow", "star"),
                                        ("big", "white", "square"), ("small", "green", "heart"),
                                        ("big", "pink", "diamond"))
        ]
    return [subject.prompt(token, shape) for shape in SHAPES[:6]]


@dataclass
class SubjectDetector:
    """Says whether an image shows the subject: CLIP similarity to the references, minus to the class.

    The threshold is the one that best separates held-out renders of the subject from renders of its class
    without it; `auc` is the ROC AUC of that separation.
    """

    references: torch.Tensor  # (r, d) normalised embeddings of the reference images
    negatives: torch.Tensor  # (m, d) embeddings of class renders without the subject
    threshold: float
    auc: float

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        return (embeddings @ self.references.T).mean(1) - (embeddings @ self.negatives.T).mean(1)

    def present(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.scores(embeddings) > self.threshold


def subject_detector(scorer: ClipScorer, subject: Subject, n: int = 200) -> SubjectDetector:
    """Calibrate a detector on held-out renders (positives) and class renders without the subject."""
    refs = scorer.images(references(subject)[1])
    negatives = scorer.images(pictures([(s,) for s in subject.class_negatives(64, seed=1)]))
    probe = SubjectDetector(refs, negatives, 0.0, 0.0)
    pos = probe.scores(scorer.images(pictures(subject.held_out(n)))).numpy()
    neg = probe.scores(scorer.images(pictures([(s,) for s in subject.class_negatives(n, seed=2)]))).numpy()
    candidates = np.sort(np.concatenate([pos, neg]))
    accuracy = [((pos > t).mean() + (neg <= t).mean()) / 2 for t in candidates]
    probe.threshold = float(candidates[int(np.argmax(accuracy))])
    probe.auc = roc_auc(pos, neg)
    return probe


def score_subject(
    pipe,
    scorer: ClipScorer,
    subject: Subject,
    detector: SubjectDetector,
    token: str,
    seeds=range(4),
    steps: int = 25,
    guidance_scale: float = 5.0,
) -> dict:
    """Generate the subject's evaluation prompts with the pipeline as it is (concepts applied or not).

    Returns the images and: image alignment to the references, text alignment to the prompts without the
    identifier, and the share of images in which the detector sees the subject.
    """
    from cones.evaluate import image_alignment, strip_identifiers, text_alignment
    from cones.generate import generate

    prompts = eval_prompts(subject, token)
    rows = generate(pipe, prompts, list(seeds), steps=steps, guidance_scale=guidance_scale)
    flat = [im for row in rows for im in row]
    emb = scorer.images(flat)
    texts = scorer.texts([strip_identifiers(p, [token]) for p in prompts])
    per_prompt = emb.view(len(prompts), len(seeds), -1)
    return {
        "images": rows,
        "prompts": prompts,
        "image_alignment": image_alignment(emb, detector.references),
        "text_alignment": float(np.mean([text_alignment(per_prompt[i], texts[i]) for i in range(len(prompts))])),
        "subject_rate": float(detector.present(emb).float().mean()),
    }
