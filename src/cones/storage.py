"""The `.cones` file: one concept as a safetensors file of encoded indices plus a JSON header.

A `.cones` file is a plain safetensors file (no pickle, loads no code). Each target parameter with at
least one neuron is stored as one 1-D tensor keyed by its diffusers name
(`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight`), holding its indices in one of two
encodings:

- `"rice"` (default): a uint8 tensor with the bytes of `cones.codec.encode_indices`, within about 1% of
  the entropy bound;
- `"int32"`: the sorted indices as an int32 tensor, the paper's plain form.

The safetensors header metadata holds one key, `"cones"`, whose value is this JSON object:

    format          "cones"
    format_version  1 (a reader refuses newer versions and says to upgrade cones)
    library_version the cones version that wrote the file
    encoding        "rice" or "int32"
    token           the identifier token, or null
    class_word      the class word, or null
    parameters      {name: {"shape": [...], "count": n}} for ALL target parameters of the base model,
                    in the model's order (count 0: no tensor is stored)
    metadata        free JSON object; by convention metadata["search"] holds the search settings
    base_sha256     optional: {dtype: hex digest} of the base model's weights of these parameters (see
                    `cones.basemodel.weights_sha256`), checked when the concept is applied

Only the attention key/value weights that `cones.targets` makes candidates (`attn1`/`attn2` `to_k`/`to_v`,
2-D) may be named: a file naming any other weight is refused before anything is decoded. A file is read
only if it is a regular file of at most `MAX_FILE_BYTES`, with a header of at most 1 MiB; every count is
checked against the declared shapes and the caps below before any index is decoded, so the memory a file
can make cones use is bounded by those caps (a few hundred MB for the largest concept they admit, 2^23
neurons), whatever it claims; a file the caps refuse costs no more than reading it (at most
`MAX_FILE_BYTES`).

`load_concept_file` validates all of it and turns any damaged file into one `ConceptFileError` with a
one-line message; `save_concept` writes atomically (`cones.files`) and never overwrites unless asked to.
The bytes depend only on the concept: the same search gives the same file.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import numpy as np
import safetensors.numpy
import torch

from cones import __version__, codec, files
from cones.errors import InputError
from cones.neurons import ConceptNeurons
from cones.targets import is_candidate

FORMAT = "cones"
FORMAT_VERSION = 1
METADATA_KEY = "cones"
ENCODINGS = ("rice", "int32")
MAX_PARAMETER_NUMEL = 2**26  # 40x the largest K/V weight of SD 1.x / 2.x (1280 x 1280)
MAX_TOTAL_NUMEL = 2**31  # 4x all attention K/V weights of SDXL
MAX_TOTAL_NEURONS = 2**23  # a third of SD 2.x's cross-attention K/V; 64 MiB of int64 indices at most
MAX_HEADER_BYTES = files.MAX_HEADER_BYTES  # 1 MiB; a real concept's header is a few KB
MAX_FILE_BYTES = 4 * MAX_TOTAL_NEURONS + MAX_HEADER_BYTES + 4096  # the int32 form of the most neurons
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # the keys of `base_sha256`
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

_DTYPES = {"rice": "U8", "int32": "I32"}  # safetensors dtype of each encoding


class ConceptFileError(InputError):
    """A `.cones` file is missing, damaged, malformed, names weights a concept may not touch, or is of an
    unsupported format version."""


def save_concept(
    concept: ConceptNeurons,
    path: str | os.PathLike[str],
    *,
    encoding: str = "rice",
    overwrite: bool = False,
) -> None:
    """Write `concept` to a `.cones` file at `path`, atomically (see `cones.files.write_bytes`).

    Raises `OutputExistsError` (a `FileExistsError`) if `path` exists, or appears while writing, and not
    `overwrite`; `OutputError` (an `OSError`) if it cannot be written.
    """
    files.check_outputs([path], overwrite=overwrite)
    files.write_bytes(path, concept_to_bytes(concept, encoding=encoding), overwrite=overwrite)


def concept_to_bytes(concept: ConceptNeurons, *, encoding: str = "rice") -> bytes:
    """The bytes of a `.cones` file holding `concept` (see `save_concept`)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"`encoding` {encoding!r} is not supported; use one of {list(ENCODINGS)}")
    for name, shape in concept.shapes.items():
        if not is_candidate(name) or len(shape) != 2:
            raise ValueError(
                f"parameter `{name}` of shape {shape} is not an attention key/value weight; a .cones file "
                "holds only the candidates of `cones.targets` (attn1/attn2 to_k/to_v)"
            )
        if math.prod(shape) > MAX_PARAMETER_NUMEL:
            raise ValueError(
                f"parameter `{name}` has {math.prod(shape)} weights, more than a .cones file can hold"
            )
    if concept.total_weights > MAX_TOTAL_NUMEL or concept.num_neurons > MAX_TOTAL_NEURONS:
        raise ValueError(
            f"`concept` has {concept.num_neurons} neurons over {concept.total_weights} weights, "
            f"more than a .cones file holds ({MAX_TOTAL_NEURONS} over {MAX_TOTAL_NUMEL})"
        )

    # 1. Encode the indices of each parameter that has neurons.
    tensors: dict[str, np.ndarray] = {}
    for name, idx in concept.indices.items():
        if idx.numel():
            if encoding == "rice":
                data = codec.encode_indices(idx.numpy(), math.prod(concept.shapes[name]))
                tensors[name] = np.frombuffer(data, dtype=np.uint8)
            else:
                tensors[name] = idx.numpy().astype(np.int32)

    # 2. The JSON header.
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "encoding": encoding,
        "token": concept.token,
        "class_word": concept.class_word,
        "parameters": {
            name: {"shape": list(shape), "count": concept.indices[name].numel()}
            for name, shape in concept.shapes.items()
        },
        "metadata": concept.metadata,
    }
    if concept.base_sha256:
        header["base_sha256"] = dict(concept.base_sha256)
    try:
        header_json = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`concept.metadata` must be JSON-serialisable: {e}") from None
    return safetensors.numpy.save(tensors, metadata={METADATA_KEY: header_json})


def load_concept_file(path: str | os.PathLike[str]) -> ConceptNeurons:
    """Read and fully validate a `.cones` file; raise `ConceptFileError` if it is damaged in any way.

    A missing path, a folder, a device or FIFO, or a file over `MAX_FILE_BYTES` is refused before it is read.
    """
    try:
        data = files.read_file(
            path, max_bytes=MAX_FILE_BYTES, what="a .cones file", hint="pass the path of a .cones file"
        )
    except InputError as e:
        raise ConceptFileError(str(e)) from None
    try:
        return concept_from_bytes(data)
    except ConceptFileError as e:
        raise ConceptFileError(f"cannot read {str(path)!r}: {e}") from None


def concept_from_bytes(data: bytes) -> ConceptNeurons:
    """Parse the bytes of a `.cones` file (see `load_concept_file`)."""
    try:
        return _parse(data)
    except ConceptFileError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError, MemoryError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ConceptFileError(reason[:300]) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_header(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The safetensors header (tensor entries) and the parsed cones JSON object."""
    try:
        header, _ = files.parse_safetensors_header(data, max_header=MAX_HEADER_BYTES)
    except files.HeaderError as e:
        raise ConceptFileError(str(e)) from None
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not isinstance(metadata.get(METADATA_KEY), str):
        raise ConceptFileError(
            f"it has no {METADATA_KEY!r} metadata; it is a safetensors file but not a .cones file"
        )
    try:
        info = files.loads_json(metadata[METADATA_KEY], f"its {METADATA_KEY!r} metadata")
    except files.HeaderError as e:
        raise ConceptFileError(str(e)) from None
    if not isinstance(info, dict):
        raise ConceptFileError(f"its {METADATA_KEY!r} metadata is not a JSON object")
    return header, info


def _check_info(info: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], int]]:
    """Validate the cones JSON object; return {name: (shape, count)}."""
    if info.get("format") != FORMAT:
        raise ConceptFileError(f"`format` is {info.get('format')!r}, expected {FORMAT!r}")
    version = info.get("format_version")
    if not _is_int(version) or version < 1:
        raise ConceptFileError(f"`format_version` {version!r} is not a positive int")
    if version > FORMAT_VERSION:
        raise ConceptFileError(
            f"it has format_version {version}, newer than the {FORMAT_VERSION} this cones {__version__} reads; "
            "upgrade cones"
        )
    for key in ("library_version", "encoding", "token", "class_word", "parameters", "metadata"):
        if key not in info:
            raise ConceptFileError(f"its header lacks the key `{key}`")
    if not isinstance(info["library_version"], str):
        raise ConceptFileError(f"`library_version` {info['library_version']!r} is not a string")
    if info["encoding"] not in ENCODINGS:
        raise ConceptFileError(f"`encoding` {info['encoding']!r} is not one of {list(ENCODINGS)}")
    for key in ("token", "class_word"):
        if info[key] is not None and not isinstance(info[key], str):
            raise ConceptFileError(f"`{key}` {info[key]!r} is neither a string nor null")
    if not isinstance(info["metadata"], dict):
        raise ConceptFileError("`metadata` is not a JSON object")
    if not isinstance(info["parameters"], dict):
        raise ConceptFileError("`parameters` is not a JSON object")
    base = info.get("base_sha256")
    if base is not None and not (
        isinstance(base, dict)
        and base
        and all(k in DTYPE_NAMES and isinstance(v, str) and _SHA256.match(v) for k, v in base.items())
    ):
        raise ConceptFileError(
            f"`base_sha256` must map some of {list(DTYPE_NAMES)} to sha256 hex digests, got {str(base)[:80]}"
        )

    params: dict[str, tuple[tuple[int, ...], int]] = {}
    total = neurons = 0
    for name, entry in info["parameters"].items():
        if not isinstance(entry, dict) or set(entry) != {"shape", "count"}:
            raise ConceptFileError(
                f"`parameters[{name!r}]` must be an object with exactly `shape` and `count`"
            )
        if not is_candidate(name):
            raise ConceptFileError(
                f"it names the parameter `{str(name)[:120]}`, which is not an attention key/value weight; "
                "a concept may only shut the attn1/attn2 to_k/to_v weights of `cones.targets`"
            )
        shape, count = entry["shape"], entry["count"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ConceptFileError(
                f"`parameters[{name!r}].shape` {str(shape)[:80]} is not a list of non-negative ints"
            )
        if len(shape) != 2:
            raise ConceptFileError(
                f"`parameters[{name!r}].shape` {shape!r} is not 2-D, as every key/value weight is"
            )
        numel = math.prod(shape)
        total += numel
        if numel > MAX_PARAMETER_NUMEL or total > MAX_TOTAL_NUMEL:
            raise ConceptFileError(f"`parameters[{name!r}].shape` {shape!r} is implausibly large")
        if not _is_int(count) or not 0 <= count <= numel:
            raise ConceptFileError(
                f"`parameters[{name!r}].count` {str(count)[:40]} is not an int in [0, {numel}]"
            )
        neurons += count
        if neurons > MAX_TOTAL_NEURONS:
            raise ConceptFileError(f"it declares more than {MAX_TOTAL_NEURONS} neurons, implausibly many")
        params[name] = (tuple(shape), count)
    return params


def _check_entries(
    header: dict[str, Any], params: dict[str, tuple[tuple[int, ...], int]], encoding: str
) -> None:
    """Check the tensor entries against the parameters before any tensor is read."""
    dtype = _DTYPES[encoding]
    for name, entry in header.items():
        if name not in params:
            raise ConceptFileError(f"it stores tensor `{name}`, which is not among its `parameters`")
        shape, count = params[name]
        if count == 0:
            raise ConceptFileError(f"it stores tensor `{name}` whose `count` is 0")
        if not isinstance(entry, dict) or entry.get("dtype") != dtype:
            raise ConceptFileError(f"tensor `{name}` must have dtype {dtype} for encoding {encoding!r}")
        tshape = entry.get("shape")
        if not isinstance(tshape, list) or len(tshape) != 1 or not _is_int(tshape[0]):
            raise ConceptFileError(f"tensor `{name}` must be 1-D, got shape {tshape!r}")
        if encoding == "int32" and tshape[0] != count:
            raise ConceptFileError(f"tensor `{name}` holds {tshape[0]} indices but its `count` is {count}")
        numel = math.prod(shape)
        codes = numel - count if 2 * count > numel else count  # what the bytes must spell out
        if encoding == "rice" and tshape[0] < 1 + (codes + 7) // 8:
            raise ConceptFileError(
                f"tensor `{name}` has {tshape[0]} bytes, too few to hold the {codes} codes its `count` needs"
            )
    missing = [name for name, (_, count) in params.items() if count and name not in header]
    if missing:
        raise ConceptFileError(
            f"it lacks the tensor of parameter `{missing[0]}` (count {params[missing[0]][1]})"
        )


def _decode(name: str, array: np.ndarray, shape: tuple[int, ...], count: int, encoding: str) -> torch.Tensor:
    numel = math.prod(shape)
    if encoding == "rice":
        try:
            idx = codec.decode_indices(array.tobytes(), numel, count)
        except ValueError as e:
            raise ConceptFileError(f"tensor `{name}`: {e}") from None
    else:
        idx = array.astype(np.int64)
        if idx.size != count:
            raise ConceptFileError(f"tensor `{name}` holds {idx.size} indices but its `count` is {count}")
        if idx.size and (idx[0] < 0 or idx[-1] >= numel):
            raise ConceptFileError(f"tensor `{name}` holds indices outside [0, {numel})")
        if idx.size > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ConceptFileError(f"tensor `{name}` holds unsorted or repeated indices")
    return torch.from_numpy(idx)


def _parse(data: bytes) -> ConceptNeurons:
    # 1. The header: safetensors entries and the cones JSON.
    header, info = _read_header(data)
    params = _check_info(info)
    encoding = info["encoding"]
    _check_entries(header, params, encoding)

    # 2. The tensors, through the safetensors reader (which checks offsets and coverage).
    try:
        arrays = safetensors.numpy.load(data)
    except Exception as e:  # safetensors raises its own error types for malformed buffers
        raise ConceptFileError(f"its safetensors data is damaged ({' '.join(str(e).split())})") from None
    if set(arrays) != set(header):
        raise ConceptFileError("its safetensors tensors do not match its header")

    # 3. Decode and validate the indices.
    indices = {
        name: _decode(name, arrays[name], params[name][0], params[name][1], encoding)
        for name in params
        if name in arrays
    }
    return ConceptNeurons(
        indices,
        {name: shape for name, (shape, _) in params.items()},
        token=info["token"],
        class_word=info["class_word"],
        metadata=info["metadata"],
        base_sha256=info.get("base_sha256"),
    )
