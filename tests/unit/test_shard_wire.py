"""The shard's answer on the wire (retrieval_gateway/shard_client.py): hits as columns, attributes only
where an item has any; what the router does with a malformed answer (the shard's fault: UNAVAILABLE,
never INVALID_ARGUMENT for the user)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from bench.shard_wire_bench import measure, per_hit_response, results
from retrieval_gateway.index import Query, SearchResult
from retrieval_gateway.shard_client import (
    ShardClient,
    ShardUnavailable,
    hits_from_response,
    score_request,
    score_response,
)
from shared import codec
from shared.corpus_rows import AttributeColumn
from shared.errors import InvalidInput, ModelMismatch

MODEL = "model-a"


def result(post_ids, attributes) -> SearchResult:
    p = np.asarray(post_ids, np.int64)
    scores = np.linspace(1.0, 0.0, len(p), dtype=np.float32)
    return SearchResult(p, p * 7, scores, attributes, version=3, fingerprint=MODEL)


RESULTS = [
    result([5, 9, 2], [{}, {"title": "b", "genre": "x"}, {}]),
    result([], []),  # a query whose exclusions left nothing on this shard
    result([11, 4], [{"title": "d"}, {"title": "e"}]),
    result([8], [{}]),
]


def test_columns_round_trip_every_query_with_its_attributes():
    response = score_response(RESULTS, shard_index=1, version=3, fingerprint=MODEL)
    wire = type(response).FromString(response.SerializeToString())
    assert list(wire.hits.counts) == [3, 0, 2, 1]
    assert list(wire.hits.attributed) == [1, 3, 4]  # hits without attributes send none
    hits = hits_from_response(wire, queries=len(RESULTS))
    assert len(hits) == len(RESULTS)
    for got, want in zip(hits, RESULTS, strict=True):
        assert got.post_ids.tolist() == want.post_ids.tolist()
        assert got.author_ids.tolist() == want.author_ids.tolist()
        assert got.scores.tolist() == want.scores.tolist()
        assert [dict(a) for a in got.attributes] == [dict(a) for a in want.attributes]


def test_attributes_still_encoded_go_out_as_they_were_stored():
    encoded = [
        SearchResult(
            r.post_ids, r.author_ids, r.scores, AttributeColumn.encode(r.attributes), r.version, r.fingerprint
        )
        for r in RESULTS
    ]  # what the index's search with encoded=True gives a shard
    wire = score_response(encoded, shard_index=1, version=3, fingerprint=MODEL)
    decoded = score_response(RESULTS, shard_index=1, version=3, fingerprint=MODEL)
    assert wire == decoded and wire.hits.attributes_json == decoded.hits.attributes_json  # byte for byte
    hits = hits_from_response(type(wire).FromString(wire.SerializeToString()), queries=len(RESULTS))
    assert [[dict(a) for a in h.attributes] for h in hits] == [r.attributes for r in RESULTS]


def test_a_router_reads_the_answer_of_a_shard_of_the_previous_release():
    old = per_hit_response(RESULTS, shard_index=1, version=3, fingerprint=MODEL)  # as such a shard built it
    hits = hits_from_response(old, queries=len(RESULTS))
    for got, want in zip(hits, RESULTS, strict=True):
        assert got.post_ids.tolist() == want.post_ids.tolist()
        assert got.author_ids.tolist() == want.author_ids.tolist()
        assert got.scores.tolist() == want.scores.tolist()
        assert [dict(a) for a in got.attributes] == [dict(a) for a in want.attributes]
    with pytest.raises(InvalidInput, match="4 queries, expected 5"):
        hits_from_response(old, queries=5)
    del old.results[2].scores[1]
    with pytest.raises(InvalidInput, match="different lengths"):
        hits_from_response(old, queries=len(RESULTS))


def test_every_hit_with_attributes_round_trips_too():
    every = [result([3, 1], [{"t": "a"}, {"t": "b", "k": "x"}]), result([7], [{"t": "c"}])]
    response = score_response(every, shard_index=0, version=3, fingerprint=MODEL)
    assert list(response.hits.attributed) == [0, 1, 2]
    hits = hits_from_response(type(response).FromString(response.SerializeToString()), queries=2)
    want = [[{"t": "a"}, {"t": "b", "k": "x"}], [{"t": "c"}]]
    assert [[dict(a) for a in h.attributes] for h in hits] == want


def test_an_empty_batch_answer_is_well_formed():
    response = score_response([], shard_index=0, version=1, fingerprint=MODEL)
    assert hits_from_response(type(response).FromString(response.SerializeToString()), queries=0) == []


def _response():
    return score_response(RESULTS, shard_index=1, version=3, fingerprint=MODEL)


def _truncate_scores(r):
    r.hits.scores.CopyFrom(codec.encode(np.zeros(5, np.float32)))


def _nan_score(r):
    r.hits.scores.CopyFrom(codec.encode(np.array([0, 0, np.nan, 0, 0, 0], np.float32)))


def _float_ids(r):
    r.hits.post_ids.CopyFrom(codec.encode(np.zeros(6, np.float32)))


def _more_counts(r):
    r.hits.counts.append(0)


def _count_too_big(r):
    r.hits.counts[0] = 4


def _unordered_positions(r):
    r.hits.attributed[:] = [3, 1, 4]


def _position_past_the_end(r):
    r.hits.attributed[-1] = 6


def _position_without_map(r):
    r.hits.attributed.append(5)


def _json(text):
    def corrupt(r):
        r.hits.attributes_json = text

    return corrupt


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (_truncate_scores, "scores"),
        (_nan_score, "non-finite"),
        (_float_ids, "post_ids"),
        (_more_counts, "5 queries, expected 4"),
        (_count_too_big, "post_ids"),
        (_unordered_positions, "ascending"),
        (_position_past_the_end, "ascending below 6"),
        (_position_without_map, "4 attributed positions for 3"),
        (_json(b'[{"a": "1"}, {"b": "2"}]'), "3 attributed positions for 2"),
        (_json(b"[{"), "not JSON"),
        (_json(b"\xff"), "not JSON"),
        (_json(b'{"a": "1"}'), "not a JSON array"),
        (_json(b'[{"a": "1"}, {"b": 2}, {}]'), "objects of strings"),
        (_json(b'[{"a": "1"}, ["b"], {}]'), "objects of strings"),
    ],
)
def test_a_malformed_answer_is_refused_naming_what_is_wrong(corrupt, problem):
    response = _response()
    corrupt(response)
    with pytest.raises(InvalidInput, match=problem):
        hits_from_response(response, queries=len(RESULTS))


class _Scorer:
    def __init__(self, response) -> None:
        self.response = response

    async def ScoreShard(self, request, timeout):
        return self.response


def _score_with(response):
    queries = [Query(torch.ones(4), MODEL, 3) for _ in RESULTS]

    async def main():
        client = ShardClient(1, 2, "127.0.0.1:1", [])
        client._scorer = _Scorer(response)
        try:
            return await client.score(queries, MODEL, timeout=1.0)
        finally:
            await client.close()

    return asyncio.run(asyncio.wait_for(main(), 10))


def test_the_client_reads_a_good_answer():
    answer = _score_with(_response())
    assert answer.index == 1 and answer.version == 3 and answer.fingerprint == MODEL
    assert [h.post_ids.tolist() for h in answer.hits] == [r.post_ids.tolist() for r in RESULTS]


@pytest.mark.parametrize("corrupt", [_count_too_big, _more_counts, lambda r: setattr(r, "shard_index", 0)])
def test_the_client_makes_a_malformed_answer_the_shards_fault(corrupt):
    response = _response()
    corrupt(response)
    with pytest.raises(ShardUnavailable, match=r"shard 1 at 127\.0\.0\.1:1 sent a malformed answer"):
        _score_with(response)


def test_another_model_is_a_mismatch_not_a_malformed_answer():
    response = _response()
    response.model_fingerprint = "model-b"
    with pytest.raises(ModelMismatch, match="model-b"):
        _score_with(response)


def test_the_request_carries_every_query():
    queries = [Query(torch.full((4,), float(i)), MODEL, i + 1, np.array([i], np.int64)) for i in range(3)]
    request = score_request(queries, MODEL, shard_index=2, num_shards=4)
    assert [q.k for q in request.queries] == [1, 2, 3]
    assert [list(q.exclude_post_ids) for q in request.queries] == [[0], [1], [2]]
    assert codec.decode_numpy(request.embeddings).tolist() == [[float(i)] * 4 for i in range(3)]
    assert (request.shard_index, request.num_shards, request.model_fingerprint) == (2, 4, MODEL)


def test_the_wire_benchmark_measures_both_forms():
    for attributes in (False, True):
        timings = measure(results(2, 5, attributes), reps=2)
        assert set(timings) == {"build (shard)", "read (router)"}
        assert all(a > 0 and b > 0 for a, b in timings.values())
