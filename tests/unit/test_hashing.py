import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.model.hashing import HASH_CONSTANTS, MAX_HASHES, MERSENNE_61, hash_ids, hash_many, hash_reference

IDS = [1, 2, 42, 943, 1682, 10**9 + 7, 1_790_000_000_000_000_000, 2**63 - 1, MERSENNE_61, MERSENNE_61 + 5]


def test_matches_formula_by_hand():
    # ((x * a + b) mod p) mod (V - 1) + 1, written out for one id
    a, b = HASH_CONSTANTS[0]
    assert hash_reference(42, 0, 1000) == ((42 * a + b) % (2**61 - 1)) % 999 + 1
    got = hash_ids(np.array(IDS, dtype=np.int64), num_hashes=2, vocab_size=1000)
    want = [[hash_reference(x, j, 1000) for j in range(2)] for x in IDS]
    assert got.tolist() == want


def test_matches_reference_on_random_64bit_ids():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 2**63 - 1, size=2000, dtype=np.int64)
    got = hash_ids(ids, num_hashes=4, vocab_size=65_536)
    for x, row in zip(ids.tolist(), got.tolist(), strict=True):
        assert row == [hash_reference(x, j, 65_536) for j in range(4)]


def test_hash_many_is_each_column_hashed_alone_across_passes():
    # several tables, hash counts and shapes in one call, more ids than one pass takes, padding ids
    rng = np.random.default_rng(1)
    columns = [
        (rng.integers(0, 2**63 - 1, size=(3, 2500), dtype=np.int64), 2, 131_072),
        (np.zeros((0, 4), dtype=np.int64), 3, 100),
        (np.array([0, 7, 0, MERSENNE_61], dtype=np.int64), MAX_HASHES, 2),
        (rng.integers(0, 50, size=(40, 16), dtype=np.int64), 1, 509),
    ]
    columns[0][0][1, 7] = 0
    columns.append((np.array([2**64 - 1, 2**53 + 1, 3], dtype=np.uint64), 2, 1000))  # beside int64 columns
    got = hash_many(columns)
    for (ids, num_hashes, vocab), rows in zip(columns, got, strict=True):
        assert rows.shape == (*ids.shape, num_hashes) and rows.dtype == np.int64
        assert np.array_equal(rows, hash_ids(ids, num_hashes, vocab))
        flat_ids, flat_rows = ids.reshape(-1), rows.reshape(-1, num_hashes)
        for i in range(0, flat_ids.size, 97):  # a sample against the definition
            assert flat_rows[i].tolist() == [
                hash_reference(int(flat_ids[i]), j, vocab) for j in range(num_hashes)
            ]
    assert got[0][1, 7].tolist() == [0, 0] and got[2][0].tolist() == [0] * MAX_HASHES


def test_zero_is_padding_and_range():
    got = hash_ids(np.array([[0, 5], [7, 0]]), num_hashes=2, vocab_size=10)
    assert got.shape == (2, 2, 2)
    assert got[0, 0].tolist() == [0, 0] and got[1, 1].tolist() == [0, 0]
    assert ((got[0, 1] >= 1) & (got[0, 1] < 10)).all()


def test_hashes_of_one_id_differ():
    got = hash_ids(np.arange(1, 1001), num_hashes=2, vocab_size=1 << 20)
    assert (got[:, 0] != got[:, 1]).mean() > 0.99


def test_negative_ids_rejected():
    with pytest.raises(ValueError, match=">= 0"):
        hash_ids(np.array([3, -1]), 2, 100)


def test_same_values_in_a_fresh_process():
    code = (
        "import numpy as np; from shared.model.hashing import hash_ids; "
        f"print(hash_ids(np.array({IDS}, dtype=np.int64), 2, 65536).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123"}, cwd=Path(__file__).parents[2])  # fmt: skip
    assert out.stdout.strip() == str(hash_ids(np.array(IDS, dtype=np.int64), 2, 65536).tolist())
