"""Malformed tensors from the towers to the gateway (the Tensor-bearing messages of the system are the
towers' replies and the corpus stream): random bytes, wrong and unknown dtypes, wrong shapes,
non-finite values, foreign fingerprints. The gateway answers a deliberate status (never INTERNAL),
keeps serving its last good corpus, and recovers by itself.

In-process on loopback: a stub user_service whose next reply the test chooses, the stub
candidate_service of the gateway's integration tests, and the real gateway server.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval_gateway.config import GatewayConfig
from retrieval_gateway.server import create_server
from shared import codec
from shared.server.bootstrap import ServerOptions
from tests.integration.test_gateway_stubbed import (
    FP,
    StubCandidate,
    add_candidate,
    add_user,
    corpus,
    request_users,
    start_stub,
    stop_stub,
)
from twotower.v1 import (
    candidate_tower_pb2,
    common_pb2,
    retrieval_gateway_pb2,
    retrieval_gateway_pb2_grpc,
    user_tower_pb2,
    user_tower_pb2_grpc,
)

pytestmark = pytest.mark.reliability

D = 8
# A malformed reply is the dependency's fault, not the caller's: UNAVAILABLE (or FAILED_PRECONDITION for
# a foreign fingerprint), never INVALID_ARGUMENT, which would tell the caller to fix its request.
UPSTREAM_FAULT = {"OK", "FAILED_PRECONDITION", "UNAVAILABLE"}
SETTINGS = settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))


class ChosenUser(user_tower_pb2_grpc.UserTowerServicer):
    """Answers EncodeUsers with `reply` when set, else with a good unit vector."""

    def __init__(self) -> None:
        self.reply: user_tower_pb2.EncodeUsersResponse | None = None

    async def EncodeUsers(self, request, context):
        if self.reply is not None:
            return self.reply
        emb = np.full((len(request_users(request)), D), 1 / np.sqrt(D), np.float32)
        model = common_pb2.ModelInfo(fingerprint=FP, embedding_dim=D)
        return user_tower_pb2.EncodeUsersResponse(embeddings=codec.encode(emb), model=model)


class LoopThread:
    """An event loop on a thread: the servers live there while hypothesis drives them synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def env():
    lt = LoopThread()
    user, cand = ChosenUser(), StubCandidate(D)
    cand.items = corpus(np.random.default_rng(0), 30)

    async def up():
        u = await start_stub(user, add_user)
        c = await start_stub(cand, add_candidate)
        config = GatewayConfig(
            user_service=f"127.0.0.1:{u[1]}", candidate_service=f"127.0.0.1:{c[1]}", device="cpu",
            health_poll_s=0.05, reconnect_initial_s=0.02, reconnect_max_s=0.2,
            server=ServerOptions(grace_seconds=0),
        )  # fmt: skip
        _server, port, app = create_server(config)
        await app.start()
        return u, c, app, port

    u, c, app, port = lt.run(up())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = retrieval_gateway_pb2_grpc.RetrievalGatewayStub(channel)
    _wait_ok(stub)
    yield user, cand, stub, lt
    channel.close()

    async def down():
        await app.stop(0)
        await stop_stub(u[0], u[2])
        await stop_stub(c[0], c[2])

    lt.run(down())
    lt.close()


def _retrieve(stub) -> str:
    user = common_pb2.UserContext(user_id=1)
    try:
        stub.Retrieve(retrieval_gateway_pb2.RetrieveRequest(user=user, k=5), timeout=5)
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def _wait_ok(stub, attempts: int = 200) -> None:
    for _ in range(attempts):
        if _retrieve(stub) == "OK":
            return
        threading.Event().wait(0.05)
    raise AssertionError("the gateway did not answer OK again")


tensors = st.builds(
    common_pb2.Tensor,
    dtype=st.one_of(st.integers(0, 6), st.just(99)),  # 5, 6, 99: unknown enum values
    shape=st.lists(st.integers(-2, 12), max_size=3),
    data=st.one_of(
        st.binary(max_size=200),
        st.sampled_from([np.full(D, np.nan, np.float32).tobytes(), np.ones(D, np.float32).tobytes()]),
    ),
)


@SETTINGS
@given(embeddings=tensors, fingerprint=st.sampled_from([FP, "", "ff" * 8]), dim=st.integers(0, 20))
def test_malformed_user_embeddings_get_a_deliberate_status(env, embeddings, fingerprint, dim):
    user, _cand, stub, _lt = env
    user.reply = user_tower_pb2.EncodeUsersResponse(
        embeddings=embeddings, model=common_pb2.ModelInfo(fingerprint=fingerprint, embedding_dim=dim)
    )
    try:
        code = _retrieve(stub)
    finally:
        user.reply = None
    assert code in UPSTREAM_FAULT, (code, embeddings)
    assert _retrieve(stub) == "OK"


@SETTINGS
@given(
    kind=st.sampled_from(["delta", "chunk"]),
    version_step=st.sampled_from([0, 1, 2, -1]),
    a=tensors, b=tensors, c=tensors,
    fingerprint=st.sampled_from([FP, "ff" * 8]),
)  # fmt: skip
def test_malformed_corpus_events_never_break_serving(env, kind, version_step, a, b, c, fingerprint):
    _user, cand, stub, lt = env
    version = cand.version + version_step
    if kind == "delta":
        event = candidate_tower_pb2.CorpusEvent(delta=candidate_tower_pb2.CorpusDelta(
            version=version, fingerprint=fingerprint, upsert_post_ids=a, upsert_author_ids=b,
            upsert_embeddings=c,
        ))  # fmt: skip
    else:
        event = candidate_tower_pb2.CorpusEvent(snapshot_chunk=candidate_tower_pb2.SnapshotChunk(
            version=version, fingerprint=fingerprint, chunk_index=0, num_chunks=1, total_items=3,
            post_ids=a, author_ids=b, embeddings=c,
        ))  # fmt: skip
    lt.run(_on_loop(cand.publish, event))  # the stub's queues belong to the servers' loop
    # The last good corpus keeps answering while the follower drops the bad stream and resyncs.
    assert _retrieve(stub) in {"OK", "FAILED_PRECONDITION"}
    # Then a real change: the gateway must reach it (a follower that died on the bad event, or still
    # believes in it, never does). Answering Retrieve alone would not show that.
    post = 10_000 + cand.version
    vector = np.full((1, D), 1 / np.sqrt(D), np.float32)
    lt.run(_on_loop(cand.upsert, [post], [1], vector))
    _wait_version(stub, cand.version, len(cand.items))
    _wait_ok(stub)


async def _on_loop(fn, *args):
    return fn(*args)


def _wait_version(stub, version: int, size: int, attempts: int = 400) -> None:
    status = None
    for _ in range(attempts):
        status = stub.GetStatus(retrieval_gateway_pb2.GetStatusRequest(), timeout=5)
        current = (status.corpus_version, status.corpus_size)
        if current == (version, size) and status.candidate_service_connected:
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"gateway stuck at {status}; candidate_service is at v{version} with {size} items")
