"""Tuned values of concept neurons: the `TunedConcept` patch, its value codecs and its `.cones-values` file.

Binary precision is Cones itself: the concept neurons are shut (set to 0), nothing is tuned, and a `.cones`
file of indices is all there is to store. The other precisions (paper sec. 3.2, fig. 3) store a value per
neuron next to the indices:

- `"float32"`, `"float16"`: a free value per neuron, stored in that dtype;
- `"quaternary"`: a value in {0, 1/3, 2/3, 1} · θ0 per neuron (θ0 the base model's weight there), i.e. a
  2-bit code c with value c/3 · θ0; nothing but the codes is stored (no codebook), since θ0 is in the
  base model.

Using tuned values: `TunedConcept` is a `cones.patches.Patch` of a UNet: `apply(unet)` writes the values in
and `remove(unet)` restores the original weights bit for bit (`with tuned.applied(unet): ...` does both).
One tuned concept at a time per UNet, and not together with shut concepts (`cones.switching`): to combine
subjects, tune their union.

The values file (`.cones-values`, a plain safetensors file next to the concept's `.cones` file, which it
leaves untouched, so `cones.storage.load_concept_file` reads the indices as always): one 1-D tensor per
parameter with neurons, keyed by its diffusers name, holding that parameter's values in the order of the
concept's sorted indices: F32 or F16 values, or for quaternary U8 bytes packing four 2-bit codes each (the
first neuron in the lowest two bits; the last byte padded with zero codes). Its safetensors metadata has one
key, `"cones_values"`, holding this JSON object:

    format          "cones-values"
    format_version  1
    precision       "float32", "float16" or "quaternary"
    concept         the sha256 fingerprint of the concept's parameters, shapes and indices
                    (`cones.fingerprint.concept_fingerprint`)
    counts          {name: number of neurons} for the parameters with neurons
    metadata        free JSON object (tuning settings, by convention under "tune")

`load_values` refuses a file whose fingerprint is not the given concept's. Binary has no values file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors.numpy
import torch

from cones import files, switching
from cones.errors import InputError
from cones.fingerprint import concept_fingerprint
from cones.neurons import ConceptNeurons
from cones.patches import Patch

__all__ = [
    "PRECISIONS",
    "TunedConcept",
    "ValuesFileError",
    "check_precision",
    "load_values",
    "pack_codes",
    "quaternary_codes",
    "quaternary_values",
    "read_values_file_header",
    "read_values_header",
    "unpack_codes",
    "values_bytes",
]

PRECISIONS = ("float32", "float16", "quaternary", "binary")
LEVELS = 4  # quaternary: codes 0..3, value code / 3 · θ0
FORMAT = "cones-values"
FORMAT_VERSION = 1
METADATA_KEY = "cones_values"
_REGISTRY_ATTR = "_cones_tuned"
_DTYPES = {"float32": ("F32", np.float32), "float16": ("F16", np.float16), "quaternary": ("U8", np.uint8)}


MAX_FILE_BYTES = (
    4 * 2**23 + files.MAX_HEADER_BYTES + 4096
)  # float32 values of the most neurons a .cones holds


class ValuesFileError(InputError):
    """A `.cones-values` file is damaged, of another format version, or belongs to another concept."""


def check_precision(precision: str) -> None:
    """Raise a one-line ValueError unless `precision` is one of `PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` {precision!r} is not supported; use one of {list(PRECISIONS)}")


# -- the value codecs -----------------------------------------------------------------------------------


def quaternary_values(codes: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
    """Codes (n,) in 0..3 and original weights θ0 (n,) -> values code/3 · θ0, in θ0's dtype."""
    return codes.to(theta0.dtype) / (LEVELS - 1) * theta0


def quaternary_codes(xi: torch.Tensor) -> torch.Tensor:
    """ξ (n,) -> the nearest quaternary code of clamp(ξ, 0, 1), as uint8 (n,)."""
    return torch.round(xi.clamp(0, 1) * (LEVELS - 1)).to(torch.uint8)


def pack_codes(codes: torch.Tensor) -> np.ndarray:
    """uint8 codes (n,) in 0..3 -> (⌈n/4⌉,) uint8 bytes, four codes each, the first in the lowest bits."""
    c = codes.detach().cpu().numpy().astype(np.uint8).reshape(-1)
    if c.size and c.max() >= LEVELS:
        raise ValueError(f"`codes` holds {int(c.max())}; quaternary codes are 0..{LEVELS - 1}")
    padded = np.zeros(4 * math.ceil(c.size / 4), dtype=np.uint8)
    padded[: c.size] = c
    quads = padded.reshape(-1, 4)
    return quads[:, 0] | (quads[:, 1] << 2) | (quads[:, 2] << 4) | (quads[:, 3] << 6)


def unpack_codes(packed: np.ndarray, count: int) -> torch.Tensor:
    """Inverse of `pack_codes`: (⌈count/4⌉,) uint8 -> uint8 codes (count,)."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != math.ceil(count / 4):
        raise ValueError(f"{packed.size} packed bytes cannot hold exactly {count} quaternary codes")
    quads = np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], axis=1).reshape(-1)  # (4 ⌈count/4⌉,)
    if quads[count:].any():
        raise ValueError("the padding codes after the last neuron are not zero")
    return torch.from_numpy(quads[:count].copy())


def values_bytes(precision: str, count: int) -> int:
    """Bytes of the stored values of `count` neurons: 4 or 2 per neuron, 2 bits per neuron, or none."""
    check_precision(precision)
    return {"float32": 4 * count, "float16": 2 * count, "quaternary": math.ceil(count / 4), "binary": 0}[
        precision
    ]


# -- the tuned concept and its file -------------------------------------------------------------------


@dataclass(eq=False)
class TunedConcept(Patch):
    """A concept with tuned values for its neurons (or, for `"binary"`, none: shut).

    `values[name]` is aligned with `concept.indices[name]`: float32 / float16 values of the weights there,
    or uint8 quaternary codes (value code/3 · θ0). Parameters without neurons have no entry.
    """

    concept: ConceptNeurons
    precision: str
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_precision(self.precision)
        expected = {name for name, idx in self.concept.indices.items() if idx.numel()}
        if self.precision == "binary":
            if self.values:
                raise ValueError("`values` must be empty for precision 'binary' (the neurons are shut)")
            return
        if set(self.values) != expected:
            missing = sorted(expected - set(self.values)) or sorted(set(self.values) - expected)
            raise ValueError(
                f"`values` must have one entry per parameter with neurons; `{missing[0]}` is missing or extra"
            )
        dtype = {"float32": torch.float32, "float16": torch.float16, "quaternary": torch.uint8}[
            self.precision
        ]
        for name, v in self.values.items():
            count = self.concept.indices[name].numel()
            if v.dtype != dtype or tuple(v.shape) != (count,):
                raise ValueError(
                    f"`values[{name!r}]` must be a ({count},) {dtype} tensor for precision {self.precision!r}, "
                    f"got {tuple(v.shape)} {v.dtype}"
                )
            if self.precision == "quaternary" and v.numel() and int(v.max()) >= LEVELS:
                raise ValueError(f"`values[{name!r}]` holds code {int(v.max())}; quaternary codes are 0..3")
            if self.precision != "quaternary" and not bool(torch.isfinite(v).all()):
                raise ValueError(f"`values[{name!r}]` holds inf or nan; tune again in float32")

    @property
    def values_bytes(self) -> int:
        """Bytes the values take (without the indices): 4 / 2 per neuron, 2 bits per neuron, or 0."""
        return values_bytes(self.precision, self.concept.num_neurons)

    def weights(self, originals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The values to write at each parameter's neurons, given the original weights there (name -> (n,))."""
        out = {}
        for name, idx in self.concept.indices.items():
            if not idx.numel():
                continue
            theta0 = originals[name]
            if self.precision == "binary":
                out[name] = torch.zeros_like(theta0)
            elif self.precision == "quaternary":
                out[name] = quaternary_values(self.values[name].to(theta0.device), theta0.float()).to(
                    theta0.dtype
                )
            else:
                out[name] = self.values[name].to(theta0.device, theta0.dtype)
        return out

    # -- the model ----------------------------------------------------------------------------------

    def apply(self, unet: torch.nn.Module) -> None:
        """Write the tuned values into `unet` in place; `remove` restores the original weights bit for bit."""
        if unet.__dict__.get(_REGISTRY_ATTR) is not None:
            raise ValueError(
                "a tuned concept is already applied to this UNet; `remove` it first (one at a time)"
            )
        if switching.applied_concepts(unet):
            raise ValueError(
                "concepts are shut in this UNet (`cones.switching`); remove them before applying tuned values"
            )
        params = self.concept.parameters_in(unet)
        saved = {}
        with torch.no_grad():
            for name, idx in self.concept.indices.items():
                if idx.numel():
                    flat = params[name].detach().view(-1)
                    saved[name] = flat.index_select(0, idx.to(flat.device))
            for name, value in self.weights(saved).items():
                flat = params[name].detach().view(-1)
                flat.index_copy_(0, self.concept.indices[name].to(flat.device), value.to(flat.dtype))
        unet.__dict__[_REGISTRY_ATTR] = (self, saved)

    def remove(self, unet: torch.nn.Module) -> None:
        """Undo `apply`: every weight it changed gets its original bits back."""
        entry = unet.__dict__.get(_REGISTRY_ATTR)
        if entry is None or entry[0] is not self:
            raise ValueError("this tuned concept is not applied to this UNet; call `apply` before `remove`")
        _, saved = entry
        with torch.no_grad():
            for name, original in saved.items():
                flat = unet.get_parameter(name).detach().view(-1)
                flat.index_copy_(0, self.concept.indices[name].to(flat.device), original)
        del unet.__dict__[_REGISTRY_ATTR]

    # -- files --------------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The bytes of the `.cones-values` file (see the module docstring); not for `"binary"`."""
        if self.precision == "binary":
            raise ValueError("precision 'binary' stores no values; the `.cones` file is all there is")
        tensors = {}
        for name, v in self.values.items():
            tensors[name] = pack_codes(v) if self.precision == "quaternary" else v.cpu().numpy()
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "precision": self.precision,
            "concept": concept_fingerprint(self.concept),
            "counts": {name: int(v.numel()) for name, v in self.values.items()},
            "metadata": self.metadata,
        }
        try:
            text = json.dumps(header, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"`metadata` must be JSON-serialisable: {e}") from None
        return safetensors.numpy.save(tensors, metadata={METADATA_KEY: text})

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the `.cones-values` file at `path`, atomically; never overwrites unless asked to."""
        files.check_outputs([path], overwrite=overwrite)
        files.write_bytes(path, self.to_bytes(), overwrite=overwrite)


def read_values_header(data: bytes) -> dict[str, Any]:
    """The `cones_values` JSON object of a values file's bytes; `ValuesFileError` if there is none."""
    try:
        header, _ = files.parse_safetensors_header(data)
    except files.HeaderError as e:
        raise ValuesFileError(str(e)) from None
    try:
        meta = header.get("__metadata__") or {}
        info = files.loads_json(meta[METADATA_KEY], "its metadata")
    except (ValueError, KeyError, AttributeError, TypeError):
        raise ValuesFileError(
            f"it has no {METADATA_KEY!r} metadata; it is not a .cones-values file"
        ) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValuesFileError(f"its `format` is not {FORMAT!r}")
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ValuesFileError(
            f"it has format_version {version!r}; this cones reads {FORMAT_VERSION}, upgrade cones"
        )
    for key in ("precision", "concept", "counts", "metadata"):
        if key not in info:
            raise ValuesFileError(f"its header lacks the key `{key}`")
    if info["precision"] not in PRECISIONS[:3]:
        raise ValuesFileError(f"its `precision` {info['precision']!r} is not one of {list(PRECISIONS[:3])}")
    return info


def _read_values_file(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> bytes:
    try:
        return files.read_file(
            path, max_bytes=max_bytes, what="a .cones-values file", hint="pass a .cones-values file"
        )
    except InputError as e:
        raise ValuesFileError(str(e)) from None


def read_values_file_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """`read_values_header` of the file at `path`, reading at most its header."""
    try:
        header, _, _ = files.read_safetensors_header(path, hint="pass a .cones-values file")
    except InputError as e:
        raise ValuesFileError(str(e)) from None
    encoded = json.dumps(header).encode()
    try:
        return read_values_header(len(encoded).to_bytes(8, "little") + encoded)
    except ValuesFileError as e:
        raise ValuesFileError(f"cannot read {os.fspath(path)!r}: {e}") from None


def load_values(path: str | os.PathLike[str], concept: ConceptNeurons) -> TunedConcept:
    """Read a `.cones-values` file for `concept`; `ValuesFileError` if damaged or for another concept."""
    data = _read_values_file(path)
    try:
        return _parse(data, concept)
    except ValuesFileError as e:
        raise ValuesFileError(f"cannot read {str(path)!r}: {e}") from None


def _parse(data: bytes, concept: ConceptNeurons) -> TunedConcept:
    info = read_values_header(data)
    if info["concept"] != concept_fingerprint(concept):
        raise ValuesFileError(
            "it holds values for another concept (fingerprint mismatch); pass the .cones file it was tuned for"
        )
    try:
        arrays = safetensors.numpy.load(data)
    except Exception as e:  # safetensors raises its own error types for malformed buffers
        raise ValuesFileError(f"its safetensors data is damaged ({' '.join(str(e).split())})") from None
    precision = info["precision"]
    counts = {name: idx.numel() for name, idx in concept.indices.items() if idx.numel()}
    if info["counts"] != counts or set(arrays) != set(counts):
        raise ValuesFileError("its tensors do not match the concept's neurons")
    values = {}
    for name, count in counts.items():
        array = arrays[name]
        if array.dtype != _DTYPES[precision][1] or array.ndim != 1:
            raise ValuesFileError(f"tensor `{name}` must be 1-D {_DTYPES[precision][0]} for {precision!r}")
        try:
            if precision == "quaternary":
                values[name] = unpack_codes(array, count)
            else:
                values[name] = torch.from_numpy(array.copy())
        except ValueError as e:
            raise ValuesFileError(f"tensor `{name}`: {e}") from None
    try:
        return TunedConcept(concept, precision, values, metadata=info["metadata"])
    except ValueError as e:
        raise ValuesFileError(str(e)) from None
