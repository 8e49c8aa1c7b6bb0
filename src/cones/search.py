"""The concept-neuron search: which attention weights, scaled down, lower the concept-implanting loss.

Theorem 3.1 of the paper: slightly scaling a weight θ down lowers L_con iff θ·∂L/∂θ > 0. The search
accumulates this score M_p over K points of a path from θ towards smaller weights, and calls the weights
with M_p > τ the concept neurons. Two variants share one signature (`find_concept_neurons(method=...)`):

* `"alg1"`, Algorithm 1 exactly as written: θ_1 = θ; θ_{k+1} = θ_k ⊙ (1 − ρ θ_k ⊙ ∇L(θ_k));
  M_p = Σ_k θ_k ⊙ ∇L(θ_k).
* `"a2"` (default), Algorithm A2: write the weights as θ = ξ ⊙ θ0 with ξ = 1, take K gradient steps on ξ
  with rate ρ, and M_p = (1 − ξ_K)/ρ. By the chain rule ∇_ξ L = θ0 ⊙ ∇_θ L(ξ ⊙ θ0) (eq. A13), so plain
  gradient descent (`optimizer="sgd"`) gives M_p = Σ_k θ0 ⊙ ∇L(γ_k), which tends to Algorithm 1's M_p as
  ρ → 0 (appendix A.2). The paper's rates (2e-5 … 6e-5 over 1,000 steps, appendix B.4) only move ξ
  when the steps are Adam's, whose size is about ρ whatever the gradient's scale: plain descent at such a
  rate moves a Stable Diffusion weight by ρ·θ²·∂L/∂θ, around 1e-11, so the path never leaves θ0. So
  `optimizer="adam"` is the default; then M_p = (1 − ξ_K)/ρ counts, roughly, the steps on which a weight
  was pushed down (|M_p| ≤ about K), and τ is read on that scale. With `"sgd"`, M_p is in the units of
  θ·∂L/∂θ, as in Algorithm 1.

ξ is stored as δ = 1 − ξ, which starts at 0: the small per-step changes are then kept in full instead of
being rounded away next to 1. Adam is written out (same update as `torch.optim.Adam`, betas (0.9, 0.999),
eps 1e-8) because δ descends −∇_ξ and because its state then goes plainly into a checkpoint. The state
is float32 (float64 for a float64 model) whatever the model's dtype.

The search writes the candidate weights into the UNet in place, takes gradients with `torch.autograd.grad`
(no `.grad` is touched), and puts the original weights and `requires_grad` flags back bit for bit when it
ends, also when it fails. The search itself draws no random numbers: the objective's seed fixes the run,
and `objective.loss(k)` depends only on k, so a checkpoint needs only the search state and the step.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from cones.neurons import ConceptNeurons
from cones.objective import Objective
from cones.targets import Targets, target_parameters

__all__ = [
    "SearchError",
    "SearchProgress",
    "SearchResult",
    "find_concept_neurons",
    "select_neurons",
]

Method = Literal["a2", "alg1"]
Optimizer = Literal["adam", "sgd"]

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
CHECKPOINT_VERSION = 2  # 2: the objective's description is part of the fingerprint
_CHECKPOINT_KEY = "cones_search"  # safetensors metadata key holding the checkpoint's JSON


class SearchError(RuntimeError):
    """The search cannot produce a meaningful concept (non-finite loss or gradient, unusable checkpoint)."""


@dataclass(frozen=True)
class SearchProgress:
    """What `callback` sees after each step."""

    step: int  # index of the step just taken, 0-based
    steps: int  # K, the total number of steps
    loss: float  # L_con at this step's weights, before the update


@dataclass
class SearchResult:
    """The outcome of a search: the selected concept, the scores it was selected from, the loss history."""

    concept: ConceptNeurons
    # M_p per target parameter: the parameter's shape, float32 (float64 for a float64 model), on the CPU
    scores: dict[str, torch.Tensor]
    losses: list[float]  # L_con at step 0 … K−1
    settings: dict[str, Any]  # method, steps, lr, optimizer, threshold, sparsity, targets, candidates, objective

    def select(self, *, threshold: float | None = None, sparsity: float | None = None) -> ConceptNeurons:
        """Select again from the same scores with another τ or sparsity, without searching again."""
        mask = select_neurons(
            self.scores, threshold=threshold, sparsity=sparsity, num_candidates=self.settings["candidates"]
        )
        settings = {**self.settings, "threshold": threshold, "sparsity": sparsity}
        return ConceptNeurons.from_mask(
            mask,
            shapes=self.concept.shapes,
            token=self.concept.token,
            class_word=self.concept.class_word,
            metadata={"search": settings},
        )


def select_neurons(
    scores: dict[str, torch.Tensor],
    *,
    threshold: float | None = None,
    sparsity: float | None = None,
    num_candidates: int | None = None,
) -> dict[str, torch.Tensor]:
    """Concept-neuron masks from scores M_p: M_p > τ, or the top fraction of positive scores.

    Args:
        scores: name -> float tensor M_p (any shape).
        threshold: τ >= 0; a weight is selected when M_p > τ.
        sparsity: fraction in (0, 1] of the candidate weights to select: the round(sparsity · candidates)
            largest scores over all parameters jointly, among the positive ones only (fewer if fewer are
            positive). Ties are broken by position, so the choice is deterministic.
        num_candidates: the number of candidate weights `sparsity` refers to; all weights in `scores`
            by default.
    Returns:
        name -> bool tensor of the score's shape; exactly one of `threshold` and `sparsity` must be given.
    """
    _check_selection(threshold, sparsity)
    if threshold is not None:
        return {name: s > threshold for name, s in scores.items()}
    total = sum(s.numel() for s in scores.values()) if num_candidates is None else num_candidates
    k = round(sparsity * total)
    flat = torch.cat([s.detach().flatten().cpu() for s in scores.values()])  # (all weights,)
    order = torch.sort(flat, descending=True, stable=True).indices[:k]  # (k,)
    order = order[flat[order] > 0]  # only positive scores can be concept neurons
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[order] = True
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = chosen[offset : offset + s.numel()].view(s.shape).to(s.device)
        offset += s.numel()
    return masks


def _check_selection(threshold: float | None, sparsity: float | None) -> None:
    if (threshold is None) == (sparsity is None):
        raise ValueError(
            f"pass exactly one of `threshold` and `sparsity`, got threshold={threshold}, sparsity={sparsity}; "
            "e.g. sparsity=0.01 for the top 1% of weights."
        )
    if threshold is not None and not (threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(
            f"`threshold` must be a finite τ >= 0, got {threshold}; concept neurons have M_p > τ >= 0."
        )
    if sparsity is not None and not 0 < sparsity <= 1:
        raise ValueError(
            f"`sparsity` must be a fraction in (0, 1], got {sparsity}; e.g. 0.01 for 1% of the weights."
        )


def find_concept_neurons(
    objective: Objective,
    unet: nn.Module,
    *,
    method: Method = "a2",
    steps: int = 1000,
    lr: float = 2e-5,
    optimizer: Optimizer | None = None,
    threshold: float | None = None,
    sparsity: float | None = None,
    targets: Targets = "cross",
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
        method: `"a2"` (Algorithm A2, default) or `"alg1"` (Algorithm 1).
        steps: K, the number of gradient evaluations (paper: 1,000).
        lr: ρ, the rate of Algorithm 1's update or of the steps on ξ (paper, with Adam: 2e-5).
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
    # 1. Check the arguments.
    _check_selection(threshold, sparsity)
    if method not in ("a2", "alg1"):
        raise ValueError(f"`method` must be 'a2' or 'alg1', got {method!r}.")
    if method == "alg1" and optimizer is not None:
        raise ValueError(
            f"`optimizer` applies to method='a2' only, got optimizer={optimizer!r} with 'alg1'; drop it."
        )
    optimizer = "adam" if method == "a2" and optimizer is None else optimizer
    if method == "a2" and optimizer not in ("adam", "sgd"):
        raise ValueError(f"`optimizer` must be 'adam' or 'sgd', got {optimizer!r}.")
    if steps < 1:
        raise ValueError(f"`steps` must be at least 1, got {steps}; the paper uses 1000.")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"`lr` must be a finite number > 0, got {lr}; the paper uses 2e-5 with Adam.")
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
    settings: dict[str, Any] = {
        "method": method,
        "steps": steps,
        "lr": lr,
        "optimizer": optimizer,
        "threshold": threshold,
        "sparsity": sparsity,
        "targets": targets if isinstance(targets, str) else list(targets),
        "candidates": num_candidates,
        "restricted": restrict_to is not None,
        "objective": objective.describe() if hasattr(objective, "describe") else None,
    }

    # 3. The search state: from the checkpoint when there is one, else at step 0.
    state = _initial_state(method, optimizer, theta0)
    start, losses = 0, []
    if checkpoint_path is not None and os.path.exists(checkpoint_path):
        start, losses = _load_checkpoint(checkpoint_path, state, settings, theta0)

    # 4. Freeze everything but the targets; the `finally` puts weights and flags back.
    flags = {p: p.requires_grad for p in unet.parameters()}
    progress = tqdm(
        total=steps, initial=start, disable=disable, desc=f"concept neurons ({method})", unit="step"
    )
    try:
        for p in unet.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)

        for k in range(start, steps):
            # 4a. Put this step's weights into the UNet: θ_k (Algorithm 1) or ξ_k ⊙ θ0 = (1 − δ_k) ⊙ θ0 (A2).
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(_current_weights(method, state, theta0, name))

            # 4b. L_con(θ_k) and ∇_θ L_con(θ_k), both checked for overflow.
            loss = objective.loss(k)
            if not torch.isfinite(loss):
                raise SearchError(_nonfinite_message(k, "the loss", lr))
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
                    raise SearchError(_nonfinite_message(k, f"the gradient of `{name}`", lr))
                grad_of[name] = g if candidates is None else g * candidates[name]

            # 4c. The update of Algorithm 1 or A2.
            for name, g in grad_of.items():
                _update(method, optimizer, state, theta0[name], name, g, lr, step=k + 1)
            losses.append(loss.item())

            # 4d. Report and checkpoint.
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4g}")
            if checkpoint_path is not None and ((k + 1) % checkpoint_every == 0 or k + 1 == steps):
                _save_checkpoint(checkpoint_path, state, k + 1, losses, settings, theta0)
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
    if method == "alg1":
        scores = {name: state[f"mp.{name}"].cpu() for name in theta0}
    else:
        scores = {name: (state[f"delta.{name}"] / lr).cpu() for name in theta0}  # M_p = (1 − ξ_K)/ρ
    mask = select_neurons(scores, threshold=threshold, sparsity=sparsity, num_candidates=num_candidates)
    concept = ConceptNeurons.from_mask(
        mask,
        shapes={name: tuple(t.shape) for name, t in theta0.items()},
        token=token,
        class_word=class_word,
        metadata={"search": settings},
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


def _initial_state(
    method: str, optimizer: str | None, theta0: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The state at step 0, keyed "<field>.<parameter name>"; θ0's dtype, shaped like the parameter.

    alg1: theta = θ_k (starts at θ0), mp = Σ θ_k ⊙ ∇L(θ_k) so far.
    a2: delta = 1 − ξ_k (starts at 0); with Adam also its moments m and v.
    """
    state = {}
    for name, t in theta0.items():
        if method == "alg1":
            state[f"theta.{name}"] = t.clone()
            state[f"mp.{name}"] = torch.zeros_like(t)
        else:
            state[f"delta.{name}"] = torch.zeros_like(t)
            if optimizer == "adam":
                state[f"adam_m.{name}"] = torch.zeros_like(t)
                state[f"adam_v.{name}"] = torch.zeros_like(t)
    return state


def _current_weights(
    method: str, state: dict[str, torch.Tensor], theta0: dict[str, torch.Tensor], name: str
) -> torch.Tensor:
    """The weights at which this step's gradient is taken."""
    if method == "alg1":
        return state[f"theta.{name}"]  # θ_k
    return (1 - state[f"delta.{name}"]) * theta0[name]  # γ_k = ξ_k ⊙ θ0


@torch.no_grad()
def _update(
    method: str,
    optimizer: str | None,
    state: dict[str, torch.Tensor],
    theta0: torch.Tensor,
    name: str,
    grad: torch.Tensor,
    lr: float,
    step: int,
) -> None:
    """One step of Algorithm 1 (eq. 11) or of descent on ξ (eq. A15), in place on `state`.

    `grad` is ∇_θ L at the current weights, in θ0's dtype and shape; `step` counts from 1.
    """
    if method == "alg1":
        theta = state[f"theta.{name}"]
        score = theta * grad  # θ_k ⊙ ∇L(θ_k)
        state[f"mp.{name}"] += score
        theta.mul_(1 - lr * score)  # θ_{k+1} = θ_k ⊙ (1 − ρ θ_k ⊙ ∇L(θ_k))
        return
    grad_xi = theta0 * grad  # ∇_ξ L(ξ ⊙ θ0) = θ0 ⊙ ∇_θ L(γ)   (eq. A13)
    delta = state[f"delta.{name}"]
    if optimizer == "sgd":
        delta.add_(lr * grad_xi)  # ξ ← ξ − ρ ∇_ξ L, so δ = 1 − ξ grows by ρ ∇_ξ L
        return
    beta1, beta2 = ADAM_BETAS
    m, v = state[f"adam_m.{name}"], state[f"adam_v.{name}"]
    m.mul_(beta1).add_(grad_xi, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(grad_xi, grad_xi, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(ADAM_EPS)
    delta.addcdiv_(m, denom, value=lr / (1 - beta1**step))  # Adam's step on ξ, with its sign flipped


def _nonfinite_message(step: int, what: str, lr: float) -> str:
    return (
        f"step {step}: {what} is not finite (inf or nan), so the concept would be meaningless; search in "
        f"float32 (`unet.to(torch.float32)`) or with a smaller `lr` than {lr}."
    )


def _fingerprint(settings: dict[str, Any], theta0: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What must agree between a checkpoint and the search resuming from it."""
    return {
        "method": settings["method"],
        "lr": settings["lr"],
        "optimizer": settings["optimizer"],
        "candidates": settings["candidates"],
        "objective": settings["objective"],
        "parameters": {name: list(t.shape) for name, t in theta0.items()},
    }


def _difference(stored: Any, expected: Any, prefix: str = "") -> str:
    """The first place two JSON values differ, as 'path: stored vs expected' (short enough for one line)."""
    if isinstance(stored, dict) and isinstance(expected, dict):
        for key in list(expected) + [k for k in stored if k not in expected]:
            if stored.get(key) != expected.get(key):
                return _difference(stored.get(key), expected.get(key), f"{prefix}{key}.")
    if isinstance(stored, list) and isinstance(expected, list) and len(stored) == len(expected):
        for i, (a, b) in enumerate(zip(stored, expected, strict=True)):
            if a != b:
                return _difference(a, b, f"{prefix}{i}.")
    text = f"{stored!r} vs {expected!r}"
    return (prefix.rstrip(".") + " " if prefix else "") + (text if len(text) <= 120 else "(differs)")


def _checksums(theta0: dict[str, torch.Tensor]) -> torch.Tensor:
    """(params, 2) float64 sums of |θ0| and θ0², to notice a resume on different weights."""
    return torch.stack(
        [torch.stack([t.double().abs().sum(), t.double().square().sum()]) for t in theta0.values()]
    ).cpu()


def _save_checkpoint(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    step: int,
    losses: list[float],
    settings: dict[str, Any],
    theta0: dict[str, torch.Tensor],
) -> None:
    """Write the state after `step` steps to `path` atomically (a temporary file, then `os.replace`)."""
    tensors = {f"state.{key}": t.detach().cpu().contiguous() for key, t in state.items()}
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64)  # (step,)
    tensors["theta0_checksums"] = _checksums(theta0)  # (params, 2)
    header = {"version": CHECKPOINT_VERSION, "step": step, "search": _fingerprint(settings, theta0)}
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp, metadata={_CHECKPOINT_KEY: json.dumps(header)})
    os.replace(tmp, path)


def _load_checkpoint(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    settings: dict[str, Any],
    theta0: dict[str, torch.Tensor],
) -> tuple[int, list[float]]:
    """Fill `state` in place from the checkpoint at `path`; return (steps done, loss history)."""
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
        if _CHECKPOINT_KEY not in meta:
            raise SearchError(
                f"`checkpoint_path` {os.fspath(path)!r} is not a search checkpoint; pass a new path."
            )
        header = json.loads(meta[_CHECKPOINT_KEY])
        if header.get("version") != CHECKPOINT_VERSION:
            raise SearchError(
                f"`checkpoint_path` has checkpoint version {header.get('version')}, this cones reads "
                f"{CHECKPOINT_VERSION}; pass a new path."
            )
        expected = json.loads(json.dumps(_fingerprint(settings, theta0)))  # JSON-normalised, as stored
        for key, value in expected.items():
            if header["search"].get(key) != value:
                shown = _difference(header["search"].get(key), value) if key != "parameters" else "(differs)"
                raise SearchError(
                    f"`checkpoint_path` {os.fspath(path)!r} was written by another search ({key}: {shown}); "
                    "pass a new path or the same settings."
                )
        step = int(header["step"])
        if step > settings["steps"]:
            raise SearchError(
                f"`checkpoint_path` holds {step} steps, more than `steps`={settings['steps']}; pass steps>={step}."
            )
        if not torch.allclose(f.get_tensor("theta0_checksums"), _checksums(theta0), rtol=1e-9, atol=0):
            raise SearchError(
                "`unet` weights differ from those the checkpoint was searched on; resume on the unmodified model."
            )
        for key, t in state.items():
            t.copy_(f.get_tensor(f"state.{key}"))
        losses = f.get_tensor("losses").tolist()
    return step, losses
