"""Client of one gateway shard (--role shard), for the router: ScoreShard and GetStatus, errors mapped
to the gateway's domain errors. The proto <-> domain conversion of the shard RPC lives here too, both
directions, so the wire form of a shard's answer is defined in one file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import grpc
import numpy as np
import torch

from retrieval_gateway.index import Attributes, Query, SearchResult
from retrieval_gateway.sharding import ShardHits
from shared import codec
from shared.channels import RECONNECT_OPTIONS, balanced_options
from shared.corpus_rows import NO_ATTRIBUTES, AttributeColumn
from shared.errors import DeadlineExpired, InvalidInput, ModelMismatch, NotReady, ServiceError
from shared.tls import ClientTLS, aio_channel
from twotower.v1 import common_pb2, retrieval_gateway_pb2, retrieval_gateway_pb2_grpc

_SCORER = retrieval_gateway_pb2.DESCRIPTOR.services_by_name["ShardScorer"].full_name
_GATEWAY = retrieval_gateway_pb2.DESCRIPTOR.services_by_name["RetrievalGateway"].full_name
_FLOAT32 = (common_pb2.DTYPE_FLOAT32,)
_INT64 = (common_pb2.DTYPE_INT64,)
_COMPACT = {"separators": (",", ":"), "ensure_ascii": False}


@dataclass(frozen=True)
class ShardAnswer:
    index: int
    hits: list[ShardHits]  # one per query
    version: int
    fingerprint: str


@dataclass(frozen=True)
class ShardStatus:
    ready: bool
    version: int
    fingerprint: str
    size: int
    dim: int


class ShardUnavailable(NotReady):
    """A shard did not answer (down, overloaded, past the deadline): UNAVAILABLE for the caller."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


# ---- the wire form, both sides -----------------------------------------------------------------
def score_request(
    queries: Sequence[Query], fingerprint: str, shard_index: int, num_shards: int
) -> retrieval_gateway_pb2.ScoreShardRequest:
    embeddings = torch.stack([q.embedding.float() for q in queries])
    return retrieval_gateway_pb2.ScoreShardRequest(
        embeddings=codec.encode(embeddings),
        model_fingerprint=fingerprint,
        queries=[
            retrieval_gateway_pb2.ShardQuery(
                k=q.k,
                exclude_post_ids=q.exclude_post_ids.tolist(),
                exclude_author_ids=q.exclude_author_ids.tolist(),
            )
            for q in queries
        ],
        shard_index=shard_index,
        num_shards=num_shards,
    )


def queries_from_request(request: retrieval_gateway_pb2.ScoreShardRequest, max_k: int) -> list[Query]:
    """The shard's side: the router's queries, checked (a router is a client like any other)."""
    b = len(request.queries)
    if b == 0:
        raise InvalidInput("ScoreShard: no queries")
    emb = codec.decode_torch(request.embeddings, "embeddings", _FLOAT32, shape=(b, None))
    queries = []
    for i, q in enumerate(request.queries):
        if not 1 <= q.k <= max_k:
            raise InvalidInput(f"queries[{i}].k must be in [1, {max_k}], got {q.k}")
        posts = np.fromiter(q.exclude_post_ids, np.int64, len(q.exclude_post_ids))
        authors = np.fromiter(q.exclude_author_ids, np.int64, len(q.exclude_author_ids))
        queries.append(Query(emb[i], request.model_fingerprint, q.k, posts, authors))
    return queries


def score_response(
    results: Sequence[SearchResult], shard_index: int, version: int, fingerprint: str
) -> retrieval_gateway_pb2.ScoreShardResponse:
    """The shard's answer: its hits as columns (ShardHitColumns), attributes only where an item has
    any (a corpus without attributes sends none). Attributes still encoded (the index's search with
    encoded=True) go out as stored, neither decoded nor encoded again."""
    response = retrieval_gateway_pb2.ScoreShardResponse(
        corpus_version=version, model_fingerprint=fingerprint, shard_index=shard_index
    )
    columns = response.hits
    columns.counts.extend([len(r.post_ids) for r in results])
    columns.post_ids.CopyFrom(codec.encode(_concat([r.post_ids for r in results], np.int64)))
    columns.author_ids.CopyFrom(codec.encode(_concat([r.author_ids for r in results], np.int64)))
    columns.scores.CopyFrom(codec.encode(_concat([r.scores for r in results], np.float32)))
    attributed, text = _attributes_json(results)
    if len(attributed):
        columns.attributed.extend(attributed)
        columns.attributes_json = text
    return response


def _attributes_json(results: Sequence[SearchResult]) -> tuple[list[int], bytes]:
    """(positions of the hits with attributes, in the concatenation; their attributes as one JSON
    array)."""
    if all(isinstance(r.attributes, AttributeColumn) for r in results):  # a shard's search: as stored
        attributed, text = AttributeColumn.concat([r.attributes for r in results]).json_array()
        return attributed.tolist(), text
    flat = [a for r in results for a in _maps(r.attributes)]
    attributed = [i for i, attrs in enumerate(flat) if attrs]
    if not attributed:
        return [], b""
    maps = flat if len(attributed) == len(flat) else [flat[i] for i in attributed]
    # json serialises dicts only; the index's maps are dicts, its empty one a read-only mapping
    maps = [a if type(a) is dict else dict(a) for a in maps]
    return attributed, json.dumps(maps, **_COMPACT).encode()


def _maps(attributes: list[Attributes] | AttributeColumn) -> list[Attributes]:
    return attributes.decode() if isinstance(attributes, AttributeColumn) else attributes


def hits_from_response(response: retrieval_gateway_pb2.ScoreShardResponse, queries: int) -> list[ShardHits]:
    """The router's side: one ShardHits per query (views into the decoded columns), checked; raises
    InvalidInput naming what is malformed (the caller makes that the shard's fault, not the user's)."""
    if not response.HasField("hits") and len(response.results):  # a shard of the previous release
        return _hits_from_messages(response, queries)
    columns = response.hits
    counts = np.fromiter(columns.counts, np.int64, len(columns.counts))
    if len(counts) != queries:
        raise InvalidInput(f"hits for {len(counts)} queries, expected {queries}")
    total = int(counts.sum())
    post_ids = codec.decode_numpy(columns.post_ids, "post_ids", _INT64, shape=(total,))
    author_ids = codec.decode_numpy(columns.author_ids, "author_ids", _INT64, shape=(total,))
    scores = codec.decode_numpy(columns.scores, "scores", _FLOAT32, shape=(total,))
    attributed = np.fromiter(columns.attributed, np.int64, len(columns.attributed))
    if len(attributed) and (attributed[-1] >= total or (np.diff(attributed) <= 0).any()):
        raise InvalidInput(f"attributed positions are not ascending below {total}")
    maps = _attribute_maps(columns.attributes_json) if len(attributed) or columns.attributes_json else []
    if len(maps) != len(attributed):
        raise InvalidInput(f"{len(attributed)} attributed positions for {len(maps)} attribute maps")
    if len(maps) == total:  # every hit has attributes (positions ascending below total: all of them)
        attributes: list[Attributes] = maps
    else:
        attributes = [NO_ATTRIBUTES] * total
        for pos, attrs in zip(attributed.tolist(), maps, strict=True):
            attributes[pos] = attrs
    hits, at = [], 0
    for n in counts.tolist():
        end = at + n
        hits.append(ShardHits(post_ids[at:end], author_ids[at:end], scores[at:end], attributes[at:end]))
        at = end
    return hits


def _hits_from_messages(response: retrieval_gateway_pb2.ScoreShardResponse, queries: int) -> list[ShardHits]:
    """The answer of a shard that still sends one message per hit (`results`)."""
    if len(response.results) != queries:
        raise InvalidInput(f"hits for {len(response.results)} queries, expected {queries}")
    out = []
    for hits in response.results:
        n = len(hits.post_ids)
        if not (len(hits.author_ids) == len(hits.scores) == len(hits.attributes) == n):
            raise InvalidInput("hit columns of different lengths")
        scores = np.fromiter(hits.scores, np.float32, n)
        if not np.isfinite(scores).all():
            raise InvalidInput("non-finite scores")
        out.append(ShardHits(
            np.fromiter(hits.post_ids, np.int64, n), np.fromiter(hits.author_ids, np.int64, n), scores,
            [dict(a.attributes) if a.attributes else NO_ATTRIBUTES for a in hits.attributes],
        ))  # fmt: skip
    return out


def _attribute_maps(text: bytes) -> list[dict[str, str]]:
    try:
        maps = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InvalidInput(f"attributes_json is not JSON: {exc}") from None
    if type(maps) is not list:
        raise InvalidInput("attributes_json is not a JSON array")
    # JSON keys are always strings; the element and value types are checked in C (map and set), not
    # in a Python loop: this runs on the router's event loop for every hit with attributes.
    values = chain.from_iterable(map(dict.values, maps)) if set(map(type, maps)) <= {dict} else [None]
    if not set(map(type, values)) <= {str}:
        raise InvalidInput("attributes_json holds something other than objects of strings")
    return maps


def _concat(columns: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(columns).astype(dtype, copy=False) if columns else np.empty(0, dtype)


# ---- the client ----------------------------------------------------------------------------------
class ShardClient:
    def __init__(
        self, index: int, num_shards: int, address: str, channel_options: list[tuple[str, object]],
        tls: ClientTLS | None = None,
    ) -> None:  # fmt: skip
        self.index, self.num_shards, self.address = index, num_shards, address
        # A shard's target may name several replicas of it: balanced and retried like any service; a
        # shard back from an outage is tried again within RECONNECT_OPTIONS' 2 s, not gRPC's 120 s.
        balanced = balanced_options(_SCORER, ["ScoreShard"])
        self._channel = aio_channel(address, [*channel_options, *RECONNECT_OPTIONS, *balanced], tls)
        self._scorer = retrieval_gateway_pb2_grpc.ShardScorerStub(self._channel)
        self._gateway = retrieval_gateway_pb2_grpc.RetrievalGatewayStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def score(self, queries: Sequence[Query], fingerprint: str, timeout: float) -> ShardAnswer:
        request = score_request(queries, fingerprint, self.index, self.num_shards)
        try:
            response = await self._scorer.ScoreShard(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._map_error(exc) from None
        if response.model_fingerprint != fingerprint:
            raise ModelMismatch(
                f"shard {self.index} serves model {response.model_fingerprint}, not {fingerprint}"
            )
        try:
            if response.shard_index != self.index:
                raise InvalidInput(f"it says it is shard {response.shard_index}")
            hits = hits_from_response(response, len(queries))
        except InvalidInput as exc:
            raise ShardUnavailable(
                self.index, f"shard {self.index} at {self.address} sent a malformed answer: {exc}"
            ) from None
        return ShardAnswer(self.index, hits, response.corpus_version, response.model_fingerprint)

    async def status(self, timeout: float) -> ShardStatus | None:
        """The shard's corpus as it reports it; None when it does not answer."""
        try:
            s = await self._gateway.GetStatus(retrieval_gateway_pb2.GetStatusRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return None
        return ShardStatus(s.ready, s.corpus_version, s.model_fingerprint, s.corpus_size, s.embedding_dim)

    def _map_error(self, exc: grpc.aio.AioRpcError) -> ServiceError:
        code, details = exc.code(), exc.details()
        where = f"shard {self.index} at {self.address}"
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return ModelMismatch(f"{where}: {details}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:  # the router's request: a bug, not the caller's
            return NotReady(f"{where} refused the router's request: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExpired(f"deadline passed while waiting for {where}")
        return ShardUnavailable(self.index, f"{where} did not answer ({code.name}: {details})")
