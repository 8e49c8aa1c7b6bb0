"""Tuning the values of concept neurons at float32, float16 or quaternary precision (paper sec. 3.2, fig. 3).

`tune_values` optimises the concept-implanting loss over the values of the concept neurons only (every other
weight frozen) and returns a `TunedConcept` (`cones.precision.values`); binary precision tunes nothing.

How: each neuron's value is written θ = ξ · θ0, as in the search's Algorithm A2, and Adam descends ξ (so
each weight moves at a rate proportional to its own size). ξ starts at 0, the binary solution, unless
`init="original"`. In the forward pass the value is rounded to the precision (float16 rounding; the nearest
quaternary level of clamp(ξ, 0, 1)), and the gradient passes the rounding unchanged (the straight-through
estimator); for quaternary ξ is kept in [0, 1] after each step. The search's conventions hold: weights are
written in place, gradients are taken with `torch.autograd.grad`, and the UNet's weights and `requires_grad`
flags are put back bit for bit when tuning ends, also when it fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from cones.neurons import ConceptNeurons
from cones.objective import Objective
from cones.precision.values import TunedConcept, check_precision, quaternary_codes, quaternary_values
from cones.search.methods import adam_step

__all__ = ["TuneResult", "tune_values"]


@dataclass
class TuneResult:
    """What `tune_values` returns: the tuned concept and L_con at each step (before that step's update)."""

    tuned: TunedConcept
    losses: list[float]


def _forward_values(precision: str, xi: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
    """The value the forward pass uses for scale ξ and original weights θ0 (both (n,), float32)."""
    if precision == "float32":
        return xi * theta0
    if precision == "float16":
        return (xi * theta0).to(torch.float16).to(theta0.dtype)
    return quaternary_values(quaternary_codes(xi), theta0)


def tune_values(
    objective: Objective,
    unet: torch.nn.Module,
    concept: ConceptNeurons,
    *,
    precision: str = "float16",
    steps: int = 100,
    lr: float = 0.01,
    init: str = "shut",
    callback: Callable[[int, float], None] | None = None,
    disable: bool = False,
) -> TuneResult:
    """Optimise the concept-implanting loss over the values of `concept`'s neurons, at `precision`.

    Args:
        objective: gives `loss(step)`, a scalar computed with `unet` (e.g. a `ConceptObjective`).
        unet: the model; changed during tuning, restored bit for bit after (and on failure).
        concept: whose neurons are tuned; every other weight stays frozen.
        precision: "float32", "float16", "quaternary" or "binary" (no tuning: returns the shut concept).
        steps: Adam steps on ξ (the values are ξ · θ0).
        lr: Adam's rate on ξ; ξ is a fraction of each original weight, so 0.01 moves weights ~1% a step.
        init: "shut" (ξ = 0, start from the binary solution) or "original" (ξ = 1, the base model).
        callback: called with (step, loss) after every step.
        disable: hide the progress bar.
    Returns:
        A `TuneResult` with the `TunedConcept` and the loss at each step.
    """
    check_precision(precision)
    if init not in ("shut", "original"):
        raise ValueError(f"`init` must be 'shut' or 'original', got {init!r}")
    if steps < 0:
        raise ValueError(f"`steps` must be >= 0, got {steps}; e.g. 100")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"`lr` must be a finite number > 0, got {lr}; e.g. 0.01")
    settings = {"precision": precision, "steps": steps, "lr": lr, "init": init, "optimizer": "adam"}
    if precision == "binary":
        return TuneResult(TunedConcept(concept, "binary", metadata={"tune": {**settings, "steps": 0}}), [])

    # 1. The neurons, their original weights θ0 and the state: ξ and Adam's moments, float32 (n,) each.
    params = concept.parameters_in(unet)
    names = [name for name, idx in concept.indices.items() if idx.numel()]
    if not names:
        raise ValueError("`concept` has no neurons; there is nothing to tune")
    index = {name: concept.indices[name].to(params[name].device) for name in names}
    originals = {name: params[name].detach().view(-1).index_select(0, index[name]).clone() for name in names}
    theta0 = {name: originals[name].float() for name in names}
    xi = {name: torch.full_like(theta0[name], 0.0 if init == "shut" else 1.0) for name in names}
    m = {name: torch.zeros_like(theta0[name]) for name in names}
    v = {name: torch.zeros_like(theta0[name]) for name in names}

    # 2. Freeze everything but the parameters holding neurons; the `finally` restores weights and flags.
    flags = {p: p.requires_grad for p in unet.parameters()}
    losses: list[float] = []
    progress = tqdm(total=steps, disable=disable, desc=f"tuning values ({precision})", unit="step")
    try:
        for p in unet.parameters():
            p.requires_grad_(False)
        for name in names:
            params[name].requires_grad_(True)
        for k in range(steps):
            # 2a. This step's values at the neurons.
            with torch.no_grad():
                for name in names:
                    flat = params[name].detach().view(-1)
                    flat.index_copy_(
                        0, index[name], _forward_values(precision, xi[name], theta0[name]).to(flat.dtype)
                    )

            # 2b. The loss and its gradient; ∂L/∂ξ = θ0 · ∂L/∂θ at the neurons (straight through the rounding).
            loss = objective.loss(k)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"step {k}: the loss is not finite; tune in float32 or with a smaller `lr`"
                )
            grads = torch.autograd.grad(loss, [params[name] for name in names])
            for name, g in zip(names, grads, strict=True):
                g_xi = g.detach().view(-1).index_select(0, index[name]).float() * theta0[name]  # (n,)
                adam_step(xi[name], g_xi, m[name], v[name], k + 1, -lr)  # 2c. Adam descends ξ
                if precision == "quaternary":
                    xi[name].clamp_(0, 1)
            losses.append(loss.item())
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4g}")
            if callback is not None:
                callback(k, losses[-1])
    finally:
        progress.close()
        with torch.no_grad():
            for name in names:
                params[name].detach().view(-1).index_copy_(0, index[name], originals[name])
        for p, flag in flags.items():
            p.requires_grad_(flag)

    # 3. The stored values.
    if precision == "quaternary":
        values = {name: quaternary_codes(xi[name]).cpu() for name in names}
    else:
        dtype = torch.float32 if precision == "float32" else torch.float16
        values = {name: (xi[name] * theta0[name]).to(dtype).cpu() for name in names}
    return TuneResult(TunedConcept(concept, precision, values, metadata={"tune": settings}), losses)
