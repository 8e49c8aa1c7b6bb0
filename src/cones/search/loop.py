"""The search loop: `find_concept_neurons`, the one loop every strategy of `cones.search.methods` runs in.

Each step writes the strategy's weights into the UNet's targets, takes L_con and ∇_θ L_con with
`torch.autograd.grad` (no `.grad` is touched), checks both for overflow, and hands the gradients to the
strategy's update. When the loop ends, also when it fails, the original weights and `requires_grad` flags are
put back bit for bit. The scores the strategy reads off its state are then selected (`cones.search.select`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cones.basemodel import weights_sha256
from cones.config import DEFAULTS
from cones.neurons import ConceptNeurons
from cones.objective import Objective
from cones.search.checkpoint import load_checkpoint, save_checkpoint
from cones.search.methods import Optimizer, SearchMethod, search_method
from cones.search.result import SearchError, SearchProgress, SearchResult, selected_concept
from cones.search.select import check_selection
from cones.targets import Targets, target_parameters

__all__ = ["find_concept_neurons"]


def find_concept_neurons(
    objective: Objective,
    unet: nn.Module,
    *,
    method: str | SearchMethod = DEFAULTS.method,
    steps: int = DEFAULTS.steps,
    lr: float | None = None,
    optimizer: Optimizer | None = None,
    threshold: float | None = None,
    sparsity: float | None = None,
    targets: Targets = DEFAULTS.targets,
    restrict_to: ConceptNeurons | None = None,
    token: str | None = None,
    class_word: str | None = None,
    callback: Callable[[SearchProgress], None] | None = None,
    disable: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    gradient_hook: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
) -> SearchResult:
    """Find the concept neurons of `objective` among `unet`'s `targets`; the UNet is left as it was.

    Args:
        objective: gives `loss(step)`, a scalar computed with `unet` (e.g. a `ConceptObjective`).
        unet: the model whose target weights are searched; modified during the search, restored after.
        method: the strategy (`cones.search.methods`): `"a2"` (Algorithm A2, default) or `"alg1"`
            (Algorithm 1), or a `SearchMethod` object, which carries its own rate.
        steps: K, the number of gradient evaluations (default `FindConfig.steps`; the paper: 1,000).
        lr: ρ, the rate of Algorithm 1's update or of the steps on ξ (default `FindConfig.lr`; the paper,
            on Stable Diffusion with Adam: 2e-5).
        optimizer: A2 only: `"adam"` (default) or `"sgd"` (plain gradient descent on ξ).
        threshold: τ; concept neurons have M_p > τ. Exclusive with `sparsity`.
        sparsity: fraction of the candidate weights to select (top M_p, positive only).
        targets: which parameters are candidates, as in `cones.targets.target_parameters`.
        restrict_to: a concept whose neurons are the only candidates (collaborative refinement, paper
            sec. 3.3); all other weights stay fixed and score 0.
        token, class_word: recorded in the concept; by default the objective's `token` / `class_word`
            attributes when it has them, else None.
        callback: called with a `SearchProgress` after every step.
        disable: hide the progress bar.
        checkpoint_path: a `.safetensors` file; written every `checkpoint_every` steps and at the end,
            and resumed from when it exists, giving the same concept as an uninterrupted run. Settings,
            weights and the objective's `describe()` (images, prompts, seed), when it has one, are
            checked against it.
        checkpoint_every: steps between checkpoints.
        gradient_hook: called each step with ∇_θ L of the targets (in `named_parameters` order, the model's
            dtype) before they are checked and used; returns the gradients to use instead, same shapes. E.g.
            the sum over processes (`cones.distributed.allreduce_gradients`) or the unscaled gradients of a
            loss-scaled half-precision search (`cones.dtypes.LossScaled.unscale`).
    Returns:
        A `SearchResult` with the concept, the scores M_p, the loss history and the settings.
    Raises:
        SearchError: a non-finite loss or gradient, a loss that ignores the targets, or a checkpoint
            that belongs to another search.
    """
    # 1. Check the arguments; the name of a method becomes its strategy.
    check_selection(threshold, sparsity)
    method = search_method(method, lr, optimizer)
    if steps < 1:
        raise ValueError(f"`steps` must be at least 1, got {steps}; the paper uses 1000.")
    if checkpoint_every < 1:
        raise ValueError(f"`checkpoint_every` must be at least 1, got {checkpoint_every}; e.g. 100.")
    token = token if token is not None else getattr(objective, "token", None)
    class_word = class_word if class_word is not None else getattr(objective, "class_word", None)

    # 2. The candidates: the target parameters, optionally only the neurons of `restrict_to`.
    params = target_parameters(unet, targets)
    originals = {name: p.detach().clone() for name, p in params.items()}  # exact copies, for the restore
    theta0 = {  # θ0 for the arithmetic: float32, or float64 for a float64 model
        name: t.to(torch.promote_types(t.dtype, torch.float32)) for name, t in originals.items()
    }
    candidates = None if restrict_to is None else _candidate_masks(restrict_to, theta0)
    if candidates is None:
        num_candidates = sum(t.numel() for t in theta0.values())
    else:
        num_candidates = int(sum(m.sum().item() for m in candidates.values()))
    own = method.settings()  # {"method": name, "lr": ..., ...}
    settings: dict[str, Any] = {
        "method": own["method"],
        "steps": steps,
        **{key: value for key, value in own.items() if key != "method"},
        "threshold": threshold,
        "sparsity": sparsity,
        "targets": targets if isinstance(targets, str) else list(targets),
        "candidates": num_candidates,
        "restricted": restrict_to is not None,
        "objective": objective.describe() if hasattr(objective, "describe") else None,
    }

    # 3. The search state: from the checkpoint when there is one, else at step 0.
    state = method.start(theta0)
    start, losses = 0, []
    if checkpoint_path is not None and os.path.exists(checkpoint_path):
        start, losses = load_checkpoint(checkpoint_path, state, settings, theta0)

    # 4. Freeze everything but the targets; the `finally` puts weights and flags back.
    flags = {p: p.requires_grad for p in unet.parameters()}
    progress = tqdm(
        total=steps, initial=start, disable=disable, desc=f"concept neurons ({method.name})", unit="step"
    )
    try:
        for p in unet.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)

        for k in range(start, steps):
            # 4a. Put this step's weights into the UNet: θ_k (Algorithm 1) or ξ_k ⊙ θ0 = (1 − δ_k) ⊙ θ0 (A2).
            with torch.no_grad():
                for name, weights in method.weights(state, theta0).items():
                    params[name].copy_(weights)

            # 4b. L_con(θ_k) and ∇_θ L_con(θ_k), both checked for overflow.
            loss = objective.loss(k)
            if not torch.isfinite(loss):
                raise SearchError(_nonfinite_message(k, "the loss", method.lr))
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            if gradient_hook is not None and all(g is not None for g in grads):
                grads = gradient_hook(list(grads))
            grad_of = {}
            for name, g in zip(params, grads, strict=True):
                if g is None:
                    raise SearchError(
                        f"the loss does not depend on target `{name}`; build the objective on the `unet` "
                        "given to the search."
                    )
                g = g.to(theta0[name].dtype)  # (param shape)
                if not torch.isfinite(g).all():
                    raise SearchError(_nonfinite_message(k, f"the gradient of `{name}`", method.lr))
                grad_of[name] = g if candidates is None else g * candidates[name]

            # 4c. The strategy's update: Algorithm 1 or A2.
            method.update(state, theta0, grad_of, step=k + 1)
            losses.append(loss.item())

            # 4d. Report and checkpoint.
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4g}")
            if checkpoint_path is not None and ((k + 1) % checkpoint_every == 0 or k + 1 == steps):
                save_checkpoint(checkpoint_path, state, k + 1, losses, settings, theta0)
            if callback is not None:
                callback(SearchProgress(step=k, steps=steps, loss=losses[-1]))
    finally:
        progress.close()
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(originals[name])
        for p, flag in flags.items():
            p.requires_grad_(flag)

    # 5. The scores M_p and the selection.
    scores = {name: s.cpu() for name, s in method.scores(state, theta0).items()}
    shapes = {name: tuple(t.shape) for name, t in theta0.items()}
    concept = selected_concept(
        scores, settings, shapes, token, class_word, base_sha256=weights_sha256(originals)
    )
    return SearchResult(concept=concept, scores=scores, losses=losses, settings=settings)


def _candidate_masks(restrict_to: ConceptNeurons, theta0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`restrict_to`'s neurons as bool masks of each target's shape (True = candidate)."""
    outside = [name for name, idx in restrict_to.indices.items() if len(idx) > 0 and name not in theta0]
    if outside:
        raise ValueError(
            f"`restrict_to` has neurons in {outside[:2]}, which `targets` leaves out; pass "
            "targets=list(restrict_to.shapes)."
        )
    masks = {}
    for name, t in theta0.items():
        if name not in restrict_to.shapes:
            masks[name] = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
        elif tuple(restrict_to.shapes[name]) != tuple(t.shape):
            raise ValueError(
                f"`restrict_to` gives `{name}` the shape {tuple(restrict_to.shapes[name])}, the UNet "
                f"{tuple(t.shape)}; it was found on another model."
            )
        else:
            masks[name] = restrict_to.mask_for(name, t.device)
    return masks


def _nonfinite_message(step: int, what: str, lr: float) -> str:
    return (
        f"step {step}: {what} is not finite (inf or nan), so the concept would be meaningless; search in "
        f"float32 (`unet.to(torch.float32)`) or with a smaller `lr` than {lr}."
    )
