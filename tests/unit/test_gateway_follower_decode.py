"""The follower's decoding of the WatchCorpus stream: deltas become the shared Delta type, snapshots
are staged in the index's dtype with encoded attributes and handed to the index without a copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval_gateway.follower import SnapshotAssembler, _delta_rows
from retrieval_gateway.index import CorpusGap, CorpusIndex, Query
from shared import codec
from shared.corpus_rows import Delta
from twotower.v1 import candidate_tower_pb2 as pb

FP = "f" * 16
D = 4


def chunk(index, num_chunks, posts, emb, attrs, total):
    msg = pb.SnapshotChunk(
        version=3, fingerprint=FP, chunk_index=index, num_chunks=num_chunks, total_items=total
    )
    msg.post_ids.CopyFrom(codec.encode(np.asarray(posts, np.int64)))
    msg.author_ids.CopyFrom(codec.encode(np.asarray(posts, np.int64) % 7))
    msg.embeddings.CopyFrom(codec.encode(emb))
    for a in attrs:
        msg.attributes.add().attributes.update(a)
    return msg


def test_delta_decodes_into_the_shared_delta_type():
    msg = pb.CorpusDelta(version=9, fingerprint=FP)
    msg.upsert_post_ids.CopyFrom(codec.encode(np.array([5, 6], np.int64)))
    msg.upsert_author_ids.CopyFrom(codec.encode(np.array([1, 2], np.int64)))
    msg.upsert_embeddings.CopyFrom(codec.encode(torch.ones(2, D, dtype=torch.bfloat16)))
    msg.upsert_attributes.add().attributes.update({"title": "x"})
    msg.upsert_attributes.add()
    msg.deleted_post_ids.CopyFrom(codec.encode(np.array([7], np.int64)))
    d = _delta_rows(msg, D)
    assert isinstance(d, Delta) and (d.version, d.fingerprint) == (9, FP)
    assert d.upsert_post_ids.tolist() == [5, 6] and d.upsert_author_ids.tolist() == [1, 2]
    assert d.upsert_embeddings.dtype == np.float32 and d.upsert_embeddings.shape == (2, D)
    assert d.upsert_attributes == [{"title": "x"}, {}] and d.deleted_post_ids.tolist() == [7]
    only_deletes = _delta_rows(pb.CorpusDelta(version=10, fingerprint=FP), D)
    assert only_deletes.upsert_embeddings.shape == (0, D) and only_deletes.deleted_post_ids.size == 0


def test_snapshot_is_staged_in_the_index_dtype_and_handed_over_without_a_copy():
    rng = np.random.default_rng(0)
    emb = torch.from_numpy(rng.standard_normal((5, D)).astype(np.float32))
    attrs = [{"title": f"t{i}"} if i % 2 else {} for i in range(5)]
    index = CorpusIndex("cpu", "bf16")
    a = SnapshotAssembler(chunk(0, 2, [1, 2, 3], emb[:3], attrs[:3], 5), 100, index.dtype)
    assert not a.add(chunk(0, 2, [1, 2, 3], emb[:3], attrs[:3], 5))
    assert a.add(chunk(1, 2, [4, 5], emb[3:], attrs[3:], 5))
    assert a.embeddings.dtype == torch.bfloat16 and torch.equal(a.embeddings, emb.bfloat16())
    staged = a.embeddings
    index.load_snapshot(3, FP, a.post_ids, a.author_ids, staged, a.attributes(), copy=False)
    assert index._corpus.matrix.data_ptr() == staged.data_ptr()  # adopted, not copied
    hits = index.search([Query(emb[3], FP, 5)])[0].hits
    assert {h.post_id: h.attributes for h in hits} == {i + 1: attrs[i] for i in range(5)}
    assert {h.post_id: h.author_id for h in hits} == {p: p % 7 for p in range(1, 6)}


def test_snapshot_chunks_out_of_sequence_are_a_gap():
    emb = torch.zeros(1, D)
    a = SnapshotAssembler(chunk(0, 2, [1], emb, [{}], 2), 100)
    a.add(chunk(0, 2, [1], emb, [{}], 2))
    with pytest.raises(CorpusGap, match="out of sequence"):
        a.add(chunk(0, 2, [2], emb, [{}], 2))
