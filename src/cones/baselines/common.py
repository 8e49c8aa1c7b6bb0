"""What the three baselines share: trained weights as a small object, applying and removing them bit for bit,
identifier prompts re-encoded through trainable token embeddings, and one training loop.

The competitors of the paper's comparison (section 4.1, appendix B) differ only in *which* weights they
train, so one loop (`fit`) serves all three:

    DreamBooth          every UNet weight                                             (`baselines.dreambooth`)
    Custom Diffusion    cross-attention to_k / to_v + the identifier's embedding row   (`baselines.custom_diffusion`)
    Textual Inversion   the identifier's embedding row, initialised from the class word (`baselines.textual_inversion`)

All of them minimise the concept-implanting loss of `cones.objective` (subject loss + λ · prior
preservation), on the same images, class images, prompts and seed as the concept-neuron search: they are
handed the very `ConceptObjective`s the search uses. A `ConceptObjective` encodes its prompts once, with
the frozen text encoder; when an embedding row is trained, `TokenObjective` re-encodes the identifier
prompts at every step through `TokenEmbeddings`, so that the gradient reaches the row. Several subjects
train jointly (`JointObjective`): the steps take turns over the subjects, so `steps = n · per-subject
steps` gives each subject the steps it would have alone, as in the paper (appendix B: "training steps
increase linearly as the number of involved subjects increases").

What training produces is a `BaselineWeights`: the UNet tensors that changed and the trained embedding
rows, on the CPU. `apply(pipe, weights)` writes them into a pipeline and keeps exact copies of what they
replace; `remove(pipe)` puts those back, so the pipeline is bit-for-bit the base model again. `save`
writes a safetensors file (the Table 2 storage cost is its size), `load` reads one back.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from cones import files
from cones.objective import ConceptObjective
from cones.search import SearchProgress

__all__ = [
    "METHODS",
    "BaselineWeights",
    "JointObjective",
    "TokenEmbeddings",
    "TokenObjective",
    "apply",
    "applied",
    "applied_weights",
    "fit",
    "load",
    "remove",
    "save",
    "token_id",
]

METHODS = ("dreambooth", "custom_diffusion", "textual_inversion")
FORMAT = "cones-baseline"
FORMAT_VERSION = 1
METADATA_KEY = "cones_baseline"  # safetensors header key holding the JSON description
_STATE_ATTR = "_cones_baseline"  # pipeline attribute holding what `apply` replaced
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(eq=False)
class BaselineWeights:
    """What a baseline learned: UNet tensors and identifier embedding rows, on the CPU.

    `unet` maps a UNet parameter name (`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight`)
    to its trained value; `tokens` maps an identifier word ("sks") to its trained embedding row (dim,).
    `losses` is the training loss at each step (not saved in files).
    """

    method: str
    unet: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {list(METHODS)}, got {self.method!r}.")

    @property
    def num_parameters(self) -> int:
        """How many numbers the weights hold (UNet tensors plus embedding rows)."""
        return sum(t.numel() for t in self.unet.values()) + sum(t.numel() for t in self.tokens.values())

    def __repr__(self) -> str:
        return (
            f"BaselineWeights(method={self.method!r}, unet_tensors={len(self.unet)}, "
            f"tokens={list(self.tokens)}, parameters={self.num_parameters:,})"
        )


# -- identifier tokens -----------------------------------------------------------------------------------


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


# -- training --------------------------------------------------------------------------------------------


def _as_list(objectives: ConceptObjective | Sequence[ConceptObjective]) -> list[ConceptObjective]:
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
    objectives = _as_list(objectives)
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


# -- applying to a pipeline ------------------------------------------------------------------------------


@dataclass
class _Applied:
    weights: BaselineWeights
    unet: dict[str, torch.Tensor]  # exact copies of the replaced UNet tensors
    rows: dict[int, torch.Tensor]  # token id -> exact copy of the replaced embedding row


def _check_fits(pipe, weights: BaselineWeights) -> dict[str, nn.Parameter]:
    params = dict(pipe.unet.named_parameters())
    for name, t in weights.unet.items():
        if name not in params:
            raise ValueError(
                f"`weights` holds `{name}`, which this UNet lacks; they were trained on another model."
            )
        if tuple(t.shape) != tuple(params[name].shape):
            raise ValueError(
                f"`weights` give `{name}` the shape {tuple(t.shape)}, the UNet {tuple(params[name].shape)}; "
                "they were trained on another model."
            )
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    for word, row in weights.tokens.items():
        token_id(pipe.tokenizer, word, name="weights.tokens")
        if tuple(row.shape) != (dim,):
            raise ValueError(
                f"`weights` give {word!r} a row of shape {tuple(row.shape)}; this text encoder's are ({dim},)."
            )
    return {name: params[name] for name in weights.unet}


@torch.no_grad()
def apply(pipe, weights: BaselineWeights) -> None:
    """Write `weights` into `pipe` (UNet tensors and embedding rows), keeping copies of what they replace.

    One set of baseline weights at a time: `remove` the current one before applying another.
    """
    current = applied_weights(pipe)
    if current is not None:
        raise ValueError(
            f"`pipe` already has {current.method} weights applied; call `remove(pipe)` before applying others."
        )
    params = _check_fits(pipe, weights)
    table = pipe.text_encoder.get_input_embeddings().weight
    ids = {token_id(pipe.tokenizer, word): row for word, row in weights.tokens.items()}
    state = _Applied(
        weights=weights,
        unet={name: p.detach().clone() for name, p in params.items()},
        rows={i: table[i].detach().clone() for i in ids},
    )
    for name, p in params.items():
        p.copy_(weights.unet[name])
    for i, row in ids.items():
        table[i] = row.to(table.device, table.dtype)
    setattr(pipe, _STATE_ATTR, state)


@torch.no_grad()
def remove(pipe, weights: BaselineWeights | None = None) -> None:
    """Put back exactly what `apply` replaced; `weights`, when given, must be what is applied."""
    state: _Applied | None = getattr(pipe, _STATE_ATTR, None)
    if state is None:
        raise ValueError("`pipe` has no baseline weights applied; nothing to remove.")
    if weights is not None and weights is not state.weights:
        raise ValueError(
            f"`weights` are not the ones applied to `pipe` ({state.weights!r}); pass those or None."
        )
    params = dict(pipe.unet.named_parameters())
    for name, original in state.unet.items():
        params[name].copy_(original)
    table = pipe.text_encoder.get_input_embeddings().weight
    for i, row in state.rows.items():
        table[i] = row
    delattr(pipe, _STATE_ATTR)


def applied_weights(pipe) -> BaselineWeights | None:
    """The baseline weights applied to `pipe` now, or None."""
    state = getattr(pipe, _STATE_ATTR, None)
    return state.weights if state is not None else None


@contextmanager
def applied(pipe, weights: BaselineWeights) -> Iterator[None]:
    """`apply` for the duration of a `with` block, then `remove`, also on errors."""
    apply(pipe, weights)
    try:
        yield
    finally:
        remove(pipe, weights)


# -- files -----------------------------------------------------------------------------------------------


def save(
    weights: BaselineWeights,
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> int:
    """Write `weights` to a safetensors file atomically; return its size in bytes.

    Tensors are stored as `unet.<parameter name>` and `token.<word>` in `dtype` (float32, or float16 /
    bfloat16 for half the bytes); the header's `cones_baseline` key holds the method and metadata as JSON.
    """
    path = Path(path)
    names = {v: k for k, v in _DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"`dtype` must be one of {list(_DTYPES)}, got {dtype}.")
    files.check_outputs([path], overwrite=overwrite)
    tensors = {f"unet.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in weights.unet.items()}
    tensors |= {f"token.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in weights.tokens.items()}
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": weights.method,
        "dtype": names[dtype],
        "metadata": weights.metadata,
    }
    files.write_bytes(
        path,
        safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(header)}),
        overwrite=overwrite,
    )
    return path.stat().st_size


def load(path: str | os.PathLike[str]) -> BaselineWeights:
    """Read a file written by `save`; tensors come back in float32 on the CPU."""
    path = os.fspath(path)
    # A regular file with a bounded header before safetensors maps it (never /dev/zero or a FIFO).
    files.read_safetensors_header(path, hint="pass a file written by `cones.baselines.save`")
    try:
        with safe_open(path, framework="pt") as f:
            header = json.loads((f.metadata() or {}).get(METADATA_KEY, "null"))
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise ValueError(
                    f"`path` {path!r} is not a cones baseline file (no `{METADATA_KEY}` header); pass a file "
                    "written by `cones.baselines.save`."
                )
            if header.get("format_version") != FORMAT_VERSION:
                raise ValueError(
                    f"`path` {path!r} has format version {header.get('format_version')}; this cones reads "
                    f"{FORMAT_VERSION}, upgrade cones."
                )
            unet, tokens = {}, {}
            for key in f.keys():
                kind, _, name = key.partition(".")
                target = {"unet": unet, "token": tokens}.get(kind)
                if target is None or not name:
                    raise ValueError(
                        f"`path` {path!r} holds an unexpected tensor {key!r}; the file is damaged."
                    )
                target[name] = f.get_tensor(key).float()
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ValueError(f"`path` {path!r} is not a readable safetensors file ({e}); re-create it.") from None
    return BaselineWeights(
        method=header.get("method"), unet=unet, tokens=tokens, metadata=header.get("metadata") or {}
    )
