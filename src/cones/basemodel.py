"""Does a concept belong to this base model? Names, shapes and a fingerprint of the weights, checked both ways.

A `.cones` file lists every candidate key/value weight of the model it was found on, with its shape, and
(since cones 0.2) `base_sha256`: a sha256 of those weights' bytes, taken in a fixed order after rounding to
float16 (bfloat16 for a bfloat16 model; `weights_sha256`, `recorded_dtype`), so that a float32 and a
float16 search write the same file, and a float32 or float16 model, or the files of a diffusers folder,
can be compared with it. A concept from a bfloat16 search cannot be compared with a float16 model, nor
one from a float32/float16 search with a bfloat16 model in memory: those are a `ConesWarning`, "not
checked". The command line compares with a diffusers folder's files before loading (float32 or float16
in practice), whatever `--dtype` the model is then loaded in. Before a concept is applied,
`check_concept` requires:

1. every parameter it names is a candidate (`cones.targets.is_candidate`) that the model has, with that
   shape;
2. every candidate of the model of the kinds the concept was searched over (its recorded `targets`, else
   the attn1/attn2 to_k/to_v kinds it names) is listed in the concept: a model with an extra transformer
   block per level is not the model the concept was found on;
3. the model's weights hash to the recorded digest: a fine-tune with the same layers is another model.
   This refuses by default; `force=True` (`--force`) applies the concept anyway with a `ConesWarning`.

Failures 1 and 2 are always refused, with a `ConceptMismatchError` naming the parameter.

The model can be described by a live UNet (`BaseTargets.from_unet`) or, before anything is loaded, by the
safetensors header and the key/value tensors of a diffusers folder's UNet (`BaseTargets.from_model_path`),
so that the command line decides all this before the base model is in memory.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from cones.errors import ConceptMismatchError, ConesWarning
from cones.targets import CANDIDATES, _matches, is_candidate, resolve_patterns

_FINGERPRINT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


def fingerprint_dtypes(dtype: torch.dtype) -> tuple[str, ...]:
    """The precisions the weights of a model of `dtype` can be compared in: any from float32/64, else its own."""
    if dtype in (torch.float32, torch.float64):
        return tuple(_FINGERPRINT_DTYPES)
    return tuple(name for name, d in _FINGERPRINT_DTYPES.items() if d == dtype)


def recorded_dtype(dtype: torch.dtype) -> str:
    """The one precision a concept found on a model of `dtype` records its fingerprint in: float16, which a
    float32 and a float16 model give alike (so that both searches write the same file), or bfloat16 for a
    bfloat16 model, whose weights cannot be rounded back to float16 reliably."""
    return "bfloat16" if dtype == torch.bfloat16 else "float16"


def weights_sha256(
    tensors: Mapping[str, torch.Tensor], dtypes: tuple[str, ...] | None = None
) -> dict[str, str] | None:
    """{dtype name: sha256 hex} over the tensors in the mapping's order: for each, its name, its shape and
    the bytes of its values rounded to float32 and then to the dtype (little-endian). `dtypes` defaults to
    the one `recorded_dtype` of the first tensor's dtype; None for no tensors."""
    if not tensors:
        return None
    if dtypes is None:
        dtypes = (recorded_dtype(next(iter(tensors.values())).dtype),)
    hashes = {name: hashlib.sha256() for name in dtypes}
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        label = f"{name}\0{tuple(t.shape)}\0".encode()
        for dtype_name, h in hashes.items():
            dtype = _FINGERPRINT_DTYPES[dtype_name]
            rounded = t.to(torch.float32).to(dtype).contiguous().reshape(-1)
            bits = rounded.view(torch.int16 if dtype != torch.float32 else torch.int32).numpy()
            h.update(label)
            h.update(bits.astype(bits.dtype.newbyteorder("<"), copy=False).tobytes())
    return {name: h.hexdigest() for name, h in hashes.items()} or None


@dataclass
class BaseTargets:
    """The candidate key/value weights of a base model: their shapes (model order), dtype and values."""

    label: str  # how messages name the model
    shapes: dict[str, tuple[int, ...]]
    dtype: torch.dtype
    tensor: Callable[[str], torch.Tensor]

    @classmethod
    def from_unet(cls, unet: torch.nn.Module) -> BaseTargets:
        """From a live UNet; weights shut by active concepts (`cones.switching`) count with their
        original values, so that a second concept is checked against the base model, not the first."""
        from cones.switching import _REGISTRY_ATTR

        params = {name: p for name, p in unet.named_parameters() if is_candidate(name)}
        dtype = next(iter(params.values())).dtype if params else torch.float32
        registry = unet.__dict__.get(_REGISTRY_ATTR)

        def tensor(name: str) -> torch.Tensor:
            value = params[name].detach()
            saved = registry.saved.get(name) if registry is not None else None
            if saved is None or saved.index.numel() == 0:
                return value
            original = value.clone().view(-1)
            original[saved.index.to(original.device)] = saved.original.to(original.device)
            return original.view(value.shape)

        return cls(type(unet).__name__, {name: tuple(p.shape) for name, p in params.items()}, dtype, tensor)

    @classmethod
    def from_model_path(cls, path: str | os.PathLike[str]) -> BaseTargets | None:
        """From a diffusers folder's `unet/diffusion_pytorch_model.safetensors`, reading only the header and
        the key/value tensors; None when the model is not stored so (a single-file checkpoint, `.bin`)."""
        from cones import files

        weights = os.path.join(os.fspath(path), "unet", "diffusion_pytorch_model.safetensors")
        if not os.path.isfile(weights):
            return None
        header, offset, size = files.read_safetensors_header(
            weights, hint="re-save the model (save_pretrained) or pass another --model"
        )
        header.pop("__metadata__", None)
        entries = {name: e for name, e in header.items() if is_candidate(name) and isinstance(e, dict)}
        shapes, dtypes = {}, set()
        for name, entry in entries.items():
            shape, dtype = entry.get("shape"), _SAFETENSORS_DTYPES.get(entry.get("dtype"))
            if not isinstance(shape, list) or dtype is None:
                return None  # not a layout cones can check from the file; the loaded model is checked
            shapes[name] = tuple(int(d) for d in shape)
            dtypes.add(dtype)
        if len(dtypes) > 1:
            return None

        def tensor(name: str) -> torch.Tensor:
            data = files.read_tensor_bytes(weights, header, offset, size, name)
            dtype = _SAFETENSORS_DTYPES[entries[name]["dtype"]]
            if len(data) != math.prod(shapes[name]) * dtype.itemsize:
                raise ConceptMismatchError(
                    f"the UNet of {os.fspath(path)!r} stores `{name}` with the wrong size"
                )
            array = np.frombuffer(bytearray(data), dtype=np.uint8)
            return torch.from_numpy(array).view(dtype).reshape(shapes[name])

        return cls(f"UNet of {os.fspath(path)!r}", shapes, dtypes.pop() if dtypes else torch.float32, tensor)


def _expected_names(concept, base: BaseTargets) -> list[str]:
    """The model's candidates the concept must list: those of its recorded targets, else of its kinds."""
    targets = (
        (concept.metadata.get("search") or {}).get("targets") if isinstance(concept.metadata, dict) else None
    )
    patterns: tuple[str, ...] = ()
    if targets is not None:
        try:
            patterns = resolve_patterns(targets)
        except (ValueError, TypeError):
            patterns = ()
    if not patterns:
        patterns = tuple(p for p in CANDIDATES if any(_matches(name, p) for name in concept.shapes))
    return [name for name in base.shapes if any(_matches(name, p) for p in patterns)]


def _compared_dtype(recorded: Mapping[str, str], dtype: torch.dtype) -> str | None:
    for name in fingerprint_dtypes(dtype):
        if name in recorded:
            return name
    return None


def check_concept(concept, base: BaseTargets, *, force: bool = False, name: str | None = None) -> None:
    """Raise `ConceptMismatchError` unless `concept` belongs to the model `base` describes (module doc).

    A fingerprint that differs raises too, unless `force`; then it is a `ConesWarning`. `name` (a file
    name) is used in messages.
    """
    what = f"concept {name}" if name else "concept"
    for param, shape in concept.shapes.items():
        if not is_candidate(param):
            raise ConceptMismatchError(
                f"parameter `{param}` of the {what} is not an attention key/value weight; a concept may only "
                "shut the attn1/attn2 to_k/to_v weights of `cones.targets`"
            )
        if param not in base.shapes:
            raise ConceptMismatchError(
                f"parameter `{param}` of the {what} is missing from the {base.label}; "
                "the concept was made for another base model"
            )
        if base.shapes[param] != tuple(shape):
            raise ConceptMismatchError(
                f"parameter `{param}` has shape {base.shapes[param]} in the {base.label} but {tuple(shape)} in "
                f"the {what}; the concept was made for another base model"
            )
    missing = [param for param in _expected_names(concept, base) if param not in concept.shapes]
    if missing:
        raise ConceptMismatchError(
            f"the {base.label} has the key/value weight `{missing[0]}` (and {len(missing) - 1} more) that the "
            f"{what} does not list; the concept was made for another base model"
        )
    if not concept.base_sha256 or not concept.shapes:
        return
    dtype = _compared_dtype(concept.base_sha256, base.dtype)
    if dtype is None:
        warnings.warn(
            f"the {what} records its base model's fingerprint for {sorted(concept.base_sha256)} weights, which a "
            f"{str(base.dtype).removeprefix('torch.')} model cannot be compared with; not checked",
            ConesWarning,
            stacklevel=2,
        )
        return
    digest = weights_sha256({param: base.tensor(param) for param in concept.shapes}, (dtype,))
    if digest and digest[dtype] == concept.base_sha256[dtype]:
        return
    message = (
        f"the weights of the {base.label} differ from those the {what} was found on (sha256 of its "
        f"{len(concept.shapes)} key/value weights in {dtype}); pass --force (force=True) to apply it anyway"
    )
    if not force:
        raise ConceptMismatchError(message)
    warnings.warn(
        message.split("; pass --force")[0] + "; applied anyway (--force)", ConesWarning, stacklevel=2
    )
