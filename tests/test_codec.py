import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cones.codec import decode_indices, encode_indices, entropy_bound_bits

SD_SHAPES = [(320, 768), (640, 768), (1280, 768), (1280, 1280)]  # SD 1.x attention K/V matrices


def random_set(numel, count, seed):
    return np.sort(np.random.default_rng(seed).choice(numel, count, replace=False)).astype(np.int64)


def assert_valid(idx, numel, count):
    assert idx.dtype == np.int64 and idx.shape == (count,)
    assert count == 0 or (idx[0] >= 0 and idx[-1] < numel)
    assert np.all(np.diff(idx) > 0)


def test_entropy_bound_is_log2_of_the_binomial():
    for numel, count in [(0, 0), (1, 1), (10, 3), (100, 50), (1000, 7), (5000, 4999)]:
        assert entropy_bound_bits(numel, count) == pytest.approx(math.log2(math.comb(numel, count)), abs=1e-6)
    with pytest.raises(ValueError, match="`count` 11"):
        entropy_bound_bits(10, 11)


@pytest.mark.parametrize("shape", SD_SHAPES)
@pytest.mark.parametrize("sparsity", [0.005, 0.01, 0.02, 0.04, 0.08])
def test_size_is_within_1_15_of_the_entropy_bound(shape, sparsity):
    numel = math.prod(shape)
    count = round(sparsity * numel)
    idx = random_set(numel, count, seed=count)
    data = encode_indices(idx, numel)
    assert 8 * len(data) <= 1.15 * entropy_bound_bits(numel, count)
    assert np.array_equal(decode_indices(data, numel, count), idx)


@pytest.mark.parametrize(
    "numel, count",
    [(0, 0), (1, 0), (1, 1), (2, 1), (100, 0), (100, 50), (100, 51), (100, 99), (100, 100), (257, 3)],
)
def test_round_trip_at_the_edges(numel, count):
    idx = random_set(numel, count, seed=numel + count)
    decoded = decode_indices(encode_indices(idx, numel), numel, count)
    assert np.array_equal(decoded, idx)
    assert_valid(decoded, numel, count)


@pytest.mark.parametrize(
    "idx, numel",
    [
        (np.arange(1000, 5000), 1_000_000),  # one contiguous run
        (np.arange(999_000, 1_000_000), 1_000_000),  # a run at the very end
        (np.array([0, 999_999]), 1_000_000),  # the largest possible gap
        (np.concatenate([np.arange(0, 300), np.arange(600_000, 600_050), [999_999]]), 1_000_000),  # clusters
        (np.arange(0, 1_000_000, 7), 1_000_000),  # perfectly regular
        (np.setdiff1d(np.arange(200_000), [5, 77_777]), 200_000),  # dense: all but two
    ],
)
def test_round_trip_on_clustered_sets(idx, numel):
    assert np.array_equal(decode_indices(encode_indices(idx, numel), numel, idx.size), idx)


@settings(max_examples=300, deadline=5000)
@given(numel=st.integers(0, 5000), data=st.data())
def test_round_trip_on_arbitrary_sets(numel, data):
    members = data.draw(st.sets(st.integers(0, max(numel - 1, 0)), max_size=numel)) if numel else set()
    idx = np.array(sorted(members), dtype=np.int64)
    encoded = encode_indices(idx, numel)
    assert np.array_equal(decode_indices(encoded, numel, idx.size), idx)
    # The encoding is canonical: one byte string per set.
    assert encode_indices(idx.astype(np.int32), numel) == encoded


@settings(max_examples=500, deadline=5000)
@given(data=st.data())
def test_damaged_payload_raises_or_decodes_to_a_valid_set(data):
    numel = data.draw(st.integers(1, 3000), label="numel")
    count = data.draw(st.integers(0, numel), label="count")
    payload = bytearray(encode_indices(random_set(numel, count, seed=numel * 7 + count), numel))
    damage = data.draw(
        st.sampled_from(["flip", "truncate", "extend", "random", "wrong_count", "wrong_numel"])
    )
    if damage == "flip":
        for bit in data.draw(st.lists(st.integers(0, 8 * len(payload) - 1), min_size=1, max_size=4)):
            payload[bit // 8] ^= 1 << (bit % 8)
    elif damage == "truncate":
        payload = payload[: data.draw(st.integers(0, len(payload) - 1))]
    elif damage == "extend":
        payload += data.draw(st.binary(min_size=1, max_size=8))
    elif damage == "random":
        payload = bytearray(data.draw(st.binary(max_size=64)))
    elif damage == "wrong_count":
        count = data.draw(st.integers(0, numel).filter(lambda c: c != count))
    else:
        numel = data.draw(st.integers(count, 4000).filter(lambda n: n != numel))
    try:
        decoded = decode_indices(bytes(payload), numel, count)
    except ValueError:
        return
    assert_valid(decoded, numel, count)


def test_decode_rejects_impossible_sizes_before_allocating():
    with pytest.raises(ValueError, match="truncated"):
        decode_indices(bytes([20]), 2**40, 2**38)
    with pytest.raises(ValueError, match="`numel`"):
        decode_indices(bytes([0]), 2**41, 0)
    with pytest.raises(ValueError, match="`count`"):
        decode_indices(bytes([0]), 10, 11)
    with pytest.raises(ValueError, match="empty"):
        decode_indices(b"", 10, 0)


def test_encode_rejects_bad_indices():
    with pytest.raises(ValueError, match="sorted and unique"):
        encode_indices(np.array([3, 1]), 10)
    with pytest.raises(ValueError, match="sorted and unique"):
        encode_indices(np.array([1, 1]), 10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        encode_indices(np.array([1, 10]), 10)
    with pytest.raises(ValueError, match="1-D integer"):
        encode_indices(np.array([1.0]), 10)


def test_two_million_indices_round_trip():
    # SD-sized: 2 M neurons of 25 M weights. How long it takes is measured in benchmarks/bench_storage.py.
    numel, count = 25_000_000, 2_000_000
    idx = random_set(numel, count, seed=0)
    assert np.array_equal(decode_indices(encode_indices(idx, numel), numel, count), idx)
