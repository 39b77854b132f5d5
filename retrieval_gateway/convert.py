"""The gateway's boundary: RetrieveRequest -> RetrieveSpec (checked), SearchResult -> RetrieveResponse,
GatewayReport -> GatewayStatus. Protobuf types only, no grpc. (The shard RPC's wire form, both sides,
is in shard_client.py.)"""

from __future__ import annotations

import numpy as np

from retrieval_gateway.gateway import GatewayReport, RetrieveSpec
from retrieval_gateway.index import SearchResult
from shared.convert import user_context_from_proto
from shared.errors import InvalidInput
from shared.model.actions import ACTION_NAMES
from shared.model.features import validate_user
from twotower.v1 import common_pb2, retrieval_gateway_pb2


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
    return RetrieveSpec(ctx, request.k, np.unique(posts), np.unique(authors), request.allow_partial)


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


def status_to_proto(report: GatewayReport) -> retrieval_gateway_pb2.GatewayStatus:
    status = retrieval_gateway_pb2.GatewayStatus(
        ready=report.ready,
        device=report.device,
        dtype=common_pb2.DTYPE_BFLOAT16 if report.dtype == "bf16" else common_pb2.DTYPE_FLOAT32,
        candidate_service_connected=report.candidate_service_connected,
        user_calls_in_flight=report.user_calls_in_flight,
        role=report.role,
        shard_index=report.shard_index,
        num_shards=report.num_shards,
        background_tasks=[
            common_pb2.BackgroundTask(
                name=t.name, running=t.running, failures=t.failures, last_error=t.last_error
            )
            for t in report.background_tasks
        ],
    )
    if report.corpus is not None:
        corpus = report.corpus
        status.corpus_version, status.corpus_size = corpus.version, corpus.size
        status.model_fingerprint, status.embedding_dim = corpus.fingerprint, corpus.dim
    return status
