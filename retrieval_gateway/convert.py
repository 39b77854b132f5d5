"""RetrieveRequest -> validated plain values, and search results -> RetrieveResponse. No grpc import."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrieval_gateway.index import SearchResult
from shared.convert import user_context_from_proto
from shared.errors import InvalidInput
from shared.model.actions import ACTION_NAMES
from shared.model.features import UserContext, validate_user
from twotower.v1 import retrieval_gateway_pb2


@dataclass(frozen=True)
class RetrieveSpec:
    user: UserContext  # parsed and checked once here; sent to user_service in columns (no re-parse)
    k: int
    exclude_post_ids: np.ndarray  # [e] int64: explicit exclusions plus history posts when asked
    exclude_author_ids: np.ndarray  # [a] int64


def retrieve_spec_from_proto(
    request: retrieval_gateway_pb2.RetrieveRequest, max_k: int, max_exclusions: int, max_history_events: int
) -> RetrieveSpec:
    """Check everything the gateway can check before calling user_service (cheap checks first)."""
    if not 1 <= request.k <= max_k:
        raise InvalidInput(f"k must be in [1, {max_k}], got {request.k}")
    for name in ("exclude_post_ids", "exclude_author_ids"):
        n = len(getattr(request, name))
        if n > max_exclusions:
            raise InvalidInput(f"{name} has {n} ids; the limit is {max_exclusions}")
    if not request.HasField("user"):
        raise InvalidInput("user is required")
    # The same conversion and checks as user_service's (less what only a model knows), so a malformed
    # user context is INVALID_ARGUMENT before any remote call.
    ctx = user_context_from_proto(request.user, len(ACTION_NAMES), max_history_events)
    validate_user(ctx, None, max_history_events)
    posts = np.fromiter(request.exclude_post_ids, np.int64, len(request.exclude_post_ids))
    if request.exclude_history:
        posts = np.concatenate([posts, ctx.post_ids])
    authors = np.fromiter(request.exclude_author_ids, np.int64, len(request.exclude_author_ids))
    return RetrieveSpec(ctx, request.k, np.unique(posts), np.unique(authors))


def result_to_proto(result: SearchResult) -> retrieval_gateway_pb2.RetrieveResponse:
    response = retrieval_gateway_pb2.RetrieveResponse(
        corpus_version=result.version, model_fingerprint=result.fingerprint,
        partial=bool(result.missing_shards), missing_shards=result.missing_shards,
        shard_corpus_versions=result.shard_versions,
    )  # fmt: skip
    add = response.items.add
    for post_id, author_id, score, attributes in zip(
        result.post_ids.tolist(), result.author_ids.tolist(), result.scores.tolist(), result.attributes,
        strict=True,
    ):  # fmt: skip
        item = add(post_id=post_id, author_id=author_id, score=score)
        if attributes:  # update() fills the map 2.4x faster than the attributes= keyword (100 items:
            item.attributes.update(attributes)  # 183 vs 447 us with two short attributes each)
    return response
