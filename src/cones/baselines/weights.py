"""What a baseline learned, as a small object: `BaselineWeights`, applied to a pipeline and removed bit for bit,
saved to and loaded from a safetensors file.

`BaselineWeights` holds the UNet tensors that changed and the trained embedding rows, on the CPU. It is a
`cones.patches.Patch` of a pipeline: `weights.apply(pipe)` writes them in and keeps exact copies of what they
replace, `weights.remove(pipe)` puts those back, so the pipeline is bit for bit the base model again
(`with applied(pipe, weights): ...` does both). `save` writes a safetensors file (the Table 2 storage cost is
its size), `load` reads one back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from cones import files
from cones.baselines.tokens import token_id
from cones.patches import Patch

__all__ = ["FORMAT", "METHODS", "BaselineWeights", "applied_weights", "load", "save"]

METHODS = ("dreambooth", "custom_diffusion", "textual_inversion")
FORMAT = "cones-baseline"
FORMAT_VERSION = 1
METADATA_KEY = "cones_baseline"  # safetensors header key holding the JSON description
_STATE_ATTR = "_cones_baseline"  # pipeline attribute holding what `apply` replaced
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(eq=False)
class BaselineWeights(Patch):
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

    @torch.no_grad()
    def apply(self, pipe) -> None:
        """Write the weights into `pipe` (UNet tensors and embedding rows), keeping copies of what they replace.

        One set of baseline weights at a time: `remove` the current one before applying another.
        """
        current = applied_weights(pipe)
        if current is not None:
            raise ValueError(
                f"`pipe` already has {current.method} weights applied; call `remove(pipe)` before applying others."
            )
        params = _check_fits(pipe, self)
        table = pipe.text_encoder.get_input_embeddings().weight
        ids = {token_id(pipe.tokenizer, word): row for word, row in self.tokens.items()}
        state = _Applied(
            weights=self,
            unet={name: p.detach().clone() for name, p in params.items()},
            rows={i: table[i].detach().clone() for i in ids},
        )
        for name, p in params.items():
            p.copy_(self.unet[name])
        for i, row in ids.items():
            table[i] = row.to(table.device, table.dtype)
        setattr(pipe, _STATE_ATTR, state)

    @torch.no_grad()
    def remove(self, pipe) -> None:
        """Put back exactly what `apply` replaced; these must be the weights applied to `pipe`."""
        state: _Applied | None = getattr(pipe, _STATE_ATTR, None)
        if state is None:
            raise ValueError("`pipe` has no baseline weights applied; nothing to remove.")
        if self is not state.weights:
            raise ValueError(
                f"`weights` are not the ones applied to `pipe` ({state.weights!r}); remove those."
            )
        params = dict(pipe.unet.named_parameters())
        for name, original in state.unet.items():
            params[name].copy_(original)
        table = pipe.text_encoder.get_input_embeddings().weight
        for i, row in state.rows.items():
            table[i] = row
        delattr(pipe, _STATE_ATTR)


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


def applied_weights(pipe) -> BaselineWeights | None:
    """The baseline weights applied to `pipe` now, or None."""
    state = getattr(pipe, _STATE_ATTR, None)
    return state.weights if state is not None else None


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
