"""Write the hand-made bad `.cones` files of this folder and `expected.json` (what each must be refused with).

Run from the repository root: `python tests/data/bad-concepts/make_corpus.py`. Each file is built by hand
(8-byte size, JSON header, tensor bytes), not by cones' writer, and is a few KB at most. `expected.json`
maps each file name to a part of the one-line message that both the API (`load_concept_file`) and the
command line (`cones inspect`, `cones generate --concept`) must give.
"""

from __future__ import annotations

import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
V = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"


def safetensors(tensors: dict[str, tuple[str, list[int], bytes]], info: dict | str | None) -> bytes:
    """A safetensors file: {name: (dtype, shape, raw bytes)} and the `cones` metadata (object or raw text)."""
    header: dict = {}
    body = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    if info is not None:
        header["__metadata__"] = {"cones": info if isinstance(info, str) else json.dumps(info)}
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def info(parameters: dict, **fields) -> dict:
    base = {
        "format": "cones",
        "format_version": 1,
        "library_version": "0.1.0",
        "encoding": "int32",
        "token": "sks",
        "class_word": "dog",
        "parameters": parameters,
        "metadata": {},
    }
    return {**base, **fields}


def int32(values: list[int]) -> bytes:
    return struct.pack(f"<{len(values)}i", *values)


def one(name: str, shape: list[int], indices: list[int], **fields) -> bytes:
    """A file shutting `indices` of one parameter `name` (int32 encoding)."""
    params = {name: {"shape": shape, "count": len(indices)}}
    return safetensors({name: ("I32", [len(indices)], int32(indices))}, info(params, **fields))


CASES: dict[str, tuple[bytes, str]] = {
    # weights a concept may never touch: refused and named, whatever the file says
    "conv_in.cones": (
        one("conv_in.weight", [16, 4, 3, 3], [0, 1, 2]),
        "`conv_in.weight`, which is not an attention key/value weight",
    ),
    "conv_out.cones": (
        one("conv_out.weight", [4, 16, 3, 3], [5]),
        "`conv_out.weight`, which is not an attention key/value weight",
    ),
    "time_embedding.cones": (
        one("time_embedding.linear_1.weight", [64, 16], [7]),
        "`time_embedding.linear_1.weight`, which is not",
    ),
    "to_q.cones": (
        one(K.replace("to_k", "to_q"), [16, 16], [1, 2]),
        "attn2.to_q.weight`, which is not an attention key/value weight",
    ),
    "norm_bias.cones": (
        one(K.replace("attn2.to_k.weight", "norm1.bias"), [16], [0]),
        "norm1.bias`, which is not",
    ),
    "to_k_bias.cones": (one(K.replace(".weight", ".bias"), [16], [0]), "to_k.bias`, which is not"),
    "one_d_shape.cones": (one(K, [512], [3]), "is not 2-D, as every key/value weight is"),
    # bombs: what the file claims is refused before anything large is allocated or read
    "complement_bomb.cones": (
        safetensors(
            {K: ("U8", [2], bytes([0x40 | 0, 0x80]))},
            info({K: {"shape": [2**13, 2**14], "count": 2**27 - 1}}, encoding="rice"),
        ),
        "`parameters['down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight'].shape` [8192, 16384] is implausibly large",
    ),
    "neuron_bomb.cones": (
        safetensors(
            {},
            info(
                {
                    K.replace("down_blocks.0", f"down_blocks.{i}"): {"shape": [4096, 4096], "count": 0}
                    for i in range(3)
                }
                | {V: {"shape": [4096, 4096], "count": 2**24}},
                encoding="rice",
            ),
        ),
        "neurons, implausibly many",
    ),
    "header_size_bomb.cones": (
        struct.pack("<Q", 99 * 2**20) + b"[{},{},{},{}]",
        "it declares a 103,809,024-byte header, more than the 1,048,576 bytes",
    ),
    "deep_nesting.cones": (struct.pack("<Q", 8000) + b"[" * 4000 + b"]" * 4000, "nested too deeply"),
    "nan_constant.cones": (
        safetensors({}, '{"format": "cones", "format_version": NaN}'),
        "non-JSON constant NaN",
    ),
    "newer_version.cones": (one(K, [16, 32], [1], format_version=9), "format_version 9, newer than the 1"),
    "not_safetensors.cones": (b"this is not a concept, just text\n", "declares a"),
    "empty.cones": (b"", "it has 0 bytes, too few for a safetensors header"),
    "truncated.cones": (one(K, [16, 32], [1, 2, 3, 4])[:-6], "damaged"),
    "unsorted.cones": (one(K, [16, 32], [9, 3]), "unsorted or repeated"),
    "out_of_range.cones": (one(K, [16, 32], [1, 512]), "outside [0, 512)"),
    "rice_too_short.cones": (
        safetensors(
            {K: ("U8", [2], bytes([3, 0xFF]))}, info({K: {"shape": [16, 32], "count": 100}}, encoding="rice")
        ),
        "too few to hold the 100 codes",
    ),
    "bad_fingerprint.cones": (
        one(K, [16, 32], [1], base_sha256={"float32": "not-a-digest"}),
        "`base_sha256` must map",
    ),
    "lora_file.cones": (
        safetensors({"lora.up.weight": ("F32", [1], b"\0\0\0\0")}, None),
        "it is a safetensors file but not a .cones file",
    ),
}


def main() -> None:
    expected = {}
    for name, (data, message) in CASES.items():
        assert len(data) < 10_000, name
        with open(os.path.join(HERE, name), "wb") as f:
            f.write(data)
        expected[name] = message
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
