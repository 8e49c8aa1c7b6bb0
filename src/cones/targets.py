"""Which UNet parameters can hold concept neurons.

The paper searches the key and value projections of the attention layers: `to_k` / `to_v` of
cross-attention (`attn2`, where the text enters the image) by default, optionally also of
self-attention (`attn1`). A target set is named by a preset or by explicit patterns, and is always
returned as the UNet's own parameter names (`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight`),
in `named_parameters` order, so that every other module can key its tensors by them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch

TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "cross": ("attn2.to_k.weight", "attn2.to_v.weight"),
    "self": ("attn1.to_k.weight", "attn1.to_v.weight"),
    "all": ("attn1.to_k.weight", "attn1.to_v.weight", "attn2.to_k.weight", "attn2.to_v.weight"),
}

Targets = str | Sequence[str]

_WILDCARDS = set("*?[")


def resolve_patterns(targets: Targets) -> tuple[str, ...]:
    """Turn a preset name (`"cross"`, `"self"`, `"all"`) or a sequence of patterns into patterns.

    A pattern is either a name suffix that matches at a dot boundary (`"attn2.to_k.weight"`) or, if it
    holds `*`, `?` or `[`, a glob over the full name (`"up_blocks.*.attn2.to_v.weight"`).
    """
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise ValueError(
                f"`targets` {targets!r} is not a preset; use one of {sorted(TARGET_PRESETS)} "
                "or pass a list of name suffixes such as ['attn2.to_k.weight']"
            )
        return TARGET_PRESETS[targets]
    patterns = tuple(targets)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(
            f"`targets` {patterns!r} must be a preset name or a non-empty list of non-empty strings"
        )
    return patterns


def _matches(name: str, pattern: str) -> bool:
    if _WILDCARDS & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


CANDIDATES = TARGET_PRESETS["all"]  # the only weights a concept may ever shut


def is_candidate(name: object) -> bool:
    """Whether `name` is a parameter a concept may name: an attention key/value weight of `"all"`.

    A concept file from a stranger may only shut these; `conv_in`, norms, `to_q` or the time embedding
    are refused by the reader whatever the file says.
    """
    return isinstance(name, str) and any(_matches(name, pattern) for pattern in CANDIDATES)


def target_parameters(unet: torch.nn.Module, targets: Targets = "cross") -> dict[str, torch.nn.Parameter]:
    """The UNet's candidate parameters, keyed by their names, in `named_parameters` order."""
    patterns = resolve_patterns(targets)
    found = {
        name: param
        for name, param in unet.named_parameters()
        if any(_matches(name, pattern) for pattern in patterns)
    }
    if not found:
        raise ValueError(
            f"`targets` {targets!r} matches no parameter of the {type(unet).__name__}; "
            f"use a preset {sorted(TARGET_PRESETS)} or suffixes such as 'attn2.to_k.weight'"
        )
    return found


def parameter_shapes(unet: torch.nn.Module, targets: Targets = "cross") -> dict[str, tuple[int, ...]]:
    """Shapes of the UNet's candidate parameters, keyed and ordered as in `target_parameters`."""
    return {name: tuple(param.shape) for name, param in target_parameters(unet, targets).items()}
