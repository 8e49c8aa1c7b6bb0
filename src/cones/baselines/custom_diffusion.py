"""Custom Diffusion (Kumari et al., 2022) on the concept-implanting objective, and its tuning-free merge.

Training updates the key and value projections of every cross-attention layer (`attn2.to_k`, `attn2.to_v`:
the only weights that see the text) together with the identifier's embedding row (the "modifier token",
initialised from the identifier's own rare-token row, appendix B). The paper's settings (appendix B.3):
batch size 4, learning rate 1e-5 scaled by the batch size to 4e-5, 600 steps, AdamW.

`merge` is Custom Diffusion's "constrained optimization" for composing separately trained subjects without
further training (its section 3.2, the paper's figure 8). For each K/V matrix, with W0 the base weight,
C_reg the text features of many ordinary captions, and for each subject i its features C_i (the tokens of
its identifier prompts) and wanted outputs V_i = C_i W_iᵀ from its own fine-tuned W_i:

    W = argmin_W ‖(W − W0) C_regᵀ‖_F   subject to   W Cᵀ = Vᵀ,     C = [C_1; …; C_n],  V = [V_1; …; V_n]

which has the closed form (`constrained_merge`)

    W = W0 + uᵀ d,   d = C (C_regᵀ C_reg)⁻¹,   uᵀ = (Vᵀ − W0 Cᵀ)(d Cᵀ)⁻¹.

The inverses are computed as least-squares solves, so repeated or nearly dependent constraints give the
least-squares compromise instead of failing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cones.baselines.fit import as_objectives, fit
from cones.baselines.tokens import TokenEmbeddings, token_id
from cones.baselines.weights import BaselineWeights, load, save
from cones.objective import ConceptObjective
from cones.patches import applied
from cones.search import SearchProgress
from cones.targets import target_parameters

__all__ = ["PAPER", "applied", "constrained_merge", "load", "merge", "save", "train"]

METHOD = "custom_diffusion"
PAPER = {"steps": 600, "lr": 4e-5, "batch_size": 4}  # appendix B.3, effective learning rate


def train(
    pipe,
    objectives: ConceptObjective | Sequence[ConceptObjective],
    *,
    steps: int = 200,
    lr: float = 5e-4,
    token_lr: float | None = None,
    weight_decay: float = 1e-2,
    max_grad_norm: float | None = 1.0,
    callback: Callable[[SearchProgress], None] | None = None,
    disable: bool = False,
) -> BaselineWeights:
    """Train cross-attention K/V and the identifiers' rows on the objectives; `pipe` is left as it was.

    `steps` counts all subjects together (they take turns): pass n · S for n subjects. `token_lr`
    defaults to `lr`, as in Custom Diffusion, which trains both with one optimizer.
    """
    objectives = as_objectives(objectives)
    table = pipe.text_encoder.get_input_embeddings().weight
    init = {o.token: table[token_id(pipe.tokenizer, o.token)] for o in objectives}
    return fit(
        pipe,
        objectives,
        method=METHOD,
        unet_params=target_parameters(pipe.unet, "cross"),
        token_init=init,
        steps=steps,
        lr=lr,
        token_lr=token_lr,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        callback=callback,
        disable=disable,
    )


def constrained_merge(
    w0: torch.Tensor, c_reg: torch.Tensor, c: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """argmin_W ‖(W − W0) C_regᵀ‖_F subject to W Cᵀ = Vᵀ, in closed form.

    Args:
        w0: (out, in) the base weight W0.
        c_reg: (n_reg, in) inputs whose outputs should stay as W0 makes them (regularisation features).
        c: (n, in) inputs whose outputs are prescribed (the subjects' token features).
        v: (n, out) the prescribed outputs, row j for input row j.
    Returns:
        (out, in) the merged weight, in `w0`'s dtype. Computed in float64; the solves are least squares,
        so an infeasible or redundant set of constraints is met in the least-squares sense.
    """
    if c.ndim != 2 or v.ndim != 2 or c.shape[0] != v.shape[0]:
        raise ValueError(
            f"`c` {tuple(c.shape)} and `v` {tuple(v.shape)} must be (n, in) and (n, out) with the same n."
        )
    if c.shape[1] != w0.shape[1] or c_reg.shape[1] != w0.shape[1] or v.shape[1] != w0.shape[0]:
        raise ValueError(
            f"shapes do not fit W0 {tuple(w0.shape)}: `c_reg` {tuple(c_reg.shape)}, `c` {tuple(c.shape)}, "
            f"`v` {tuple(v.shape)}; pass (n_reg, in), (n, in), (n, out)."
        )
    w, cr, cc, vv = (t.detach().to("cpu", torch.float64) for t in (w0, c_reg, c, v))
    m = cr.T @ cr  # (in, in) C_regᵀ C_reg
    d = torch.linalg.lstsq(m, cc.T, driver="gelsd").solution.T  # (n, in) d = C M⁻¹ (M symmetric)
    a = d @ cc.T  # (n, n) d Cᵀ = C M⁻¹ Cᵀ
    r = vv - cc @ w.T  # (n, out) what the constraints still ask for: V − C W0ᵀ
    u = torch.linalg.lstsq(a, r, driver="gelsd").solution  # (n, out); uᵀ = rᵀ (d Cᵀ)⁻¹ since a is symmetric
    return (w + u.T @ d).to(w0.dtype)  # (out, in)


def _features(embeddings: TokenEmbeddings, prompts: Sequence[str]) -> torch.Tensor:
    """Token features (rows, dim) of `prompts`: positions 1 … end-of-text of each, as Custom Diffusion takes them."""
    ids = embeddings.token_ids(prompts)  # (n, L)
    out = embeddings.encode(prompts).detach().cpu()  # (n, L, dim)
    eos = embeddings.tokenizer.eos_token_id
    rows = []
    for i in range(len(prompts)):
        end = int((ids[i] == eos).nonzero()[0]) if (ids[i] == eos).any() else ids.shape[1] - 1
        rows.append(out[i, 1 : end + 1])  # skip the start token: it is the same in every prompt
    return torch.cat(rows)  # (rows, dim)


def _dedupe(c: torch.Tensor, values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Merge identical rows of `c` (a word shared by several subjects' prompts), averaging their wanted outputs."""
    unique, inverse = torch.unique(c, dim=0, return_inverse=True)  # (u, in), (n,)
    counts = torch.bincount(inverse, minlength=len(unique)).to(c.dtype)[:, None]  # (u, 1)
    averaged = {}
    for name, v in values.items():
        total = torch.zeros(len(unique), v.shape[1], dtype=v.dtype).index_add_(0, inverse, v)  # (u, out)
        averaged[name] = total / counts.to(v.dtype)
    return unique, averaged


@torch.no_grad()
def merge(
    pipe,
    weights: Sequence[BaselineWeights],
    prompts: Sequence[Sequence[str]],
    reg_prompts: Sequence[str],
) -> BaselineWeights:
    """Compose separately trained Custom Diffusion weights into one, without training (tuning-free).

    Args:
        pipe: the base pipeline the weights were trained on (with no baseline applied).
        weights: one `BaselineWeights` of `custom_diffusion` per subject, each with its own identifier.
        prompts: per subject, the prompts whose outputs it must keep (its identifier prompts,
            e.g. `["a sks circle", "a photo of a sks circle"]`).
        reg_prompts: many ordinary captions (hundreds) whose outputs should change as little as possible.
    Returns:
        One `BaselineWeights` with merged K/V matrices and all subjects' embedding rows.
    """
    # 1. Check the inputs.
    if len(weights) < 1 or len(weights) != len(prompts):
        raise ValueError(
            f"give one list of `prompts` per set of `weights`, got {len(prompts)} for {len(weights)}."
        )
    if not reg_prompts:
        raise ValueError(
            "`reg_prompts` is empty; pass a few hundred ordinary captions of the model's domain."
        )
    tokens: dict[str, torch.Tensor] = {}
    for w in weights:
        if w.method != METHOD:
            raise ValueError(
                f"`weights` holds {w.method} weights; only {METHOD} weights can be merged this way."
            )
        for word, row in w.tokens.items():
            if word in tokens:
                raise ValueError(
                    f"two sets of `weights` train the identifier {word!r}; give each subject its own token."
                )
            tokens[word] = row
    params = dict(pipe.unet.named_parameters())
    names = [n for n in target_parameters(pipe.unet, "cross") if any(n in w.unet for w in weights)]

    # 2. Text features: the subjects' prompts with every trained row in place, and the regularisation captions.
    embeddings = TokenEmbeddings(pipe.text_encoder, pipe.tokenizer, tokens)
    per_subject = [_features(embeddings, p) for p in prompts]  # [(n_i, in)]
    c = torch.cat(per_subject).double()  # (n, in)
    c_reg = _features(embeddings, list(reg_prompts)).double()  # (n_reg, in)

    # 3. What each subject's own weights make of its features, then the closed form per matrix.
    wanted = {
        name: torch.cat(
            [
                f.double() @ w.unet.get(name, params[name].detach().cpu()).double().T
                for f, w in zip(per_subject, weights, strict=True)
            ]
        )  # (n, out)
        for name in names
    }
    c, wanted = _dedupe(c, wanted)
    merged = {
        name: constrained_merge(params[name].detach().cpu().float(), c_reg, c, wanted[name]).float()
        for name in names
    }
    return BaselineWeights(
        method=METHOD,
        unet=merged,
        tokens={k: v.clone() for k, v in tokens.items()},
        metadata={
            "merged": [w.metadata for w in weights],
            "constraint_prompts": [list(p) for p in prompts],
            "num_reg_prompts": len(reg_prompts),
        },
    )
