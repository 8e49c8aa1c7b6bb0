"""The one training loop of the three baselines: AdamW on the weights each of them trains.

The competitors of the paper's comparison (section 4.1, appendix B) differ only in *which* weights they
train, so one loop (`fit`) serves all three:

    DreamBooth          every UNet weight                                             (`baselines.dreambooth`)
    Custom Diffusion    cross-attention to_k / to_v + the identifier's embedding row   (`baselines.custom_diffusion`)
    Textual Inversion   the identifier's embedding row, initialised from the class word (`baselines.textual_inversion`)

All of them minimise the concept-implanting loss of `cones.objective` (subject loss + λ · prior
preservation), on the same images, class images, prompts and seed as the concept-neuron search: they are
handed the very `ConceptObjective`s the search uses. What training produces is a `BaselineWeights`
(`cones.baselines.weights`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from cones.baselines.tokens import JointObjective, TokenEmbeddings, TokenObjective
from cones.baselines.weights import BaselineWeights
from cones.objective import ConceptObjective
from cones.search import SearchProgress

__all__ = ["as_objectives", "fit"]


def as_objectives(objectives: ConceptObjective | Sequence[ConceptObjective]) -> list[ConceptObjective]:
    """One objective or several as a list, each subject with its own identifier."""
    objectives = list(objectives) if isinstance(objectives, (list, tuple)) else [objectives]
    if not objectives:
        raise ValueError("`objectives` is empty; pass one ConceptObjective per subject.")
    tokens = [o.token for o in objectives]
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"`objectives` share identifiers {tokens}; give each subject its own token.")
    return objectives


def fit(
    pipe,
    objectives: ConceptObjective | Sequence[ConceptObjective],
    *,
    method: str,
    unet_params: dict[str, nn.Parameter],
    token_init: dict[str, torch.Tensor] | None,
    steps: int,
    lr: float,
    token_lr: float | None = None,
    weight_decay: float = 1e-2,
    max_grad_norm: float | None = 1.0,
    callback: Callable[[SearchProgress], None] | None = None,
    disable: bool = False,
) -> BaselineWeights:
    """Train `unet_params` and the embedding rows of `token_init` on the objectives with AdamW.

    The loop of the diffusers training scripts: the loss, its gradient, the gradient norm clipped to
    `max_grad_norm`, one AdamW step (betas 0.9 / 0.999, eps 1e-8). Several objectives take turns
    (`JointObjective`). The pipeline's weights, `requires_grad` flags and `.grad`s are put back exactly when
    training ends, also when it fails: the result lives only in the returned `BaselineWeights`.

    Args:
        pipe: the pipeline whose `unet` the objectives evaluate.
        objectives: one `ConceptObjective` per subject, built on `pipe` (e.g. with `from_pipeline`).
        method: which baseline this is, recorded in the result.
        unet_params: the UNet parameters to train, by name (may be empty).
        token_init: identifier word -> initial embedding row, for the rows to train; None for none.
        steps: total optimisation steps (over all subjects together).
        lr: AdamW learning rate of the UNet parameters (and of the rows unless `token_lr`).
        token_lr: learning rate of the embedding rows; defaults to `lr`.
        weight_decay: AdamW's decoupled weight decay (the diffusers scripts' 1e-2).
        max_grad_norm: clip the gradient's global norm to this; None for no clipping.
        callback: called with a `SearchProgress` after every step.
        disable: hide the progress bar.
    """
    # 1. Check the arguments.
    objectives = as_objectives(objectives)
    if steps < 1:
        raise ValueError(f"`steps` must be at least 1, got {steps}.")
    for name, value in (("lr", lr), ("token_lr", token_lr)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"`{name}` must be a finite number > 0, got {value}.")
    if not weight_decay >= 0:
        raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}; the diffusers scripts use 1e-2.")
    for o in objectives:
        if o.unet is not pipe.unet:
            raise ValueError(
                "`objectives` were built on another UNet; build them on `pipe` (`from_pipeline(pipe, ...)`)."
            )
    if not unet_params and not token_init:
        raise ValueError("nothing to train: pass `unet_params` or `token_init`.")
    for name, p in unet_params.items():
        if p.dtype != torch.float32:
            raise ValueError(
                f"`unet_params[{name!r}]` is {p.dtype}; train in float32 (load the pipeline with dtype=torch.float32)."
            )

    # 2. Trainable rows, and the objectives that see them.
    embeddings = TokenEmbeddings(pipe.text_encoder, pipe.tokenizer, token_init) if token_init else None
    if embeddings is not None:
        objectives = [TokenObjective(o, embeddings) for o in objectives]
    joint = JointObjective(objectives)

    # 3. Freeze everything else; remember what to put back.
    originals = {name: p.detach().clone() for name, p in unet_params.items()}
    modules = [pipe.unet, pipe.text_encoder]
    flags = {p: p.requires_grad for m in modules for p in m.parameters()}
    grads = {p: p.grad for m in modules for p in m.parameters()}
    groups = []
    if unet_params:
        groups.append({"params": list(unet_params.values()), "lr": lr})
    if embeddings is not None:
        groups.append({"params": embeddings.rows, "lr": token_lr or lr})
    trained = [p for g in groups for p in g["params"]]

    losses: list[float] = []
    progress = tqdm(total=steps, disable=disable, desc=method, unit="step")
    try:
        for p in flags:
            p.requires_grad_(False)
            p.grad = None
        for p in trained:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)

        # 4. The loop: loss, gradient, clipping, one AdamW step.
        for k in range(steps):
            loss = joint.loss(k)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"step {k}: the {method} loss is not finite; use a smaller `lr` than {lr} or train in float32."
                )
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4g}")
            if callback is not None:
                callback(SearchProgress(step=k, steps=steps, loss=losses[-1]))

        # 5. What changed.
        changed = {
            name: p.detach().cpu().clone()
            for name, p in unet_params.items()
            if not torch.equal(p, originals[name])
        }
    finally:
        progress.close()
        with torch.no_grad():
            for name, p in unet_params.items():
                p.copy_(originals[name])
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = grads[p]

    return BaselineWeights(
        method=method,
        unet=changed,
        tokens=embeddings.values() if embeddings is not None else {},
        metadata={
            "steps": steps,
            "lr": lr,
            "token_lr": (token_lr or lr) if embeddings is not None else None,
            "weight_decay": weight_decay,
            "max_grad_norm": max_grad_norm,
            "subjects": [{"token": o.token, "class_word": o.class_word} for o in objectives],
            "batch_size": objectives[0].config.batch_size,
            "prior_weight": objectives[0].config.prior_weight,
            "seed": objectives[0].config.seed,
        },
        losses=losses,
    )
