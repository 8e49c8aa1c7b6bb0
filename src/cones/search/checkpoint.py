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

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from cones import files
from cones.errors import InputError
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
    """Write the state after `step` steps to `path` atomically (`cones.files.write_bytes`)."""
    tensors = {f"state.{key}": t.detach().cpu().contiguous() for key, t in state.items()}
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64)  # (step,)
    header = {
        "version": CHECKPOINT_VERSION,
        "step": step,
        "search": _agreement(settings, theta0),
        "weights": tensors_fingerprint(theta0.values()),
    }
    data = safetensors.torch.save(tensors, metadata={_CHECKPOINT_KEY: json.dumps(header)})
    files.write_bytes(path, data, overwrite=True)


def check_checkpoint(path: str | os.PathLike, flag: str = "`checkpoint_path`") -> None:
    """Raise `SearchError` (one line) unless `path` can be a checkpoint: a new file in a writable folder, or
    an existing search checkpoint. Run before any slow work; settings are compared when resuming."""
    if not os.path.lexists(path):
        try:
            files.check_outputs([path], flag=flag)
        except files.OutputError as e:
            raise SearchError(str(e)) from None
        return
    _checkpoint_header(path)


def _checkpoint_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of the checkpoint at `path`, read within bounds; `SearchError` if it is not one."""
    shown = os.fspath(path)
    fix = "delete it or pass a new path to start a new search"
    try:
        header, _, _ = files.read_safetensors_header(path, hint=fix)
    except InputError as e:
        raise SearchError(str(e).replace("cannot read ", "cannot read the checkpoint ", 1)) from None
    meta = header.get("__metadata__")
    text = meta.get(_CHECKPOINT_KEY) if isinstance(meta, dict) else None
    if not isinstance(text, str):
        raise SearchError(f"`checkpoint_path` {shown!r} is not a search checkpoint; {fix}.")
    try:
        value = files.loads_json(text, "its header")
    except InputError as e:
        raise SearchError(f"`checkpoint_path` {shown!r} is damaged ({e}); {fix}.") from None
    if not isinstance(value, dict) or not isinstance(value.get("search"), dict):
        raise SearchError(f"`checkpoint_path` {shown!r} is damaged (no search settings); {fix}.")
    return value


def load_checkpoint(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    settings: dict[str, Any],
    theta0: dict[str, torch.Tensor],
) -> tuple[int, list[float]]:
    """Fill `state` in place from the checkpoint at `path`; return (steps done, loss history)."""
    header = _checkpoint_header(path)
    try:
        return _read_checkpoint(path, header, state, settings, theta0)
    except (SafetensorError, KeyError, ValueError, TypeError, RuntimeError) as e:
        if isinstance(e, SearchError):
            raise
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise SearchError(
            f"`checkpoint_path` {os.fspath(path)!r} is damaged ({reason}); delete it or pass a new path "
            "to start a new search."
        ) from None


def _read_checkpoint(
    path: str | os.PathLike,
    header: dict[str, Any],
    state: dict[str, torch.Tensor],
    settings: dict[str, Any],
    theta0: dict[str, torch.Tensor],
) -> tuple[int, list[float]]:
    with safe_open(os.fspath(path), framework="pt") as f:
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
