"""The whole stack as real processes (candidate_service, user_service, retrieval_gateway via their
CLIs) on loopback: results equal a brute-force top-k of the services' own embeddings, and an upsert
or delete made through candidate_service shows in Retrieve within a bounded time."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from shared import codec
from tests.integration.stacks import launch_stack, write_items
from twotower.v1 import (
    candidate_tower_pb2,
    candidate_tower_pb2_grpc,
    common_pb2,
    retrieval_gateway_pb2,
    retrieval_gateway_pb2_grpc,
    user_tower_pb2,
    user_tower_pb2_grpc,
)

N = 60
BOUND_S = 10.0  # an acknowledged change must be visible in Retrieve within this


@pytest.fixture
def stack(tmp_path, tiny_checkpoint):
    with launch_stack(tmp_path, tiny_checkpoint, write_items(tmp_path / "items.jsonl", N)) as services:
        yield services


def user_context() -> common_pb2.UserContext:
    return common_pb2.UserContext(user_id=7, history=[
        common_pb2.Engagement(post_id=3, author_id=3, action_names=["favorite"]),
        common_pb2.Engagement(post_id=11, author_id=3, action_names=["reply", "click"]),
    ])  # fmt: skip


def retrieve(address: str, k: int, **kw) -> retrieval_gateway_pb2.RetrieveResponse:
    with grpc.insecure_channel(address) as channel:
        stub = retrieval_gateway_pb2_grpc.RetrievalGatewayStub(channel)
        return stub.Retrieve(
            retrieval_gateway_pb2.RetrieveRequest(user=user_context(), k=k, **kw), timeout=10
        )


def wait_for(predicate, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < BOUND_S:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{what} not visible in Retrieve within {BOUND_S}s")


@pytest.mark.slow  # three processes, each importing torch
def test_real_stack_matches_brute_force_and_follows_changes(stack):
    cand, user, gateway = stack
    with grpc.insecure_channel(cand.address) as c, grpc.insecure_channel(user.address) as u:
        cstub = candidate_tower_pb2_grpc.CandidateTowerStub(c)
        items = [common_pb2.Item(post_id=i, author_id=i % 4) for i in range(1, N + 1)]
        item_emb = codec.decode_numpy(
            cstub.EncodeItems(candidate_tower_pb2.EncodeItemsRequest(items=items)).embeddings
        )
        encoded = user_tower_pb2_grpc.UserTowerStub(u).EncodeUsers(
            user_tower_pb2.EncodeUsersRequest(users=[user_context()]), timeout=10)  # fmt: skip
        query = codec.decode_numpy(encoded.embeddings)[0]
        fingerprint = encoded.model.fingerprint

        res = retrieve(gateway.address, 10, exclude_history=True)
        scores = item_emb.astype(np.float64) @ query
        posts = np.arange(1, N + 1)
        keep = ~np.isin(posts, [3, 11])
        expected = posts[keep][np.lexsort((posts[keep], -scores[keep]))][:10]
        assert [it.post_id for it in res.items] == expected.tolist()
        np.testing.assert_allclose([it.score for it in res.items], scores[expected - 1], atol=1e-5)
        assert res.model_fingerprint == fingerprint and dict(res.items[0].attributes) == {
            "n": str(expected[0])
        }

        # an upsert through candidate_service shows up; a delete disappears
        new_item = common_pb2.Item(post_id=5000, author_id=2, attributes={"n": "new"})
        up = cstub.UpsertItems(candidate_tower_pb2.UpsertItemsRequest(items=[new_item]), timeout=10)
        wait_for(lambda: any(it.post_id == 5000 for it in retrieve(gateway.address, N + 1).items), "upsert")
        res = retrieve(gateway.address, N + 1)
        assert res.corpus_version >= up.version and len(res.items) == N + 1
        assert {dict(it.attributes)["n"] for it in res.items if it.post_id == 5000} == {"new"}
        cstub.DeleteItems(
            candidate_tower_pb2.DeleteItemsRequest(post_ids=[5000, int(expected[0])]), timeout=10
        )
        wait_for(lambda: len(retrieve(gateway.address, N + 1).items) == N - 1, "delete")
        left = {it.post_id for it in retrieve(gateway.address, N + 1).items}
        assert 5000 not in left and int(expected[0]) not in left
