"""Which dtype a model runs in, and how a search in half precision keeps its gradients: the dtype policy.

The default, float32, is the exact one.

**Weights in float16 / bfloat16** (`load_pipeline(dtype=...)`, or `resolve_dtype("fp16")` for a flag)
halve the UNet's memory and, on a GPU, its time. The search's own state stays float32 whatever the
model's dtype: `cones.search` promotes θ0, δ = 1 − ξ, Adam's moments and the scores M_p to float32 and
casts each step's gradients up before using them; `ConceptObjective` reduces the loss in float32. Two
effects remain (together, on the tiny model and on the embedded one, the float16 concept is the float32
one to a Jaccard overlap of 0.99-1.0, the bfloat16 one to 0.89-1.0; see tests/test_pipeline.py):

* the path γ_k = (1 − δ_k) ⊙ θ0 is rounded to the model's dtype when the search writes it into the UNet,
  so the model sees a weight move only once δ exceeds half the dtype's relative spacing (float16 about
  5e-4, bfloat16 about 4e-3: with Adam at ρ = 2e-5, after some 25 / 200 steps of consistent descent);
  the scores themselves still accumulate every step in float32;
* the backward pass runs in the model's dtype; in float16, gradients below 6.1e-5 lose bits and below
  6e-8 vanish. On the SD 1.x UNet (default initialisation, 8x8 latents) 93% of the cross-attention
  K/V gradients are below 6.1e-5 (median 7e-6), 1.6% with the loss scaled by 1024 (`benchmarks/gpu_check.py`
  measures it at 64x64). `LossScaled` multiplies the backward pass by a constant and divides it out again
  in float32 (pass its `unscale` as the search's `gradient_hook`); bfloat16 has float32's range and needs
  none. `find_concept` scales by 1024 whenever the UNet is float16 (`default_loss_scale`): on an H100,
  at 512x512, 97.8% of the full-size UNet's K/V gradients fell below 6.1e-5 and 13.9% to exactly zero
  without it, 7.5% and 0.004% with it (`benchmarks/results/gpu_check.md`).

A concept is stored as indices (`cones.storage`), so the same selection gives the same `.cones` file
byte for byte whichever dtype found it, and applies to a model of any dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cones.objective import Objective
from cones.search import SearchError

__all__ = ["DTYPES", "LossScaled", "default_loss_scale", "loss_scaled", "resolve_dtype"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a name such as `"fp16"` or `"bfloat16"`; a floating `torch.dtype` as it is."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(
                f"`dtype` {dtype} is not a floating dtype; use one of float32, float16, bfloat16."
            )
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` {dtype!r} is not supported; use one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by `scale`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def default_loss_scale(dtype: torch.dtype, requested: float | None = None) -> float:
    """The loss scale a search in `dtype` should use: `requested` if given, else 1024 for float16 (whose
    range loses most K/V gradients of a real UNet, see above) and 1 (none) for float32 and bfloat16."""
    if requested is not None:
        if not (requested > 0 and math.isfinite(requested)):
            raise ValueError(
                f"the loss scale must be a finite number > 0, got {requested}; e.g. 1024, or 1 for none."
            )
        return float(requested)
    return 1024.0 if dtype == torch.float16 else 1.0


def loss_scaled(objective: Objective, dtype: torch.dtype, requested: float | None = None):
    """`objective` as a search in `dtype` should see it, and the gradient hook that goes with it: wrapped in
    `LossScaled` with its `unscale` when `default_loss_scale` asks for a scale, else unchanged and None."""
    scale = default_loss_scale(dtype, requested)
    if scale == 1.0:
        return objective, None
    scaled = LossScaled(objective, scale)
    return scaled, scaled.unscale


class LossScaled:
    """Static loss scaling for a float16 search: the backward pass carries S·∇L, the search sees ∇L.

        scaled = LossScaled(objective, scale=1024)
        find_concept_neurons(scaled, unet, gradient_hook=scaled.unscale, ...)

    `loss(step)` has the value of `objective.loss(step)` (the loss history is unchanged) but gradient
    `scale` times as large, so small float16 gradients keep their bits; `unscale` casts the gradients to
    float32 and divides by `scale`. The concept is then that of an exact-arithmetic search, up to rounding.
    """

    def __init__(self, objective: Objective, scale: float = 1024.0) -> None:
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"`scale` must be a finite number > 0, got {scale}; e.g. 1024.")
        self.objective = objective
        self.scale = float(scale)
        self.token = getattr(objective, "token", None)
        self.class_word = getattr(objective, "class_word", None)

    def describe(self) -> dict | None:
        """The wrapped objective's description (the scale changes no value the search sees)."""
        return self.objective.describe() if hasattr(self.objective, "describe") else None

    def loss(self, step: int) -> torch.Tensor:
        """`objective.loss(step)`, whose backward pass is scaled by `scale`."""
        return _ScaleGradient.apply(self.objective.loss(step), self.scale)

    def unscale(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients in float32 (float64 stays float64), divided by `scale`; overflow is an error."""
        out = []
        for g in grads:
            g = g.to(torch.promote_types(g.dtype, torch.float32)) / self.scale
            if not torch.isfinite(g).all():
                raise SearchError(
                    f"a loss-scaled gradient overflowed {grads[0].dtype}; pass a smaller `scale` than {self.scale:g}."
                )
            out.append(g)
        return out
