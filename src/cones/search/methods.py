"""The search strategies: Algorithm 1 and Algorithm A2, small objects behind one signature.

A strategy says how the path of weights moves and how the scores M_p are read off it; the loop around it
(`cones.search.loop`) is the same for all. Every strategy has the same five members, in the manner of
k-diffusion's samplers:

    settings()                          what the search records and a checkpoint must agree on
    start(theta0) -> state              the state at step 0: named tensors, shaped like the targets
    weights(state, theta0) -> weights   where this step's gradient is taken, per target
    update(state, theta0, grads, step)  one step, in place on the state (`step` counts from 1)
    scores(state, theta0) -> M_p        the scores after the last step, per target

θ0, the state and the gradients are float32 (float64 for a float64 model), keyed by parameter name. The
state's keys are "<field>.<parameter name>", so that it goes into a checkpoint as it is.

* `Algorithm1(lr)`: Algorithm 1 exactly as written: θ_1 = θ; θ_{k+1} = θ_k ⊙ (1 − ρ θ_k ⊙ ∇L(θ_k));
  M_p = Σ_k θ_k ⊙ ∇L(θ_k).
* `AlgorithmA2(lr, optimizer)`: write the weights as θ = ξ ⊙ θ0 with ξ = 1, take K steps on ξ with rate ρ,
  and M_p = (1 − ξ_K)/ρ. By the chain rule ∇_ξ L = θ0 ⊙ ∇_θ L(ξ ⊙ θ0) (eq. A13), so plain gradient descent
  (`optimizer="sgd"`) gives M_p = Σ_k θ0 ⊙ ∇L(γ_k), which tends to Algorithm 1's M_p as ρ → 0 (appendix
  A.2). The paper's rates (2e-5 … 6e-5 over 1,000 steps, appendix B.4) only move ξ when the steps are
  Adam's, whose size is about ρ whatever the gradient's scale: plain descent at such a rate moves a Stable
  Diffusion weight by ρ·θ²·∂L/∂θ, around 1e-11, so the path never leaves θ0. So `optimizer="adam"` is the
  default; then M_p = (1 − ξ_K)/ρ counts, roughly, the steps on which a weight was pushed down (|M_p| ≤
  about K), and τ is read on that scale. With `"sgd"`, M_p is in the units of θ·∂L/∂θ, as in Algorithm 1.

ξ is stored as δ = 1 − ξ, which starts at 0: the small per-step changes are then kept in full instead of
being rounded away next to 1. Adam is written out (`adam_step`, the update of `torch.optim.Adam`, betas
(0.9, 0.999), eps 1e-8) because δ descends −∇_ξ and because its state then goes plainly into a checkpoint.

`search_method("a2", lr=...)` maps the user-facing names (`--method`, `FindConfig.method`) to strategies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from cones.config import DEFAULTS

__all__ = ["METHODS", "Algorithm1", "AlgorithmA2", "SearchMethod", "adam_step", "search_method"]

Optimizer = Literal["adam", "sgd"]
Tensors = dict[str, torch.Tensor]

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class SearchMethod(Protocol):
    """How the search's path moves and how its scores M_p are read off it (see the module docstring)."""

    name: str  # the user-facing name, recorded as the search's `method`
    lr: float  # ρ

    def settings(self) -> dict[str, Any]: ...

    def start(self, theta0: Tensors) -> Tensors: ...

    def weights(self, state: Tensors, theta0: Tensors) -> Tensors: ...

    def update(self, state: Tensors, theta0: Tensors, grads: Tensors, step: int) -> None: ...

    def scores(self, state: Tensors, theta0: Tensors) -> Tensors: ...


def _check_lr(lr: float) -> None:
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"`lr` must be a finite number > 0, got {lr}; the paper uses 2e-5 with Adam.")


@torch.no_grad()
def adam_step(
    target: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float
) -> None:
    """One Adam step on `target` along +`grad` at rate `lr` (pass −lr to descend), in place with its moments.

    The update of `torch.optim.Adam` (betas 0.9 / 0.999, eps 1e-8, no weight decay); `step` counts from 1.
    All tensors share one shape and dtype.
    """
    beta1, beta2 = ADAM_BETAS
    m.mul_(beta1).add_(grad, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(ADAM_EPS)
    target.addcdiv_(m, denom, value=lr / (1 - beta1**step))


@dataclass(frozen=True)
class Algorithm1:
    """Algorithm 1 of the paper; state: theta = θ_k (from θ0), mp = Σ θ_k ⊙ ∇L(θ_k) so far."""

    lr: float = DEFAULTS.lr
    name = "alg1"

    def __post_init__(self) -> None:
        _check_lr(self.lr)

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, "lr": self.lr, "optimizer": None}

    def start(self, theta0: Tensors) -> Tensors:
        state = {}
        for name, t in theta0.items():
            state[f"theta.{name}"] = t.clone()
            state[f"mp.{name}"] = torch.zeros_like(t)
        return state

    def weights(self, state: Tensors, theta0: Tensors) -> Tensors:
        return {name: state[f"theta.{name}"] for name in theta0}  # θ_k

    @torch.no_grad()
    def update(self, state: Tensors, theta0: Tensors, grads: Tensors, step: int) -> None:
        for name, grad in grads.items():
            theta = state[f"theta.{name}"]
            score = theta * grad  # θ_k ⊙ ∇L(θ_k)
            state[f"mp.{name}"] += score
            theta.mul_(1 - self.lr * score)  # θ_{k+1} = θ_k ⊙ (1 − ρ θ_k ⊙ ∇L(θ_k))   (eq. 11)

    def scores(self, state: Tensors, theta0: Tensors) -> Tensors:
        return {name: state[f"mp.{name}"] for name in theta0}


@dataclass(frozen=True)
class AlgorithmA2:
    """Algorithm A2: steps on ξ in θ = ξ ⊙ θ0; state: delta = 1 − ξ_k (from 0), with Adam its moments."""

    lr: float = DEFAULTS.lr
    optimizer: Optimizer = "adam"
    name = "a2"

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"`optimizer` must be 'adam' or 'sgd', got {self.optimizer!r}.")

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, "lr": self.lr, "optimizer": self.optimizer}

    def start(self, theta0: Tensors) -> Tensors:
        state = {}
        for name, t in theta0.items():
            state[f"delta.{name}"] = torch.zeros_like(t)
            if self.optimizer == "adam":
                state[f"adam_m.{name}"] = torch.zeros_like(t)
                state[f"adam_v.{name}"] = torch.zeros_like(t)
        return state

    def weights(self, state: Tensors, theta0: Tensors) -> Tensors:
        return {name: (1 - state[f"delta.{name}"]) * t for name, t in theta0.items()}  # γ_k = ξ_k ⊙ θ0

    @torch.no_grad()
    def update(self, state: Tensors, theta0: Tensors, grads: Tensors, step: int) -> None:
        for name, grad in grads.items():
            grad_xi = theta0[name] * grad  # ∇_ξ L(ξ ⊙ θ0) = θ0 ⊙ ∇_θ L(γ)   (eq. A13)
            delta = state[f"delta.{name}"]
            if self.optimizer == "sgd":
                delta.add_(self.lr * grad_xi)  # ξ ← ξ − ρ ∇_ξ L, so δ = 1 − ξ grows by ρ ∇_ξ L   (eq. A15)
            else:  # Adam's step on ξ, with its sign flipped for δ
                adam_step(delta, grad_xi, state[f"adam_m.{name}"], state[f"adam_v.{name}"], step, self.lr)

    def scores(self, state: Tensors, theta0: Tensors) -> Tensors:
        return {name: state[f"delta.{name}"] / self.lr for name in theta0}  # M_p = (1 − ξ_K)/ρ


METHODS: dict[str, type[Algorithm1] | type[AlgorithmA2]] = {"a2": AlgorithmA2, "alg1": Algorithm1}


def search_method(
    method: str | SearchMethod = DEFAULTS.method, lr: float | None = None, optimizer: str | None = None
) -> SearchMethod:
    """The strategy of a user-facing name ("a2", "alg1") with rate `lr` (default `FindConfig.lr`) and, for
    "a2", `optimizer` ("adam" by default, or "sgd"); a strategy object is returned as it is."""
    if not isinstance(method, str):
        if lr is not None or optimizer is not None:
            raise ValueError(
                f"`method` {method!r} is a strategy with its own rate; drop `lr` and `optimizer` or pass a name."
            )
        return method
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {sorted(METHODS)}, got {method!r}.")
    lr = DEFAULTS.lr if lr is None else lr
    if method == "alg1":
        if optimizer is not None:
            raise ValueError(
                f"`optimizer` applies to method='a2' only, got optimizer={optimizer!r} with 'alg1'; drop it."
            )
        return Algorithm1(lr)
    return AlgorithmA2(lr, optimizer or "adam")
