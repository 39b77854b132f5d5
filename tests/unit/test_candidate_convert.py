"""Proto conversion of snapshot chunks and deltas: row-aligned attributes, exact tensors (no grpc)."""

from __future__ import annotations

import numpy as np
import pytest

from candidate_service.convert import delta_to_proto, snapshot_part_to_proto
from candidate_service.store import CorpusStore, Delta
from candidate_service.watch import SnapshotPart
from shared import codec


@pytest.mark.parametrize(
    "attributes", [[None] * 6, [None, {"t": "a"}, None, {"t": "b", "u": "c"}, None, None]]
)
def test_snapshot_chunk_round_trip(attributes):
    ids = np.arange(10, 16, dtype=np.int64)
    emb = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    snap = CorpusStore.from_rows("fp", 7, ids, ids * 2, emb, attributes).snapshot()
    chunk = snapshot_part_to_proto(SnapshotPart(snap, 1, 3, 2, 5)).snapshot_chunk
    assert (chunk.version, chunk.fingerprint, chunk.chunk_index, chunk.num_chunks, chunk.total_items) == (
        7, "fp", 1, 3, 6,
    )  # fmt: skip
    assert codec.decode_numpy(chunk.post_ids).tolist() == [12, 13, 14]
    assert codec.decode_numpy(chunk.author_ids).tolist() == [24, 26, 28]
    assert np.array_equal(codec.decode_numpy(chunk.embeddings), emb[2:5])
    assert [dict(a.attributes) for a in chunk.attributes] == [a or {} for a in attributes[2:5]]


def test_delta_round_trip():
    delta = Delta(
        9, "fp", np.asarray([5, 6]), np.asarray([0, 1]), np.ones((2, 3), np.float32), [None, {"k": "v"}],
        np.asarray([1]),
    )  # fmt: skip
    msg = delta_to_proto(delta).delta
    assert msg.version == 9 and codec.decode_numpy(msg.upsert_post_ids).tolist() == [5, 6]
    assert codec.decode_numpy(msg.upsert_embeddings).shape == (2, 3)
    assert [dict(a.attributes) for a in msg.upsert_attributes] == [{}, {"k": "v"}]
    assert codec.decode_numpy(msg.deleted_post_ids).tolist() == [1]
    none = np.zeros(0, np.int64)
    empty = delta_to_proto(
        Delta(2, "fp", none, none, np.zeros((0, 3), np.float32), [], np.asarray([3]))
    ).delta
    assert len(empty.upsert_attributes) == 0 and codec.decode_numpy(empty.upsert_embeddings).shape == (0, 3)
