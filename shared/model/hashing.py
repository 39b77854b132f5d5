"""Deterministic multi-hash ids: the same id gives the same rows in every process and machine.

Hash j of an id x into a table of V rows is the universal hash

    h_j(x) = ((x * a_j + b_j) mod p) mod (V - 1) + 1,   p = 2**61 - 1 (a Mersenne prime)

and id 0 maps to row 0, the padding row. Python's ``hash()`` is never used (it is salted per process).
The product x * a_j needs 122 bits, so the vectorised version multiplies modulo p in 31-bit limbs
with uint64 arithmetic, exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MERSENNE_61 = (1 << 61) - 1

# Fixed per-hash constants (a_j in [1, p), b_j in [0, p)), drawn once at random and frozen: changing
# them changes every embedding row and so invalidates every checkpoint.
HASH_CONSTANTS: tuple[tuple[int, int], ...] = (
    (0x1F3A9C5D2B7E4681, 0x0A5C3E71F9D2B468),
    (0x0B6D2E8F41A9C375, 0x13E7A2D94C6B5F08),
    (0x17C4A8E2D05B9F63, 0x06F1B3D8A2C9E547),
    (0x0E9A5D3C71B2F846, 0x1B48E6A0D3F7C259),
    (0x1A2F7C9E3D5B8064, 0x09D3C5E7A1B4F628),
    (0x05B8E3A6C9D1F274, 0x1C6A9F2E5B3D7480),
    (0x12D6F9B3E8A5C041, 0x0F2B7D4A9C6E1358),
    (0x08E4C7A1F3D6B952, 0x15A9D2F6B8C3E074),
)
MAX_HASHES = len(HASH_CONSTANTS)

_MASK31 = np.uint64((1 << 31) - 1)
_MASK30 = np.uint64((1 << 30) - 1)
_P = np.uint64(MERSENNE_61)


def hash_reference(x: int, j: int, vocab_size: int) -> int:
    """The hash with Python's unbounded ints: the definition the vectorised version must equal."""
    if x == 0:
        return 0
    a, b = HASH_CONSTANTS[j]
    return ((x * a + b) % MERSENNE_61) % (vocab_size - 1) + 1


def _reduce(s: np.ndarray) -> np.ndarray:
    """s mod p for s < 2**64, using 2**61 = 1 (mod p)."""
    s = (s & _P) + (s >> np.uint64(61))
    return np.where(s >= _P, s - _P, s)


# The constants as columns, so that every hash of every id is one vectorised pass.
_A_HI = np.array([a >> 31 for a, _ in HASH_CONSTANTS], dtype=np.uint64)
_A_LO = np.array([a & ((1 << 31) - 1) for a, _ in HASH_CONSTANTS], dtype=np.uint64)
_B = np.array([b for _, b in HASH_CONSTANTS], dtype=np.uint64)
_CHUNK = 4096  # ids per pass: [H, 4096] uint64 temporaries stay in the allocator's reused memory


def _mulmod(x: np.ndarray, a_hi: np.ndarray, a_lo: np.ndarray) -> np.ndarray:
    """(x * a) mod p for uint64 x < p and a = a_hi * 2**31 + a_lo < p, without overflow; x [1, N]
    against a [H, 1] broadcasts to [H, N] (ids along the inner loops: numpy is slow over short ones)."""
    x_hi, x_lo = x >> np.uint64(31), x & _MASK31  # x_hi < 2**30, x_lo < 2**31
    # x*a = x_hi*a_hi*2**62 + (x_hi*a_lo + x_lo*a_hi)*2**31 + x_lo*a_lo, and 2**62 = 2 (mod p).
    high = (x_hi * a_hi) << np.uint64(1)  # < 2**61
    mid = x_hi * a_lo + x_lo * a_hi  # < 2**62
    # mid*2**31 = (mid >> 30)*2**61 + (mid & (2**30-1))*2**31 = (mid >> 30) + (mid & ...)*2**31 (mod p)
    mid = (mid >> np.uint64(30)) + ((mid & _MASK30) << np.uint64(31))  # < 2**61 + 2**32
    low = x_lo * a_lo  # < 2**62
    return _reduce(high + mid + low)  # sum < 2**64


def hash_ids(ids: np.ndarray, num_hashes: int, vocab_size: int) -> np.ndarray:
    """Hash an int64 array of ids (each >= 0) to rows: shape [..., num_hashes], int64 in [0, vocab_size)."""
    return hash_many([(ids, num_hashes, vocab_size)])[0]


def hash_many(columns: Sequence[tuple[np.ndarray, int, int]]) -> list[np.ndarray]:
    """`hash_ids` of several (ids, num_hashes, vocab_size) at once: the mod-p part, which does not
    depend on the table, runs once over all the ids (a user's ids, features, posts and authors are
    one pass of ~20 array ops, not one per table and hash)."""
    arrays = []
    for ids, num_hashes, _ in columns:
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got {ids.dtype}")
        if num_hashes > MAX_HASHES:
            raise ValueError(f"at most {MAX_HASHES} hashes per id, got {num_hashes}")
        if ids.size and ids.min() < 0:
            raise ValueError("ids must be >= 0")
        arrays.append(ids)
    h = max((n for _, n, _ in columns), default=0)
    # uint64 before joining: numpy joins int64 with uint64 as float64, which rounds ids above 2**53
    flat = np.concatenate([ids.reshape(-1).astype(np.uint64) for ids in arrays] or [np.zeros(0, np.uint64)])
    mod_p = np.empty((h, flat.size), dtype=np.uint64)  # [h, N], each < p
    a_hi, a_lo, b = _A_HI[:h, None], _A_LO[:h, None], _B[:h, None]
    with np.errstate(over="ignore"):  # all products are bounded above; numpy cannot prove it
        for lo in range(0, flat.size, _CHUNK):  # small temporaries: large ones are fresh pages each time
            x = (flat[lo : lo + _CHUNK] % _P)[None, :]  # [1, n]
            mod_p[:, lo : lo + _CHUNK] = _reduce(_mulmod(x, a_hi, a_lo) + b)
    out, start = [], 0
    for ids, (_, num_hashes, vocab_size) in zip(arrays, columns, strict=True):
        part = mod_p[:num_hashes, start : start + ids.size]
        start += ids.size
        rows = part % np.uint64(vocab_size - 1) + np.uint64(1)
        rows[:, ids.reshape(-1) == 0] = 0
        out.append(rows.T.astype(np.int64).reshape(*ids.shape, num_hashes))  # [..., num_hashes]
    return out
