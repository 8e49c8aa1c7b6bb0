"""DreamBooth (Ruiz et al., 2022) on the concept-implanting objective: fine-tune every UNet weight.

The paper's comparison runs the diffusers DreamBooth script (appendix B.2): batch size 1, learning rate
5e-6, 800 steps, prior preservation with λ = 1, AdamW with weight decay 1e-2, gradients clipped to norm 1.
Here the loss is the same `ConceptObjective` the concept-neuron search uses (same images, class images,
prompts, batch and seed), so only the trained weights differ between the methods.

What DreamBooth must store is every UNet weight that changed, i.e. (with weight decay) the whole UNet:
`save(weights, path, dtype=torch.float16)` halves it.

    objective = ConceptObjective.from_pipeline(pipe, images, token="sks", class_word="dog", class_images=...)
    weights = dreambooth.train(pipe, objective, steps=200, lr=2e-5)
    with applied(pipe, weights):
        images = generate(pipe, ["a sks dog on the beach"])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cones.baselines.fit import fit
from cones.baselines.weights import BaselineWeights, load, save
from cones.objective import ConceptObjective
from cones.patches import applied
from cones.search import SearchProgress

__all__ = ["PAPER", "applied", "load", "save", "train"]

METHOD = "dreambooth"
PAPER = {"steps": 800, "lr": 5e-6, "batch_size": 1}  # appendix B.2, on Stable Diffusion 1.4


def train(
    pipe,
    objectives: ConceptObjective | Sequence[ConceptObjective],
    *,
    steps: int = 200,
    lr: float = 2e-5,
    weight_decay: float = 1e-2,
    max_grad_norm: float | None = 1.0,
    callback: Callable[[SearchProgress], None] | None = None,
    disable: bool = False,
) -> BaselineWeights:
    """Fine-tune all of `pipe.unet` on the objectives (one per subject, taking turns); `pipe` is left as it was.

    Returns the UNet tensors that changed. `steps` counts all subjects together: pass n · S for n subjects.
    """
    return fit(
        pipe,
        objectives,
        method=METHOD,
        unet_params=dict(pipe.unet.named_parameters()),
        token_init=None,
        steps=steps,
        lr=lr,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        callback=callback,
        disable=disable,
    )
