"""CLIP alignment, as the paper measures it (section 4.1, after Textual Inversion).

- Image alignment: mean cosine similarity, in CLIP image space, between generated images and the subject's
  reference images (every pair). For several subjects, the mean over subjects.
- Text alignment: mean cosine similarity between generated images and their prompt with the identifier
  tokens removed.

Works with any transformers `CLIPModel` folder (a user's ViT-L/14) and with the embedded world CLIP by
default. Preprocessing is CLIP's (resize the short side, centre crop, normalise), done with PIL and numpy
so that no image library beyond Pillow is needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """Embeds images and texts with a CLIP model; every embedding is L2-normalised."""

    def __init__(self, path: str | None = None, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPTokenizer

        from cones.registry import default_model

        path = path or default_model().clip_path
        if path is None:
            raise FileNotFoundError(
                "the default model has no evaluation CLIP; pass `--clip` a CLIPModel folder."
            )
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"`--clip` {path!r} is not a folder; pass a transformers CLIPModel folder."
            )
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(path, torch_dtype=torch.float32).to(self.device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(path)
        self.size = self.model.config.vision_config.image_size
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        config = os.path.join(path, "preprocessor_config.json")
        if os.path.exists(config):
            with open(config) as f:
                pre = json.load(f)
            self.mean, self.std = pre.get("image_mean", CLIP_MEAN), pre.get("image_std", CLIP_STD)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> (n, 3, size, size) normalised pixels."""
        out = []
        for im in images:
            im = im.convert("RGB")
            scale = self.size / min(im.size)
            w, h = max(self.size, round(im.width * scale)), max(self.size, round(im.height * scale))
            im = im.resize((w, h), Image.BICUBIC)
            left, top = (w - self.size) // 2, (h - self.size) // 2
            im = im.crop((left, top, left + self.size, top + self.size))
            out.append((np.asarray(im, np.float32) / 255.0 - self.mean) / self.std)
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()

    @torch.no_grad()
    def images(
        self, images: Sequence[Image.Image], batch_size: int = 64, grid_shifts: bool = False
    ) -> torch.Tensor:
        """(n, d) normalised image embeddings.

        With `grid_shifts`, each is the mean over the image and four copies moved a quarter patch up, down,
        left and right (edge pixels repeated): what a ViT makes of a small shape depends on where its patch
        grid cuts it, and the mean does not. Zero-shot choices use it; the alignments keep the single view
        that the paper and the literature measure with."""
        normalize = torch.nn.functional.normalize

        def embed(pixels: torch.Tensor) -> torch.Tensor:
            return _features(self.model.get_image_features(pixel_values=pixels)).float()

        shift = self.model.config.vision_config.patch_size // 4
        chunks = []
        for i in range(0, len(images), batch_size):
            pixels = self.preprocess(images[i : i + batch_size]).to(self.device)
            chunks.append(
                sum(normalize(embed(v), dim=-1) for v in shifted_views(pixels, shift))
                if grid_shifts
                else embed(pixels)
            )
        return normalize(torch.cat(chunks), dim=-1)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, d) normalised text embeddings."""
        ids = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        feats = _features(
            self.model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
        )
        return torch.nn.functional.normalize(feats.float(), dim=-1)


def shifted_views(pixels: torch.Tensor, shift: int) -> list[torch.Tensor]:
    """(n, 3, h, w) pixels, then the same moved `shift` pixels right, left, down and up, edges repeated."""
    if shift < 1:
        return [pixels]
    h, w = pixels.shape[-2:]
    padded = torch.nn.functional.pad(pixels, (shift, shift, shift, shift), mode="replicate")
    offsets = ((0, 0), (-shift, 0), (shift, 0), (0, -shift), (0, shift))  # (dx, dy) of the crop window
    return [padded[..., shift + dy : shift + dy + h, shift + dx : shift + dx + w] for dx, dy in offsets]


def _features(out) -> torch.Tensor:
    """transformers returns a tensor or, in newer versions, an output object holding the pooled features."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]


def image_alignment(generated: torch.Tensor, references: torch.Tensor) -> float:
    """Mean cosine similarity over all (generated, reference) pairs of normalised embeddings."""
    return float((generated @ references.T).mean())


def text_alignment(generated: torch.Tensor, prompt: torch.Tensor) -> float:
    """Mean cosine similarity of normalised image embeddings to one normalised prompt embedding."""
    return float((generated @ prompt.reshape(-1)).mean())


def strip_identifiers(prompt: str, tokens: Sequence[str]) -> str:
    """The prompt with the identifier words removed ("a sks dog" -> "a dog"), articles mended."""
    words = [w for w in prompt.split() if w not in set(tokens)]
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = "an" if words[i + 1][0] in "aeiou" else "a"
    return " ".join(words)


def roc_auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative."""
    pos, neg = np.asarray(positives, float), np.asarray(negatives, float)
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def score(scorer, rows, prompts: Sequence[str], references: dict, tokens: Sequence[str]) -> dict:
    """Text and image alignment of `rows[i]` (PIL images of `prompts[i]`) against each subject's references.

    `references` maps a subject's name to its (r, d) normalised CLIP image embeddings; `tokens` are the
    identifiers removed from the prompts before text alignment.
    """
    if len(rows) != len(prompts) or any(len(r) == 0 for r in rows):
        raise ValueError(
            f"give a non-empty row of images per prompt, got {[len(r) for r in rows]} for {len(prompts)} prompts."
        )
    stripped = [strip_identifiers(p, list(tokens)) for p in prompts]
    texts = scorer.texts(stripped)  # (prompts, d)
    per_prompt, all_embeddings = [], []
    for i, row in enumerate(rows):
        emb = scorer.images(list(row))  # (images, d)
        all_embeddings.append(emb)
        per_prompt.append(
            {
                "prompt": prompts[i],
                "stripped": stripped[i],
                "images": len(row),
                "text_alignment": text_alignment(emb, texts[i]),
                "image_alignment": {name: image_alignment(emb, ref) for name, ref in references.items()},
            }
        )
    emb = torch.cat(all_embeddings)
    subjects = {name: image_alignment(emb, ref) for name, ref in references.items()}
    return {
        "text_alignment": sum(p["text_alignment"] for p in per_prompt) / len(per_prompt),
        "image_alignment": sum(subjects.values()) / len(subjects),
        "image_alignment_per_subject": subjects,
        "num_prompts": len(prompts),
        "num_images": int(emb.shape[0]),
        "per_prompt": per_prompt,
    }


def markdown(result: dict) -> str:
    """A readable table of a `score` result: the totals, then one line per prompt."""
    names = list(result["image_alignment_per_subject"])
    head = "| prompt (identifiers removed) | images | text alignment | image alignment |" + "".join(
        f" {n} |" for n in names
    )
    rule = "|---|---:|---:|---:|" + "---:|" * len(names)
    total = (
        f"| **all prompts** | {result['num_images']} | **{result['text_alignment']:.3f}** | "
        f"**{result['image_alignment']:.3f}** |"
        + "".join(f" {v:.3f} |" for v in result["image_alignment_per_subject"].values())
    )
    lines = [head, rule, total]
    for p in result["per_prompt"]:
        mean = sum(p["image_alignment"].values()) / len(p["image_alignment"])
        lines.append(
            f"| {p['stripped']} | {p['images']} | {p['text_alignment']:.3f} | {mean:.3f} |"
            + "".join(f" {v:.3f} |" for v in p["image_alignment"].values())
        )
    return "\n".join(lines) + "\n"


# -- the text pathway -----------------------------------------------------------------------------------------


@torch.no_grad()
def text_states(pipe, prompt: str) -> torch.Tensor:
    """(text positions, width): the text encoder's output for `prompt`, padded as the pipeline pads it."""
    tok = pipe.tokenizer
    ids = tok(
        prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    )
    return pipe.text_encoder(ids.input_ids.to(pipe.text_encoder.device))[0][0].float()


def text_pathway(pipe, subject_prompt: str, class_prompt: str, other_prompt: str) -> dict[str, float]:
    """Whether a model's text encoder keeps words apart, which concept neurons need: the mean cosine between
    the output states of `subject_prompt`'s words (1: every word reads the same, and no cross-attention edit
    can single one out), how far its identifier moves the whole conditioning (1 - cosine of "a sks circle"
    against `class_prompt` "a circle", all positions together), and the same for an ordinary word
    (`other_prompt`, "a red circle")."""
    n = len(pipe.tokenizer(subject_prompt).input_ids) - 2
    words = torch.nn.functional.normalize(text_states(pipe, subject_prompt)[1 : 1 + n], dim=-1)
    off = ~torch.eye(n, dtype=torch.bool)

    def moved(a: str, b: str) -> float:
        flat_a, flat_b = text_states(pipe, a).flatten(), text_states(pipe, b).flatten()
        return 1 - float(torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0))

    return {
        "word_state_cosine": float((words @ words.T)[off].mean()),
        "identifier_moves": moved(subject_prompt, class_prompt),
        "word_moves": moved(other_prompt, class_prompt),
    }
