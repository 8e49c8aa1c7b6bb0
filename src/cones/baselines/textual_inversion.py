"""Textual Inversion (Gal et al., 2022) on the concept-implanting objective: learn one embedding row.

The identifier's row of the text encoder's embedding matrix is replaced by a vector initialised from the
class word's row ("the new token embedding is initialized with the category name", appendix B.1) and
trained alone; the UNet and the rest of the text encoder stay frozen. The paper's settings: batch size 4,
learning rate 5e-3 scaled by the batch size to 2e-2, 5,000 steps, and — unlike the other methods — the
same number of steps however many subjects are learnt together.

The identifier is an existing rare token ("sks") whose row is overwritten, rather than a token added to
the vocabulary: the tokenizer is then never changed, and `remove` restores the original row bit for bit.
What Textual Inversion stores is one row per subject.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cones.baselines.fit import as_objectives, fit
from cones.baselines.tokens import token_id
from cones.baselines.weights import BaselineWeights, load, save
from cones.objective import ConceptObjective
from cones.patches import applied
from cones.search import SearchProgress

__all__ = ["PAPER", "applied", "load", "save", "train"]

METHOD = "textual_inversion"
PAPER = {"steps": 5000, "lr": 2e-2, "batch_size": 4}  # appendix B.1, effective learning rate


def train(
    pipe,
    objectives: ConceptObjective | Sequence[ConceptObjective],
    *,
    steps: int = 400,
    lr: float = 5e-3,
    weight_decay: float = 1e-2,
    max_grad_norm: float | None = 1.0,
    callback: Callable[[SearchProgress], None] | None = None,
    disable: bool = False,
) -> BaselineWeights:
    """Learn each objective's identifier row, starting from its class word's row; `pipe` is left as it was.

    The class word must be a single token of the tokenizer (else pass a one-word approximation, as the
    paper does: "pot" for "wooden pot").
    """
    objectives = as_objectives(objectives)
    table = pipe.text_encoder.get_input_embeddings().weight
    init = {o.token: table[token_id(pipe.tokenizer, o.class_word, name="class_word")] for o in objectives}
    return fit(
        pipe,
        objectives,
        method=METHOD,
        unet_params={},
        token_init=init,
        steps=steps,
        lr=lr,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        callback=callback,
        disable=disable,
    )
