"""Compact, exact encoding of a sorted index set, within a few percent of the entropy bound.

Choosing k positions out of N costs at least log2(C(N, k)) bits (`entropy_bound_bits`). Concept neurons
look like a random sparse subset, so the gaps between sorted indices are close to geometric, and a
Golomb-Rice code of the gaps is near optimal. The encoder tries a few Rice parameters `b` around the one
the density suggests and keeps the shortest; above 50% density it encodes the complement instead.

Layout of an encoded set (all bit fields MSB first, sections padded with zero bits to a byte):

    byte 0          bits 0-5: Rice parameter b (0..62); bit 6: complement flag; bit 7: zero
    remainders      k' fields of b bits: gap & (2**b - 1), for each of the k' encoded indices
    quotients       k' unary codes: (gap >> b) zero bits, then a one bit

where k' = count (or numel - count for the complement) and gap_i = idx_i - idx_{i-1} - 1 (idx_{-1} = -1).
Keeping quotients and remainders apart makes decoding a handful of vectorised numpy calls (the i-th one
bit of the quotient section ends the i-th code), with no per-index Python loop. The encoding is canonical
(one byte string per set), and `decode_indices` validates everything, so a damaged payload raises
ValueError and never yields out-of-range, unsorted or repeated indices.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

MAX_NUMEL = 2**40  # bounds every intermediate value well inside int64
_MAX_RICE = 62


def entropy_bound_bits(numel: int, count: int) -> float:
    """log2(C(numel, count)): the fewest bits that can name `count` positions out of `numel`."""
    if not 0 <= count <= numel:
        raise ValueError(f"`count` {count} must be in [0, `numel` {numel}]")
    return (math.lgamma(numel + 1) - math.lgamma(count + 1) - math.lgamma(numel - count + 1)) / math.log(2)


def _check_sizes(numel: int, count: int) -> tuple[int, int]:
    if not (isinstance(numel, numbers.Integral) and 0 <= numel <= MAX_NUMEL):
        raise ValueError(f"`numel` {numel!r} must be an int in [0, {MAX_NUMEL}]")
    if not (isinstance(count, numbers.Integral) and 0 <= count <= numel):
        raise ValueError(f"`count` {count!r} must be an int in [0, `numel` {numel}]")
    return int(numel), int(count)


def _uses_complement(numel: int, count: int) -> bool:
    return 2 * count > numel


def _rice_bits(gaps: np.ndarray, b: int) -> int:
    """Exact size in bits of the remainder and quotient sections for parameter `b`."""
    return int(gaps.size * (b + 1) + int((gaps >> b).sum()))


def _best_rice_parameter(gaps: np.ndarray, numel: int) -> int:
    """The shortest Rice parameter among a few around log2 of the mean gap."""
    if gaps.size == 0:
        return 0
    mean_gap = max(float(gaps.mean()), 1.0)
    guess = int(math.floor(math.log2(mean_gap)))
    top = min(_MAX_RICE, max(numel.bit_length(), 1))
    candidates = range(max(0, guess - 3), min(top, guess + 2) + 1)
    return min(candidates, key=lambda b: _rice_bits(gaps, b))


def encode_indices(indices: np.ndarray, numel: int) -> bytes:
    """Encode sorted unique indices in `[0, numel)` as bytes; `decode_indices` inverts it exactly."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
        raise ValueError(
            f"`indices` must be a 1-D integer array, got shape {idx.shape} and dtype {idx.dtype}"
        )
    idx = idx.astype(np.int64, copy=False)
    numel, _ = _check_sizes(numel, int(idx.size))
    if idx.size and (idx[0] < 0 or idx[-1] >= numel):
        raise ValueError(f"`indices` must lie in [0, {numel}), got range [{idx[0]}, {idx[-1]}]")
    if idx.size > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError("`indices` must be sorted and unique; pass `np.unique(indices)`")

    # 1. Encode the complement of a dense set.
    complement = _uses_complement(numel, idx.size)
    if complement:
        keep = np.ones(numel, dtype=bool)
        keep[idx] = False
        idx = np.flatnonzero(keep)

    # 2. Gaps and the Rice parameter.
    gaps = np.diff(idx, prepend=-1) - 1  # (k',) >= 0
    b = _best_rice_parameter(gaps, numel)
    quotients, remainders = gaps >> b, gaps & ((1 << b) - 1)

    # 3. Remainders: k' fixed fields of b bits, MSB first.
    remainder_bits = np.empty((gaps.size, b), dtype=np.uint8)  # (k', b)
    for j in range(b):
        remainder_bits[:, j] = (remainders >> (b - 1 - j)) & 1

    # 4. Quotients in unary: the i-th code ends with a one bit at position cumsum(q + 1) - 1.
    ends = np.cumsum(quotients + 1) - 1
    quotient_bits = np.zeros(int(ends[-1]) + 1 if ends.size else 0, dtype=np.uint8)
    quotient_bits[ends] = 1

    header = bytes([b | (complement << 6)])
    return header + np.packbits(remainder_bits.reshape(-1)).tobytes() + np.packbits(quotient_bits).tobytes()


def decode_indices(data: bytes, numel: int, count: int) -> np.ndarray:
    """Decode `count` sorted unique int64 indices in `[0, numel)`; raise ValueError on a damaged payload."""
    numel, count = _check_sizes(numel, count)
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size == 0:
        raise ValueError("encoded indices are empty; expected at least the header byte")

    # 1. Header.
    b, complement, reserved = int(buf[0]) & 63, bool(buf[0] >> 6 & 1), int(buf[0]) >> 7
    if reserved or b > _MAX_RICE:
        raise ValueError(f"encoded indices have a bad header byte {int(buf[0]):#04x}")
    if complement != _uses_complement(numel, count):
        raise ValueError("encoded indices have the wrong complement flag for their count")
    k = numel - count if complement else count

    # 2. Section sizes, checked before anything is allocated.
    remainder_bytes = (k * b + 7) // 8
    quotient_bytes = buf.size - 1 - remainder_bytes
    if quotient_bytes < (k + 7) // 8:
        raise ValueError(f"encoded indices are truncated: {buf.size} bytes cannot hold {k} codes")

    # 3. Remainders.
    remainder_bits = np.unpackbits(buf[1 : 1 + remainder_bytes])
    if remainder_bits[k * b :].any():
        raise ValueError("encoded indices have non-zero padding after the remainders")
    fields = remainder_bits[: k * b].reshape(k, b)  # (k, b)
    remainders = np.zeros(k, dtype=np.int64)
    for j in range(b):
        remainders = (remainders << 1) | fields[:, j]

    # 4. Quotients: exactly k one bits, the last one in the last byte, and no gap beyond numel.
    ends = np.flatnonzero(np.unpackbits(buf[1 + remainder_bytes :]))
    if ends.size != k or (k and ends[-1] // 8 != quotient_bytes - 1) or (not k and quotient_bytes):
        raise ValueError(f"encoded indices hold {ends.size} codes or trailing bytes, expected {k} codes")
    quotients = np.diff(ends, prepend=-1) - 1
    if k and int(quotients.max()) > max(numel - 1, 0) >> b:
        raise ValueError(f"encoded indices hold a gap larger than `numel` {numel}")

    # 5. Indices, validated: strictly increasing and inside [0, numel).
    idx = np.cumsum((quotients << b) + remainders + 1) - 1
    if k and (idx[0] < 0 or idx[-1] >= numel or (k > 1 and not bool((idx[1:] > idx[:-1]).all()))):
        raise ValueError(f"encoded indices fall outside [0, {numel})")
    if complement:
        keep = np.ones(numel, dtype=bool)
        keep[idx] = False
        idx = np.flatnonzero(keep)
    return idx.astype(np.int64, copy=False)
