"""Malformed requests against the live services (subprocesses): property-based (hypothesis).

Every answer must be OK or a deliberate status, never INTERNAL/UNKNOWN, no process may die, and each
service answers normal traffic afterwards. Covered: random and extreme ids, k of 0 / huge / negative on
the wire, unknown actions and surfaces, histories past the limit, random attributes, duplicate ids,
random bytes as a whole request (not a protobuf message, or one with unknown fields and enum values),
WatchCorpus from random versions and fingerprints, and messages over --max-message-bytes.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.model.checkpoint import random_model, save_checkpoint
from shared.model.config import TowerConfig
from tests.conftest import TINY
from tests.reliability.harness import Stack, write_items
from twotower.v1 import (
    candidate_tower_pb2,
    candidate_tower_pb2_grpc,
    common_pb2,
    retrieval_gateway_pb2,
    retrieval_gateway_pb2_grpc,
    user_tower_pb2,
    user_tower_pb2_grpc,
)

pytestmark = pytest.mark.reliability

MAX_MESSAGE = 256 * 1024
DELIBERATE = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"}
# No example database: nothing is written into the checkout, every run draws fresh examples.
EXAMPLES = settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
CORPUS = range(1, 301)

ids = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, -1, 1, 2, 2**31, 2**63 - 1, -(2**63)]))
actions = st.lists(
    st.one_of(st.sampled_from(["favorite", "reply", "click", "dwell_time"]), st.text(max_size=12)),
    max_size=4,
)
engagements = st.builds(
    common_pb2.Engagement,
    post_id=ids, author_id=ids, action_names=actions,
    action_ids=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4),
    product_surface=st.integers(-(2**31), 2**31 - 1),
    timestamp_ms=st.one_of(st.just(0), ids),
)  # fmt: skip
users = st.builds(
    common_pb2.UserContext,
    user_id=ids,
    history=st.lists(engagements, max_size=40),
    user_features=st.lists(ids, max_size=6),
)
items = st.builds(
    common_pb2.Item,
    post_id=ids,
    author_id=ids,
    attributes=st.dictionaries(st.text(max_size=10), st.text(max_size=30), max_size=3),
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    ckpt = tmp / "ckpt"
    save_checkpoint(random_model(TowerConfig(**TINY), seed=0), ckpt)
    limit = ["--max-message-bytes", str(MAX_MESSAGE)]
    s = Stack(tmp, ckpt, write_items(tmp / "items.jsonl", CORPUS), candidate_args=limit, user_args=limit,
              gateway_args=[*limit, "--max-k", "1000"])  # fmt: skip
    s.start_all()
    yield s
    s.stop_all()


@pytest.fixture(scope="module")
def channels(stack):
    opened = {name: grpc.insecure_channel(stack.address(name)) for name in ("gateway", "user", "candidate")}
    yield opened
    for ch in opened.values():
        ch.close()


def code_of(call, request, **kw) -> str:
    try:
        call(request, timeout=10, **kw)
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def assert_healthy(stack: Stack, channels) -> None:
    """Every process alive and normal traffic answered."""
    for name, proc in stack.procs.items():
        assert proc.proc.poll() is None, f"{name} died:\n{proc.log()[-3000:]}"
    cand = candidate_tower_pb2_grpc.CandidateTowerStub(channels["candidate"])
    # Random deletes may have removed some of the corpus: put it back, then ask normally.
    back = [common_pb2.Item(post_id=i, author_id=i % 4) for i in CORPUS]
    cand.UpsertItems(candidate_tower_pb2.UpsertItemsRequest(items=back), timeout=10)
    user = common_pb2.UserContext(user_id=7, history=[common_pb2.Engagement(post_id=3, action_ids=[0])])
    gw = retrieval_gateway_pb2_grpc.RetrievalGatewayStub(channels["gateway"])
    reply = gw.Retrieve(retrieval_gateway_pb2.RetrieveRequest(user=user, k=5), timeout=10)
    assert len(reply.items) == 5
    enc = user_tower_pb2_grpc.UserTowerStub(channels["user"]).EncodeUsers(
        user_tower_pb2.EncodeUsersRequest(users=[user]), timeout=10
    )
    assert list(enc.embeddings.shape) == [1, TINY["emb_dim"]]


@EXAMPLES
@given(user=users, k=st.integers(0, 2**32 - 1), exclude=st.lists(ids, max_size=20),
       exclude_authors=st.lists(ids, max_size=20), exclude_history=st.booleans())  # fmt: skip
def test_retrieve_random_requests(stack, channels, user, k, exclude, exclude_authors, exclude_history):
    request = retrieval_gateway_pb2.RetrieveRequest(
        user=user, k=k, exclude_post_ids=exclude, exclude_author_ids=exclude_authors,
        exclude_history=exclude_history,
    )  # fmt: skip
    code = code_of(retrieval_gateway_pb2_grpc.RetrievalGatewayStub(channels["gateway"]).Retrieve, request)
    assert code in DELIBERATE, (code, request)


@EXAMPLES
@given(batch=st.lists(users, max_size=8))
def test_encode_users_random_batches(stack, channels, batch):
    code = code_of(
        user_tower_pb2_grpc.UserTowerStub(channels["user"]).EncodeUsers,
        user_tower_pb2.EncodeUsersRequest(users=batch),
    )
    assert code in DELIBERATE, code


@settings(max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(events=st.integers(1025, 1600), users_per_call=st.integers(1, 3), extra_users=st.integers(0, 300))
def test_huge_histories_and_batches_are_refused_not_computed(
    stack, channels, events, users_per_call, extra_users
):
    history = [common_pb2.Engagement(post_id=1 + i % 50, action_ids=[0]) for i in range(events)]
    user = common_pb2.UserContext(user_id=1, history=history)
    gw = retrieval_gateway_pb2_grpc.RetrievalGatewayStub(channels["gateway"]).Retrieve
    assert code_of(gw, retrieval_gateway_pb2.RetrieveRequest(user=user, k=5)) == "INVALID_ARGUMENT"
    small = common_pb2.UserContext(user_id=2)
    batch = [user] * users_per_call + [small] * (extra_users if extra_users > 256 else 0)
    enc = user_tower_pb2_grpc.UserTowerStub(channels["user"]).EncodeUsers
    assert code_of(enc, user_tower_pb2.EncodeUsersRequest(users=batch)) == "INVALID_ARGUMENT"


@EXAMPLES
@given(batch=st.lists(items, max_size=6), delete=st.lists(ids, max_size=6))
def test_candidate_random_items(stack, channels, batch, delete):
    cand = candidate_tower_pb2_grpc.CandidateTowerStub(channels["candidate"])
    for call, request in (
        (cand.EncodeItems, candidate_tower_pb2.EncodeItemsRequest(items=batch)),
        (cand.UpsertItems, candidate_tower_pb2.UpsertItemsRequest(items=batch)),
        (cand.DeleteItems, candidate_tower_pb2.DeleteItemsRequest(post_ids=delete)),
    ):
        code = code_of(call, request)
        assert code in DELIBERATE, (code, request)


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(version=st.integers(0, 2**64 - 1), fingerprint=st.one_of(st.just(""), st.text(max_size=20)))
def test_watch_corpus_from_random_versions(stack, channels, version, fingerprint):
    cand = candidate_tower_pb2_grpc.CandidateTowerStub(channels["candidate"])
    request = candidate_tower_pb2.WatchCorpusRequest(known_version=version, known_fingerprint=fingerprint)
    stream = cand.WatchCorpus(request, timeout=2)
    try:
        first = next(stream)
        assert first.WhichOneof("event") in ("snapshot_chunk", "delta")
    except grpc.RpcError as exc:
        # An up-to-date watcher gets no event within the deadline; anything else must be deliberate.
        assert exc.code().name in DELIBERATE | {"DEADLINE_EXCEEDED"}, exc
    finally:
        stream.cancel()


METHODS = [
    "/twotower.v1.RetrievalGateway/Retrieve",
    "/twotower.v1.RetrievalGateway/GetStatus",
    "/twotower.v1.UserTower/EncodeUsers",
    "/twotower.v1.CandidateTower/EncodeItems",
    "/twotower.v1.CandidateTower/UpsertItems",
    "/twotower.v1.CandidateTower/DeleteItems",
    "/twotower.v1.CandidateTower/GetCorpusInfo",
]
SERVICE_OF = {"RetrievalGateway": "gateway", "UserTower": "user", "CandidateTower": "candidate"}


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# Wire-level fields: (field number, varint value) pairs: unknown fields, unknown enum values (a Tensor
# dtype of 99 inside a nested message), negative values for unsigned fields (k = -1 on the wire).
wire_fields = st.lists(
    st.tuples(st.integers(1, 40), st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([-1, 99]))),
    max_size=6,
)


@EXAMPLES
@given(method=st.sampled_from(METHODS), payload=st.one_of(st.binary(max_size=300), wire_fields))
def test_random_bytes_and_wire_fields_as_requests(stack, channels, method, payload):
    if isinstance(payload, list):
        payload = b"".join(_varint(num << 3) + _varint(value) for num, value in payload)
    channel = channels[SERVICE_OF[method.split(".")[-1].split("/")[0]]]
    call = channel.unary_unary(method)  # raw bytes in, raw bytes out
    code = code_of(call, payload)
    assert code in DELIBERATE, (code, method, payload)


def test_negative_k_on_the_wire_is_invalid_argument(stack, channels):
    user = common_pb2.UserContext(user_id=3).SerializeToString()
    payload = b"\x0a" + _varint(len(user)) + user + b"\x10" + _varint(-1)  # k = -1 as a varint
    call = channels["gateway"].unary_unary("/twotower.v1.RetrievalGateway/Retrieve")
    assert code_of(call, payload) == "INVALID_ARGUMENT"


def test_oversized_messages_are_resource_exhausted(stack, channels):
    user = common_pb2.UserContext(user_id=3)
    too_many = list(range(2**62, 2**62 + 40_000))  # 9-byte varints: ~360 KB, over the 256 KiB limit
    gw = retrieval_gateway_pb2_grpc.RetrievalGatewayStub(channels["gateway"])
    request = retrieval_gateway_pb2.RetrieveRequest(user=user, k=5, exclude_post_ids=too_many)
    assert request.ByteSize() > MAX_MESSAGE
    assert code_of(gw.Retrieve, request) == "RESOURCE_EXHAUSTED"
    big = common_pb2.Item(post_id=9, attributes={"blob": "x" * (MAX_MESSAGE + 10)})
    cand = candidate_tower_pb2_grpc.CandidateTowerStub(channels["candidate"])
    assert code_of(cand.UpsertItems, candidate_tower_pb2.UpsertItemsRequest(items=[big])) == (
        "RESOURCE_EXHAUSTED"
    )
    enc = user_tower_pb2_grpc.UserTowerStub(channels["user"]).EncodeUsers
    fat_user = common_pb2.UserContext(user_id=1, user_features=too_many)
    crowd = user_tower_pb2.EncodeUsersRequest(users=[fat_user])
    assert code_of(enc, crowd) == "RESOURCE_EXHAUSTED"


def test_services_answer_normal_traffic_after_all_of_the_above(stack, channels):
    assert_healthy(stack, channels)
    for proc in stack.procs.values():
        assert "Traceback" not in proc.log(), proc.log()[-3000:]
