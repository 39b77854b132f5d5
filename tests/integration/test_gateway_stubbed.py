"""retrieval_gateway over real gRPC, in-process on port 0, against stub UserTower and CandidateTower
servers that serve fixed vectors, so every result can be checked against a brute-force numpy top-k.

The candidate stub follows the WatchCorpus contract of protos/twotower/v1/candidate_tower.proto:
deltas after a known version when it still has them, else a chunked snapshot; then every change.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from retrieval_gateway.config import GatewayConfig
from retrieval_gateway.server import create_server
from shared import codec
from shared.convert import user_batch_from_proto
from shared.server.bootstrap import ServerOptions, create_grpc_server, graceful_stop
from twotower.v1 import (
    candidate_tower_pb2,
    candidate_tower_pb2_grpc,
    common_pb2,
    retrieval_gateway_pb2,
    retrieval_gateway_pb2_grpc,
    user_tower_pb2,
    user_tower_pb2_grpc,
)

FP = "a1" * 8


def request_users(request) -> list:
    """The users of an EncodeUsers call, sent as `users` or (by the gateway) as a columnar `batch`."""
    if request.HasField("batch"):
        return user_batch_from_proto(
            request.batch, num_actions=19, max_history_events=1024, max_user_features=8
        )
    return list(request.users)


class StubUser(user_tower_pb2_grpc.UserTowerServicer):
    def __init__(self, vectors: dict[int, np.ndarray], fingerprint: str = FP) -> None:
        self.vectors = vectors
        self.fingerprint = fingerprint
        self.time_remaining: list[float | None] = []
        self.users_per_call: list[int] = []
        self.gate: asyncio.Event | None = None  # when set by a test, calls wait for it
        self.bad_user_ids: set[int] = set()  # answered with INVALID_ARGUMENT, like a model limit
        self.stalled_user_ids: set[int] = set()  # calls carrying one of these hang until cancelled
        self.delays: list[float] = []  # seconds the next calls sleep before answering, one per call
        self.columnar: list[bool] = []  # per call: users sent as a columnar batch
        # Models held (as user_service during a rollout): a call names one of them; None = any name is
        # answered. The default (no name asked) is `fingerprint`.
        self.held: set[str] | None = None
        self.asked: list[str] = []  # model_fingerprint of each call
        self.honour_asked = True  # False: a faulty user_service that answers with its own model

    async def EncodeUsers(self, request, context):
        users = request_users(request)
        self.columnar.append(request.HasField("batch") and not request.users)
        self.asked.append(request.model_fingerprint)
        self.time_remaining.append(context.time_remaining())
        self.users_per_call.append(len(users))
        if self.gate is not None:
            await self.gate.wait()
        if self.delays:
            await asyncio.sleep(self.delays.pop(0))
        if any(u.user_id in self.stalled_user_ids for u in users):
            await asyncio.Event().wait()  # a stalled replica (SIGSTOP, GC pause): only the deadline ends it
        bad = [i for i, u in enumerate(users) if u.user_id in self.bad_user_ids]
        if bad:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"users[{bad[0]}]: too many user_features")
        fingerprint = (request.model_fingerprint if self.honour_asked else "") or self.fingerprint
        if self.held is not None and fingerprint not in self.held:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"model {fingerprint!r} is not loaded")
        emb = np.stack([self.vectors[u.user_id] for u in users]).astype(np.float32)
        model = common_pb2.ModelInfo(fingerprint=fingerprint, embedding_dim=emb.shape[1])
        return user_tower_pb2.EncodeUsersResponse(embeddings=codec.encode(emb), model=model)


class StubCandidate(candidate_tower_pb2_grpc.CandidateTowerServicer):
    def __init__(self, dim: int, fingerprint: str = FP, chunk_rows: int = 7) -> None:
        self.dim = dim
        self.fingerprint = fingerprint
        self.chunk_rows = chunk_rows
        self.items: dict[int, tuple[int, np.ndarray, dict[str, str]]] = {}
        self.version = 1
        self.deltas: list[candidate_tower_pb2.CorpusDelta] = []  # all since the last reset
        self.watchers: list[asyncio.Queue] = []
        self.requests: list[tuple[int, str]] = []  # (known_version, known_fingerprint) per watch

    # ---- the RPC -------------------------------------------------------------------------------
    async def WatchCorpus(self, request, context):
        self.requests.append((request.known_version, request.known_fingerprint))
        queue: asyncio.Queue = asyncio.Queue()
        self.watchers.append(queue)
        try:
            first = self.deltas[0].version - 1 if self.deltas else self.version
            if (
                request.known_fingerprint == self.fingerprint
                and first <= request.known_version <= self.version
            ):
                for delta in self.deltas:
                    if delta.version > request.known_version:
                        yield candidate_tower_pb2.CorpusEvent(delta=delta)
            else:
                for event in self.snapshot():
                    yield event
            while True:
                yield await queue.get()
        finally:
            self.watchers.remove(queue)

    # ---- test controls -------------------------------------------------------------------------
    def snapshot(self) -> list[candidate_tower_pb2.CorpusEvent]:
        posts = np.array(sorted(self.items), np.int64)
        n = len(posts)
        starts = list(range(0, n, self.chunk_rows)) or [0]
        events = []
        for i, s in enumerate(starts):
            part = posts[s : s + self.chunk_rows]
            emb = np.stack([self.items[p][1] for p in part]) if len(part) else np.zeros((0, self.dim))
            chunk = candidate_tower_pb2.SnapshotChunk(
                version=self.version, fingerprint=self.fingerprint, chunk_index=i, num_chunks=len(starts),
                total_items=n, post_ids=codec.encode(part),
                author_ids=codec.encode(np.array([self.items[p][0] for p in part], np.int64)),
                embeddings=codec.encode(emb.astype(np.float32)),
                attributes=[candidate_tower_pb2.ItemAttributes(attributes=self.items[p][2]) for p in part],
            )  # fmt: skip
            events.append(candidate_tower_pb2.CorpusEvent(snapshot_chunk=chunk))
        return events

    def publish(self, event: candidate_tower_pb2.CorpusEvent) -> None:
        for queue in self.watchers:
            queue.put_nowait(event)

    def upsert(self, posts, authors, emb, attrs=None) -> int:
        attrs = attrs or [{} for _ in posts]
        for p, a, e, at in zip(posts, authors, emb, attrs, strict=True):
            self.items[int(p)] = (int(a), np.asarray(e, np.float32), at)
        self.version += 1
        delta = candidate_tower_pb2.CorpusDelta(
            version=self.version, fingerprint=self.fingerprint,
            upsert_post_ids=codec.encode(np.asarray(posts, np.int64)),
            upsert_author_ids=codec.encode(np.asarray(authors, np.int64)),
            upsert_embeddings=codec.encode(np.asarray(emb, np.float32)),
            upsert_attributes=[candidate_tower_pb2.ItemAttributes(attributes=a) for a in attrs],
        )  # fmt: skip
        self.deltas.append(delta)
        self.publish(candidate_tower_pb2.CorpusEvent(delta=delta))
        return self.version

    def delete(self, posts) -> int:
        for p in posts:
            self.items.pop(int(p), None)
        self.version += 1
        delta = candidate_tower_pb2.CorpusDelta(
            version=self.version,
            fingerprint=self.fingerprint,
            deleted_post_ids=codec.encode(np.asarray(posts, np.int64)),
        )
        self.deltas.append(delta)
        self.publish(candidate_tower_pb2.CorpusEvent(delta=delta))
        return self.version

    def reset(self, items: dict, version: int) -> None:
        """Replace the corpus wholesale and push a fresh snapshot to every watcher."""
        self.items, self.version, self.deltas = dict(items), version, []
        for event in self.snapshot():
            self.publish(event)


async def start_stub(servicer, add, port: int = 0):
    """Start a stub server (SERVING); returns (server, port, health)."""
    name = "stub"
    server, bound, health = create_grpc_server(ServerOptions(port=port), [name], lambda s: add(servicer, s))
    await server.start()
    await health.set_serving(True)
    return server, bound, health


async def stop_stub(server, health) -> None:
    await graceful_stop(server, health, 0)


def add_user(servicer, server: grpc.aio.Server) -> None:
    user_tower_pb2_grpc.add_UserTowerServicer_to_server(servicer, server)


def add_candidate(servicer, server: grpc.aio.Server) -> None:
    candidate_tower_pb2_grpc.add_CandidateTowerServicer_to_server(servicer, server)


# ---- harness ----------------------------------------------------------------------------------
D = 8
T = 60  # seconds per test, an upper bound
USER, OTHER_USER = 1, 2


def unit(rng, n):
    x = rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def corpus(rng, n, first_post=1):
    posts = np.arange(first_post, first_post + n)
    emb = unit(rng, n)
    emb[n // 2 : n // 2 + 5] = emb[n // 2]  # 5 identical rows: exact score ties
    return {int(p): (int(p) % 5, emb[i], {"title": f"post {p}"}) for i, p in enumerate(posts)}


def brute(items: dict, query: np.ndarray, k: int, banned=()) -> list[int]:
    posts = np.array([p for p in sorted(items) if p not in set(banned)], np.int64)
    scores = np.stack([items[p][1] for p in posts]).astype(np.float64) @ query
    return posts[np.lexsort((posts, -scores))][:k].tolist()


async def wait_until(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Harness:
    def __init__(self, user, cand, app, channel, cand_port, cand_server, cand_health):
        self.user, self.cand, self.app = user, cand, app
        self.stub = retrieval_gateway_pb2_grpc.RetrievalGatewayStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.cand_port, self.cand_server, self.cand_health = cand_port, cand_server, cand_health

    async def retrieve(self, k, user=USER, history=(), timeout=10.0, **kw):
        ctx = common_pb2.UserContext(
            user_id=user, history=[common_pb2.Engagement(post_id=p) for p in history]
        )
        return await self.stub.Retrieve(
            retrieval_gateway_pb2.RetrieveRequest(user=ctx, k=k, **kw), timeout=timeout
        )

    async def status(self):
        return await self.stub.GetStatus(retrieval_gateway_pb2.GetStatusRequest(), timeout=5)

    async def serving(self) -> bool:
        reply = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def at_version(self, version: int) -> None:
        async def reached():
            return (await self.status()).corpus_version == version

        await wait_until(reached, what=f"corpus version {version}")


@contextlib.asynccontextmanager
async def stack(items=None, wait_ready=True, **overrides):
    rng = np.random.default_rng(0)
    user = StubUser({USER: unit(rng, 1)[0], OTHER_USER: unit(rng, 1)[0]})
    cand = StubCandidate(D)
    cand.items = corpus(rng, 40) if items is None else items
    user_server, user_port, user_health = await start_stub(user, add_user)
    cand_server, cand_port, cand_health = await start_stub(cand, add_candidate)
    options = dict(
        user_service=f"127.0.0.1:{user_port}", candidate_service=f"127.0.0.1:{cand_port}", device="cpu",
        max_wait_ms=2.0, health_poll_s=0.05, reconnect_initial_s=0.02, reconnect_max_s=0.2,
        server=ServerOptions(grace_seconds=0),
    ) | overrides  # fmt: skip
    _server, port, app = create_server(GatewayConfig(**options))
    await app.start()
    h = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            h = Harness(user, cand, app, channel, cand_port, cand_server, cand_health)
            h.user_stub, h.user_port = (user_server, user_health), user_port
            if wait_ready:
                await wait_until(h.serving, what="gateway SERVING")
            yield h
    finally:
        await app.stop(0)
        await stop_stub(*(h.user_stub if h else (user_server, user_health)))
        await stop_stub(h.cand_server if h else cand_server, h.cand_health if h else cand_health)


def run(coro):
    asyncio.run(asyncio.wait_for(coro, T))


def ids(response) -> list[int]:
    return [item.post_id for item in response.items]


def metric(name, labels=None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


# ---- tests ------------------------------------------------------------------------------------
def test_results_equal_brute_force_with_ties_metadata_and_deadline():
    async def main():
        async with stack() as h:
            query, items = h.user.vectors[USER], h.cand.items
            for k in (1, 5, 22, 40):
                res = await h.retrieve(k, timeout=3.0)
                assert ids(res) == brute(items, query, k)
                assert res.corpus_version == 1 and res.model_fingerprint == FP
            res = await h.retrieve(40)
            scores = [it.score for it in res.items]
            assert scores == sorted(scores, reverse=True)
            tied = [p for p in ids(res) if np.array_equal(items[p][1], items[21][1])]
            assert tied == sorted(tied) and len(tied) == 5  # ties by ascending post id
            first = res.items[0]
            assert first.author_id == first.post_id % 5 and dict(first.attributes) == {
                "title": f"post {first.post_id}"
            }
            assert first.score == pytest.approx(float(items[first.post_id][1] @ query), abs=1e-5)
            # the caller's deadline reached user_service (3 s less the time spent; grpc rounds up a little)
            assert all(t is not None and 0 < t < 3.5 for t in h.user.time_remaining[:4])
            status = await h.status()
            assert status.ready and status.corpus_size == 40 and status.device == "cpu"
            assert status.candidate_service_connected and status.dtype == common_pb2.DTYPE_FLOAT32

    run(main())


def test_concurrent_requests_share_one_user_call_and_a_bad_user_fails_alone():
    async def main():
        async with stack(max_user_calls_in_flight=1) as h:
            items = h.cand.items
            h.user.gate = asyncio.Event()
            h.user.users_per_call.clear()
            first = asyncio.ensure_future(h.retrieve(3))  # holds the user-encode stage at the gate
            await wait_until(lambda: _true(len(h.user.users_per_call) == 1), what="first call")
            h.user.bad_user_ids = {666}
            h.user.vectors[666] = h.user.vectors[USER]
            queued = [asyncio.ensure_future(h.retrieve(3, user=u)) for u in (USER, 666, OTHER_USER, USER)]
            queue = h.app.gateway.user_batcher  # all four wait behind the first call
            await wait_until(lambda: _true(queue.queued == 4), what="four queued requests")
            h.user.gate.set()
            results = await asyncio.gather(first, *queued, return_exceptions=True)
            # the four queued requests went to user_service as one call (then alone, after the failure)
            assert h.user.users_per_call[:2] == [1, 4], h.user.users_per_call
            assert sorted(h.user.users_per_call[2:]) == [1, 1, 1, 1]
            for user, res in zip((USER, USER, 666, OTHER_USER, USER), results, strict=True):
                if user == 666:
                    assert isinstance(res, grpc.aio.AioRpcError)
                    assert res.code() == grpc.StatusCode.INVALID_ARGUMENT
                else:
                    assert ids(res) == brute(items, h.user.vectors[user], 3)

    run(main())


async def _true(value: bool) -> bool:
    return value


def test_exclusions_and_deltas():
    async def main():
        async with stack() as h:
            query, items = h.user.vectors[USER], h.cand.items
            top = brute(items, query, 10)
            res = await h.retrieve(
                10, history=[top[0], 999_999], exclude_history=True,
                exclude_post_ids=[top[1], 123_456_789, -3], exclude_author_ids=[items[top[2]][0], 777],
            )  # fmt: skip
            banned = {top[0], top[1], *[p for p in items if items[p][0] == items[top[2]][0]]}
            assert ids(res) == brute(items, query, 10, banned)
            # history is not excluded unless asked
            assert ids(await h.retrieve(3, history=[top[0]])) == top[:3]
            # a delete disappears, an upsert shows up (with its metadata), both within bounded time
            await h.at_version(h.cand.delete([top[0], 424242]))
            assert top[0] not in ids(await h.retrieve(40))
            version = h.cand.upsert([5000], [9], [query], [{"title": "new"}])
            await h.at_version(version)
            res = await h.retrieve(2)
            assert res.items[0].post_id == 5000 and dict(res.items[0].attributes) == {"title": "new"}
            assert res.corpus_version == version and ids(res)[1] == top[1]

    run(main())


def test_bad_input_and_corpus_smaller_than_k():
    async def main():
        async with stack(max_k=100, max_exclusions=5) as h:
            cases = {
                "k must be in [1, 100]": dict(k=0),
                "k must be in [1, 100], got 101": dict(k=101),
                "exclude_post_ids has 6 ids": dict(k=1, exclude_post_ids=list(range(1, 7))),
                "exclude_author_ids has 6 ids": dict(k=1, exclude_author_ids=list(range(1, 7))),
            }
            for message, kw in cases.items():
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await h.retrieve(**kw)
                assert (
                    info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()
                )
            bad_users = {
                "user is required": retrieval_gateway_pb2.RetrieveRequest(k=1),
                "user_id must be > 0": retrieval_gateway_pb2.RetrieveRequest(
                    user=common_pb2.UserContext(), k=1),
                "post_id must be >= 1": retrieval_gateway_pb2.RetrieveRequest(
                    user=common_pb2.UserContext(user_id=1, history=[common_pb2.Engagement(post_id=0)]), k=1),
                "unknown action": retrieval_gateway_pb2.RetrieveRequest(
                    user=common_pb2.UserContext(user_id=1, history=[
                        common_pb2.Engagement(post_id=3, action_names=["teleport"])]), k=1),
                "goes back in time": retrieval_gateway_pb2.RetrieveRequest(
                    user=common_pb2.UserContext(user_id=1, history=[
                        common_pb2.Engagement(post_id=3, timestamp_ms=5),
                        common_pb2.Engagement(post_id=4, timestamp_ms=2)]), k=1),
            }  # fmt: skip
            for message, request in bad_users.items():
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await h.stub.Retrieve(request, timeout=5)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
                assert message in info.value.details()
            assert len(h.user.time_remaining) == 0  # bad input never reached user_service
            res = await h.retrieve(100)  # corpus of 40 < k: all of it
            assert ids(res) == brute(h.cand.items, h.user.vectors[USER], 40)

    run(main())


def test_empty_corpus_is_unavailable_until_items_arrive():
    async def main():
        async with stack(items={}) as h:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await h.retrieve(5)
            assert (
                info.value.code() == grpc.StatusCode.UNAVAILABLE and "corpus is empty" in info.value.details()
            )
            await h.at_version(h.cand.upsert([7], [1], [h.user.vectors[USER]]))
            assert ids(await h.retrieve(5)) == [7]

    run(main())


def test_not_serving_and_unavailable_while_user_service_is_away():
    async def no_user_service():
        async with stack(wait_ready=False, user_service="127.0.0.1:1") as h:
            await h.at_version(1)  # the corpus is in ...
            await asyncio.sleep(0.2)
            assert not await h.serving()  # ... but user_service never answered
            assert not (await h.status()).ready
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await h.retrieve(3)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "user_service at 127.0.0.1:1 is unavailable" in info.value.details()

    run(no_user_service())


def test_user_service_restart_unavailable_meanwhile_then_answers_again():
    async def main():
        async with stack() as h:
            expected = ids(await h.retrieve(5))
            await stop_stub(*h.user_stub)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await h.retrieve(5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "user_service" in info.value.details()

            async def not_serving():
                return not await h.serving()

            await wait_until(not_serving, what="NOT_SERVING while user_service is away")
            server, _, health = await start_stub(h.user, add_user, port=h.user_port)
            h.user_stub = (server, health)
            await wait_until(h.serving, what="SERVING again")
            assert ids(await h.retrieve(5)) == expected

    run(main())


def test_fingerprint_mismatch_is_failed_precondition():
    async def main():
        async with stack() as h:
            before = metric("twotower_gateway_fingerprint_mismatch_total")
            h.user.fingerprint, h.user.honour_asked = "b2" * 8, False
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await h.retrieve(3)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "b2b2" in info.value.details() and FP in info.value.details()
            assert metric("twotower_gateway_fingerprint_mismatch_total") == before + 1

    run(main())


def test_snapshot_swaps_under_concurrent_load_fail_nothing_and_never_mix_versions():
    # Version v holds posts v*1000 + [1, 40]: a hit outside its response's range would be a mix.
    async def main():
        rng = np.random.default_rng(1)
        async with stack(items=corpus(rng, 40, first_post=1001)) as h:
            failures, responses, stop = [], [], asyncio.Event()

            async def client(user):
                while not stop.is_set():
                    try:
                        res = await h.retrieve(10, user=user)
                    except grpc.aio.AioRpcError as exc:
                        failures.append(exc.code())
                        continue
                    responses.append((res.corpus_version, ids(res)))

            clients = [asyncio.create_task(client(USER if i % 2 else OTHER_USER)) for i in range(8)]
            for v in range(2, 12):
                h.cand.reset(corpus(rng, 40, first_post=v * 1000 + 1), version=v)
                await h.at_version(v)
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*clients)
            assert not failures
            versions = {v for v, _ in responses}
            assert len(versions) >= 3, versions
            for v, got in responses:
                assert len(got) == 10 and all(v * 1000 < p <= v * 1000 + 40 for p in got), (v, got)
            assert metric("twotower_gateway_batch_size_sum") > 0

    run(main())


def test_candidate_service_restart_keeps_serving_and_catches_up():
    async def main():
        async with stack() as h:
            query = h.user.vectors[USER]
            expected = ids(await h.retrieve(5))
            await stop_stub(h.cand_server, h.cand_health)

            async def disconnected():
                return not (await h.status()).candidate_service_connected

            await wait_until(disconnected, what="gateway notices candidate_service is gone")
            for _ in range(5):  # the last good corpus keeps serving
                assert ids(await h.retrieve(5)) == expected
            assert await h.serving()
            # candidate_service comes back (same port) with changes made meanwhile
            version = h.cand.upsert([6000], [1], [query])
            h.cand_server, _, h.cand_health = await start_stub(h.cand, add_candidate, port=h.cand_port)
            await h.at_version(version)
            assert ids(await h.retrieve(1)) == [6000]
            assert h.cand.requests[-1] == (1, FP)  # it asked to continue from its version, not a snapshot

    run(main())


def test_delta_gap_triggers_a_fresh_snapshot():
    async def main():
        async with stack() as h:
            h.cand.version += 1  # a change the gateway never sees: the next delta skips a version
            skipped = h.cand.upsert([7000], [1], [h.user.vectors[USER]])
            await h.at_version(skipped)
            assert ids(await h.retrieve(1)) == [7000]
            assert h.cand.requests[-1] == (0, "")  # reconnected asking for a snapshot

    run(main())


def test_cli_flags_make_the_config_and_bad_values_are_refused(capsys):
    from retrieval_gateway.__main__ import config_from_args, main, parse_args

    argv = "--user-service 127.0.0.1:1 --candidate-service 127.0.0.1:2 --device cpu --dtype bf16 --fused-gemv"
    argv += " --max-k 64 --max-batch-size 8 --max-wait-ms 0.5 --max-queue 9 --port 0 --metrics-port 0"
    args = parse_args(argv.split())
    config = config_from_args(args)
    assert (config.dtype, config.fused_gemv, config.max_k, config.max_batch_size) == ("bf16", True, 64, 8)
    assert (config.max_wait_ms, config.max_queue, config.server.metrics_port) == (0.5, 9, 0)
    with pytest.raises(SystemExit):
        parse_args(["--candidate-service", "127.0.0.1:2"])  # --user-service is required
    assert main(["--user-service", "nohostport", "--candidate-service", "127.0.0.1:2"]) == 2
    assert "user_service must be HOST:PORT" in capsys.readouterr().err
