"""Identifier words as trainable embedding rows, and the objectives that see them.

A `ConceptObjective` encodes its prompts once, with the frozen text encoder. When a baseline trains an
identifier's embedding row (Custom Diffusion, Textual Inversion), `TokenObjective` re-encodes the identifier
prompts at every step through `TokenEmbeddings`, so that the gradient reaches the row; the text encoder itself
is never modified. Several subjects train jointly through `JointObjective`: the steps take turns over the
subjects, so `steps = n · per-subject steps` gives each subject the steps it would have alone, as in the paper
(appendix B: "training steps increase linearly as the number of involved subjects increases").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cones.objective import ConceptObjective

__all__ = ["JointObjective", "TokenEmbeddings", "TokenObjective", "token_id"]


def token_id(tokenizer, word: str, name: str = "token") -> int:
    """The vocabulary id of `word`, which must be one token of `tokenizer` (e.g. "sks")."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(
            f"`{name}` {word!r} is {len(ids)} tokens for this tokenizer; pass a word that is a single token "
            "(a rare identifier such as 'sks', or one word that sums up a class, e.g. 'pot' for 'wooden pot')."
        )
    return int(ids[0])


def _embedding_weight(text_encoder: nn.Module) -> tuple[str, nn.Parameter]:
    """(parameter name, parameter) of the text encoder's token-embedding matrix (vocab, dim)."""
    weight = text_encoder.get_input_embeddings().weight
    for name, param in text_encoder.named_parameters():
        if param is weight:
            return name, param
    raise ValueError("`text_encoder` has no token-embedding parameter; pass a CLIPTextModel.")


class TokenEmbeddings:
    """Trainable embedding rows for some identifier words, used in place of the text encoder's own rows.

    The text encoder itself is never modified: `encode` calls it functionally with an embedding matrix in
    which the rows of `words` are these parameters, so gradients of the output reach only the rows.

    Args:
        text_encoder: a frozen CLIP text encoder.
        tokenizer: its tokenizer; every word must be a single token.
        init: word -> initial row (dim,), e.g. the word's current row (Custom Diffusion) or the class
            word's row (Textual Inversion).
    """

    def __init__(self, text_encoder: nn.Module, tokenizer, init: dict[str, torch.Tensor]) -> None:
        if not init:
            raise ValueError("`init` is empty; give at least one word and its initial embedding row.")
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.weight_name, weight = _embedding_weight(text_encoder)
        self.words = list(init)
        self.ids = {word: token_id(tokenizer, word) for word in self.words}
        for word, row in init.items():
            if tuple(row.shape) != (weight.shape[1],):
                raise ValueError(
                    f"`init[{word!r}]` has shape {tuple(row.shape)}; the text encoder's rows have ({weight.shape[1]},)."
                )
        self.rows = [
            nn.Parameter(init[w].detach().to(weight.device, torch.float32).clone()) for w in self.words
        ]

    def matrix(self) -> torch.Tensor:
        """The embedding matrix (vocab, dim) with the trained rows in place; differentiable in the rows."""
        weight = self.text_encoder.get_input_embeddings().weight.detach()
        index = torch.tensor([self.ids[w] for w in self.words], device=weight.device)
        rows = torch.stack(self.rows).to(weight.dtype)  # (words, dim)
        return weight.index_put((index,), rows)

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> (n, model_max_length) ids, padded as `ConceptObjective` pads them."""
        tok = self.tokenizer
        return tok(
            list(prompts),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def mentions(self, prompts: Sequence[str]) -> bool:
        """Whether any prompt holds one of the trained words."""
        ids = self.token_ids(prompts)
        return bool(torch.isin(ids, torch.tensor(list(self.ids.values()))).any())

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> (n, model_max_length, dim) text-encoder output with the trained rows in place."""
        encoder = self.text_encoder
        ids = self.token_ids(prompts).to(encoder.device)  # (n, L)
        out = torch.func.functional_call(encoder, {self.weight_name: self.matrix()}, (ids,))
        return out[0]  # (n, L, dim) last hidden state, as `ConceptObjective` uses

    def values(self) -> dict[str, torch.Tensor]:
        """word -> current row (dim,), detached, float32, on the CPU."""
        return {w: row.detach().float().cpu().clone() for w, row in zip(self.words, self.rows, strict=True)}


class TokenObjective:
    """A `ConceptObjective` whose prompts with trained words are re-encoded through `embeddings` each step.

    It evaluates `objective` itself (same latents, prompts, configuration and seed, so the same batches,
    timesteps and noise), lending it freshly encoded prompt embeddings for the duration of each `loss`
    call; `objective` is left as it was. While the rows equal the text encoder's own rows, its loss is the
    objective's loss.
    """

    def __init__(self, objective: ConceptObjective, embeddings: TokenEmbeddings) -> None:
        self.objective = objective
        self.embeddings = embeddings
        self.token, self.class_word = objective.token, objective.class_word
        self.unet, self.config = objective.unet, objective.config
        self._subject_has_words = embeddings.mentions(objective.subject_prompts)
        self._class_has_words = embeddings.mentions(objective.class_prompts)

    def loss(self, step: int) -> torch.Tensor:
        """L_sub + λ·L_pr at `step`, differentiable in the UNet's weights and in the embedding rows."""
        obj = self.objective
        frozen = obj.subject_embeds, obj.class_embeds
        try:
            if self._subject_has_words:
                obj.subject_embeds = self.embeddings.encode(obj.subject_prompts).to(obj.device, obj.dtype)
            if self._class_has_words:
                obj.class_embeds = self.embeddings.encode(obj.class_prompts).to(obj.device, obj.dtype)
            return obj.loss(step)
        finally:
            obj.subject_embeds, obj.class_embeds = frozen


class JointObjective:
    """Several subjects' objectives trained as one: step k is step k // n of subject k mod n.

    The subjects take turns, so every subject sees its own sequence of batches, and n·S steps give each of
    them the S steps it would have had alone.
    """

    def __init__(self, objectives: Sequence[ConceptObjective]) -> None:
        if len(objectives) == 0:
            raise ValueError("`objectives` is empty; pass one ConceptObjective per subject.")
        self.objectives = list(objectives)

    def loss(self, step: int) -> torch.Tensor:
        n = len(self.objectives)
        return self.objectives[step % n].loss(step // n)
