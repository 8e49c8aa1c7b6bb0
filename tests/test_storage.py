import errno
import json
import math
import os
import struct
import time

import numpy as np
import pytest
import safetensors.numpy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import cones
from cones import files
from cones.codec import encode_indices
from cones.errors import OutputError
from cones.neurons import ConceptNeurons
from cones.storage import (
    ConceptFileError,
    concept_from_bytes,
    concept_to_bytes,
    load_concept_file,
    save_concept,
)

SHAPES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (16, 32),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight": (16, 32),
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight": (32, 32),
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight": (32, 32),
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": (16, 32),
}
NAMES = list(SHAPES)


def make_concept(seed=0):
    """Sparse, dense (complement-coded) and empty parameters, with a token and search settings."""
    g = torch.Generator().manual_seed(seed)
    densities = [0.05, 0.02, 0.7, 0.0, 0.1]
    mask = {name: torch.rand(SHAPES[name], generator=g) < d for name, d in zip(NAMES, densities, strict=True)}
    return ConceptNeurons.from_mask(
        mask, token="sks", class_word="dog", metadata={"search": {"tau": 0.1, "steps": 3}, "note": "ünïcode"}
    )


GOOD = {enc: concept_to_bytes(make_concept(), encoding=enc) for enc in ("rice", "int32")}


def split(data):
    """(header dict, tensor bytes) of a safetensors file."""
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def join(header, body):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def with_info(data, edit):
    """The file with its cones JSON object edited by `edit(info)`."""
    header, body = split(data)
    info = json.loads(header["__metadata__"]["cones"])
    edit(info)
    header["__metadata__"]["cones"] = json.dumps(info)
    return join(header, body)


def with_tensors(data, tensors):
    """The file with the same cones JSON but other tensors."""
    header, _ = split(data)
    return safetensors.numpy.save(tensors, metadata=header["__metadata__"])


# -- round trip and contents ------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["rice", "int32"])
def test_round_trip(tmp_path, encoding):
    concept = make_concept()
    path = tmp_path / "dog.cones"
    save_concept(concept, path, encoding=encoding)
    loaded = load_concept_file(path)
    assert loaded == concept
    assert ConceptNeurons.load(path) == concept
    assert loaded.counts() == concept.counts()
    assert loaded.shapes == SHAPES and list(loaded.shapes) == NAMES


def test_header_lists_all_parameters_and_tensors_are_keyed_by_name(tmp_path):
    concept = make_concept()
    save_concept(concept, tmp_path / "a.cones")
    concept.save(tmp_path / "b.cones", encoding="int32")
    with safe_open(tmp_path / "a.cones", framework="numpy") as f:
        info = json.loads(f.metadata()["cones"])
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == np.uint8 for k in keys)
    assert info["format"] == "cones" and info["format_version"] == 1
    assert info["library_version"] == cones.__version__
    assert (info["encoding"], info["token"], info["class_word"]) == ("rice", "sks", "dog")
    assert list(info["parameters"]) == NAMES
    assert {n: tuple(p["shape"]) for n, p in info["parameters"].items()} == SHAPES
    assert {n: p["count"] for n, p in info["parameters"].items()} == concept.counts()
    assert info["metadata"]["search"] == {"tau": 0.1, "steps": 3}
    assert keys == {n for n, c in concept.counts().items() if c}  # no tensor for empty parameters
    # The int32 form is the paper's: the plain sorted flat indices.
    with safe_open(tmp_path / "b.cones", framework="numpy") as f:
        for name in f.keys():
            assert np.array_equal(f.get_tensor(name), concept.indices[name].numpy().astype(np.int32))
    assert os.path.getsize(tmp_path / "a.cones") < os.path.getsize(tmp_path / "b.cones")


def test_empty_concept_round_trips(tmp_path):
    concept = ConceptNeurons({}, SHAPES)
    save_concept(concept, tmp_path / "empty.cones")
    assert load_concept_file(tmp_path / "empty.cones") == concept


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="`encoding` 'zip'"):
        save_concept(make_concept(), tmp_path / "x.cones", encoding="zip")
    concept = make_concept()
    concept.metadata["bad"] = object()
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_concept(concept, tmp_path / "x.cones")
    assert os.listdir(tmp_path) == []


# -- safe writing -----------------------------------------------------------------------------------


def test_never_overwrites_without_overwrite(tmp_path):
    path = tmp_path / "dog.cones"
    save_concept(make_concept(0), path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_concept(make_concept(1), path)
    assert path.read_bytes() == before
    save_concept(make_concept(1), path, overwrite=True)
    assert load_concept_file(path) == make_concept(1)
    assert os.listdir(tmp_path) == ["dog.cones"]


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "dog.cones"
    save_concept(make_concept(0), path)
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OutputError, match=r"^no space left on device while writing .*dog\.cones; free some"):
        save_concept(make_concept(1), path, overwrite=True)
    with pytest.raises(OSError, match=r"^no space left on device while writing .*new\.cones;"):
        save_concept(make_concept(1), tmp_path / "new.cones")
    assert os.listdir(tmp_path) == ["dog.cones"]  # no temporary file, no new file
    assert path.read_bytes() == before


# -- validation -------------------------------------------------------------------------------------


def test_newer_format_version_says_to_upgrade(tmp_path):
    path = tmp_path / "new.cones"
    path.write_bytes(with_info(GOOD["rice"], lambda i: i.update(format_version=2)))
    with pytest.raises(ConceptFileError, match=r"format_version 2.*upgrade cones") as e:
        load_concept_file(path)
    assert "new.cones" in str(e.value) and "\n" not in str(e.value)


def set_key(key, value):
    return lambda info: info.update({key: value})


def del_key(key):
    return lambda info: info.pop(key)


def set_param(name, **fields):
    return lambda info: info["parameters"][name].update(fields)


def first_param(f):
    return lambda info: f(info["parameters"][NAMES[0]])


def bad_index_tensors(good_bytes, edit):
    """The int32 file with the indices of the first parameter replaced by `edit(indices)`."""
    concept = make_concept()
    tensors = {n: i.numpy().astype(np.int32) for n, i in concept.indices.items() if i.numel()}
    tensors[NAMES[0]] = edit(tensors[NAMES[0]])
    return with_tensors(good_bytes, tensors)


INFO_EDITS = {
    "wrong format": set_key("format", "lora"),
    "version 0": set_key("format_version", 0),
    "version as string": set_key("format_version", "1"),
    "version as bool": set_key("format_version", True),
    "version as float": set_key("format_version", 1.0),
    "no parameters": del_key("parameters"),
    "no encoding": del_key("encoding"),
    "no token": del_key("token"),
    "no metadata": del_key("metadata"),
    "unknown encoding": set_key("encoding", "gzip"),
    "token not a string": set_key("token", 5),
    "metadata a list": set_key("metadata", [1]),
    "parameters a list": set_key("parameters", []),
    "library version not a string": set_key("library_version", 1),
    "count too big": set_param(NAMES[0], count=10**30),
    "count negative": set_param(NAMES[0], count=-1),
    "count off by one": set_param(NAMES[0], count=make_concept().counts()[NAMES[0]] + 1),
    "count zero with tensor": set_param(NAMES[0], count=0),
    "count of empty made positive": set_param(NAMES[3], count=1),
    "shape changed": set_param(NAMES[0], shape=[16, 31]),
    "shape huge": set_param(NAMES[0], shape=[2**40, 2**40]),
    "dense and huge": set_param(NAMES[0], shape=[2**31 - 1], count=2**31 - 2),
    "shape negative": set_param(NAMES[0], shape=[-16, -32]),
    "shape not a list": set_param(NAMES[0], shape="16x32"),
    "shape with floats": set_param(NAMES[0], shape=[16.0, 32]),
    "too many shapes": lambda info: info["parameters"].update(
        {f"p{i}": {"shape": [2**31 - 1], "count": 0} for i in range(9)}
    ),
    "parameter entry extra key": first_param(lambda p: p.update(dtype="f32")),
    "parameter entry missing count": first_param(lambda p: p.pop("count")),
    "parameter dropped": lambda info: info["parameters"].pop(NAMES[0]),
    "not an object": lambda info: info.clear(),
}


@pytest.mark.parametrize("encoding", ["rice", "int32"])
@pytest.mark.parametrize("edit", list(INFO_EDITS))
def test_edited_header_is_rejected(encoding, edit):
    data = with_info(GOOD[encoding], INFO_EDITS[edit])
    with pytest.raises(ConceptFileError):
        concept_from_bytes(data)


def structural_damage():
    data = GOOD["rice"]
    header, body = split(data)
    entry = header[NAMES[0]]
    with_meta = lambda meta: join({**header, "__metadata__": meta}, body)  # noqa: E731
    with_entry = lambda **kw: join({**header, NAMES[0]: {**entry, **kw}}, body)  # noqa: E731
    return {
        "empty": b"",
        "short": data[:5],
        "huge header size": struct.pack("<Q", 2**63) + data[8:],
        "header size past the end": struct.pack("<Q", len(data)) + data[8:],
        "header not utf-8": struct.pack("<Q", 10) + b"\xff" * 10,
        "header not json": struct.pack("<Q", 4) + b"{{{{",
        "header a list": join([], b""),
        "deep nesting": struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000,
        "no metadata": join({k: v for k, v in header.items() if k != "__metadata__"}, body),
        "other metadata key": with_meta({"lora": "{}"}),
        "cones metadata not json": with_meta({"cones": "{"}),
        "cones metadata NaN": with_meta({"cones": '{"format": NaN}'}),
        "cones metadata a list": with_meta({"cones": "[]"}),
        "cones metadata deep": with_meta({"cones": "[" * 100_000 + "]" * 100_000}),
        "truncated body": data[:-3],
        "extra body": data + b"\0" * 16,
        "offsets past the end": with_entry(data_offsets=[0, 2**62]),
        "offsets huge": with_entry(data_offsets=[2**70, 2**71]),
        "tensor shape huge": with_entry(shape=[10**12]),
        "tensor not 1-D": with_entry(shape=[1, entry["shape"][0]]),
        "wrong dtype": with_entry(dtype="I8"),
        "unknown tensor": with_tensors(data, {"foo.weight": np.zeros(3, np.uint8)}),
    }


STRUCTURAL = structural_damage()


@pytest.mark.parametrize("case", list(STRUCTURAL))
def test_structural_damage_is_rejected(case):
    with pytest.raises(ConceptFileError):
        concept_from_bytes(STRUCTURAL[case])


@pytest.mark.parametrize(
    "edit",
    [
        lambda idx: idx[::-1].copy(),  # unsorted
        lambda idx: np.concatenate([idx[:1], idx[:-1]]),  # duplicate, count unchanged
        lambda idx: np.concatenate([idx[:-1], np.array([512], np.int32)]),  # out of range (16 x 32 = 512)
        lambda idx: np.concatenate([np.array([-1], np.int32), idx[1:]]),  # negative
        lambda idx: idx[:-1],  # count mismatch
        lambda idx: idx.astype(np.int64),  # wrong dtype
        lambda idx: idx.astype(np.float32),  # wrong dtype
    ],
    ids=["unsorted", "duplicate", "out_of_range", "negative", "short", "int64", "float32"],
)
def test_bad_int32_indices_are_rejected(edit):
    with pytest.raises(ConceptFileError):
        concept_from_bytes(bad_index_tensors(GOOD["int32"], edit))


def test_rice_tensors_with_wrong_payloads_are_rejected():
    concept = make_concept()
    tensors = {
        n: np.frombuffer(encode_indices(i.numpy(), math.prod(SHAPES[n])), np.uint8)
        for n, i in concept.indices.items()
        if i.numel()
    }
    swapped = dict(tensors)
    # Right bytes, wrong parameter.
    swapped[NAMES[0]], swapped[NAMES[1]] = tensors[NAMES[1]], tensors[NAMES[0]]
    missing = {n: t for n, t in tensors.items() if n != NAMES[1]}
    as_int32 = {n: t.astype(np.int32) for n, t in tensors.items()}
    for case in (swapped, missing, as_int32):
        with pytest.raises(ConceptFileError):
            concept_from_bytes(with_tensors(GOOD["rice"], case))


def test_errors_are_one_line_and_name_the_file(tmp_path):
    path = tmp_path / "broken.cones"
    path.write_bytes(GOOD["rice"][:100])
    with pytest.raises(ConceptFileError) as e:
        load_concept_file(path)
    message = str(e.value)
    assert "broken.cones" in message and "\n" not in message and len(message) < 400
    assert isinstance(e.value, ValueError)


# -- fuzzing ----------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def damaged_files(draw):
    """A valid file damaged in one of many ways; some damage (a flipped bit in the token) leaves it valid."""
    data = bytearray(GOOD[draw(st.sampled_from(sorted(GOOD)))])
    kind = draw(
        st.sampled_from(["flip", "truncate", "random", "splice", "info_value", "info_delete", "tensor"])
    )
    if kind == "flip":
        for bit in draw(st.lists(st.integers(0, 8 * len(data) - 1), min_size=1, max_size=8)):
            data[bit // 8] ^= 1 << (bit % 8)
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "random":
        data = bytearray(draw(st.binary(max_size=512)))
    elif kind == "splice":
        at = draw(st.integers(0, len(data)))
        data[at : at + draw(st.integers(0, 16))] = draw(st.binary(max_size=16))
    elif kind in ("info_value", "info_delete"):
        path = draw(st.sampled_from(INFO_PATHS))
        value = draw(JSON_VALUES)

        def edit(info):
            *parents, last = path
            node = info
            for key in parents:
                node = node[key]
            if kind == "info_delete":
                node.pop(last)
            else:
                node[last] = value

        data = bytearray(with_info(bytes(data), edit))
    else:
        name = draw(st.sampled_from(NAMES))
        dtype = draw(st.sampled_from([np.uint8, np.int8, np.int32, np.int64, np.float16]))
        values = draw(st.lists(st.integers(-3, 2000), max_size=40))
        tensors = dict(safetensors.numpy.load(bytes(data)))
        tensors[name] = np.array(values, dtype=np.int64).astype(dtype)
        data = bytearray(with_tensors(bytes(data), tensors))
    return bytes(data)


INFO_PATHS = [
    ("format",),
    ("format_version",),
    ("library_version",),
    ("encoding",),
    ("token",),
    ("class_word",),
    ("metadata",),
    ("parameters",),
    *[("parameters", n) for n in NAMES],
    *[("parameters", n, k) for n in NAMES for k in ("shape", "count")],
    ("parameters", NAMES[0], "shape", 0),
]


def check_damaged(data):
    # The time limit only catches a hang or a huge allocation (a parse takes milliseconds); it is generous so
    # that a busy machine cannot fail it.
    start = time.perf_counter()
    try:
        concept = concept_from_bytes(data)
    except ConceptFileError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(concept, ConceptNeurons)  # damage that left a valid file, e.g. in the token
    assert time.perf_counter() - start < 5.0


@settings(max_examples=1500, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(damaged_files())
def test_damaged_files_end_in_concept_file_error(data):
    check_damaged(data)


@pytest.mark.slow
@settings(max_examples=20_000, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(damaged_files())
def test_damaged_files_end_in_concept_file_error_long(data):
    check_damaged(data)
