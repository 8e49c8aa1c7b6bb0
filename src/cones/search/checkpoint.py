"""Search checkpoints: the state after some steps, written atomically and resumed from.

A checkpoint is a safetensors file: the strategy's state tensors (`state.<key>`), the loss history, and under
the metadata key `cones_search` a JSON header with the step and what must agree for a resume (the method's
settings, the number of candidates, the objective's description, the targets' shapes, and a fingerprint of
the weights searched). The objective's seed fixes each step's draw, so the state and the step are all a
resumed search needs to end with the same concept as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cones.fingerprint import tensors_fingerprint
from cones.search.result import SearchError

__all__ = ["CHECKPOINT_VERSION", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_VERSION = 3  # 2: the objective's description is part of it; 3: the weights' fingerprint too
_CHECKPOINT_KEY = "cones_search"  # safetensors metadata key holding the checkpoint's JSON


_FREE = ("steps", "threshold", "sparsity", "targets", "restricted")  # settings a resumed search may change


def _agreement(settings: dict[str, Any], theta0: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What must agree between a checkpoint and the search resuming from it: the method's settings (name,
    rate, optimizer), the candidates, the objective and the targets' shapes."""
    return {
        **{key: value for key, value in settings.items() if key not in _FREE},
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


def save_checkpoint(
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
    header = {
        "version": CHECKPOINT_VERSION,
        "step": step,
        "search": _agreement(settings, theta0),
        "weights": tensors_fingerprint(theta0.values()),
    }
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp, metadata={_CHECKPOINT_KEY: json.dumps(header)})
    os.replace(tmp, path)


def load_checkpoint(
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
        expected = json.loads(json.dumps(_agreement(settings, theta0)))  # JSON-normalised, as stored
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
        if header.get("weights") != tensors_fingerprint(theta0.values()):
            raise SearchError(
                "`unet` weights differ from those the checkpoint was searched on; resume on the unmodified model."
            )
        for key, t in state.items():
            t.copy_(f.get_tensor(f"state.{key}"))
        losses = f.get_tensor("losses").tolist()
    return step, losses
