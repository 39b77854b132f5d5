"""The gateway's request path under a slow or stalled user_service and a failing corpus stream:
several EncodeUsers calls in flight, each bounded by its tightest caller's deadline, and a corpus
follower that survives anything and resyncs. Stub upstreams from test_gateway_stubbed."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from tests.integration.test_gateway_stubbed import (
    OTHER_USER,
    USER,
    _true,
    brute,
    corpus,
    ids,
    metric,
    run,
    stack,
    wait_until,
)
from twotower.v1 import candidate_tower_pb2, common_pb2, retrieval_gateway_pb2

STALLED = 99


def test_a_stalled_user_call_does_not_hold_up_the_next_requests():
    async def main():
        async with stack(max_user_calls_in_flight=2) as h:
            h.user.stalled_user_ids = {STALLED}
            h.user.vectors[STALLED] = h.user.vectors[USER]
            stuck = asyncio.ensure_future(h.retrieve(3, user=STALLED, timeout=20))
            await wait_until(lambda: _true(len(h.user.users_per_call) == 1), what="the stalled call")
            # With one call in flight at a time these would wait behind the stalled one until its
            # deadline; with two they are answered at once.
            for user in (USER, OTHER_USER, USER):
                res = await h.retrieve(3, user=user, timeout=5)
                assert ids(res) == brute(h.cand.items, h.user.vectors[user], 3)
            status = await h.status()
            assert status.user_calls_in_flight == 1  # the stalled one
            assert not stuck.done()
            stuck.cancel()

    run(main())


def test_a_user_call_carries_its_tightest_callers_deadline_and_patient_callers_are_retried():
    async def main():
        async with stack(max_user_calls_in_flight=1) as h:
            h.user.gate = asyncio.Event()
            first = asyncio.ensure_future(h.retrieve(3, user=USER, timeout=20))
            await wait_until(lambda: _true(len(h.user.users_per_call) == 1), what="first call")
            impatient = asyncio.ensure_future(h.retrieve(3, user=OTHER_USER, timeout=3.0))
            patient = asyncio.ensure_future(h.retrieve(3, user=USER, timeout=20))
            await wait_until(lambda: _true(h.app.gateway.user_batcher.queued == 2), what="two queued")
            # call 1 answers at once; call 2 (both users) outlives the impatient caller's deadline;
            # call 3 (the patient caller alone, sent again) answers at once
            h.user.delays = [0.0, 10.0, 0.0]
            h.user.gate.set()
            results = await asyncio.gather(first, impatient, patient, return_exceptions=True)
            assert ids(results[0]) == brute(h.cand.items, h.user.vectors[USER], 3)
            assert isinstance(results[1], grpc.aio.AioRpcError), results[1]
            assert results[1].code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert ids(results[2]) == brute(h.cand.items, h.user.vectors[USER], 3)
            assert h.user.users_per_call == [1, 2, 1], h.user.users_per_call
            shared_call_budget = h.user.time_remaining[1]
            assert shared_call_budget is not None and shared_call_budget < 3.5  # not the patient 20 s

    run(main())


def test_the_follower_survives_an_unexpected_error_and_resyncs():
    async def main():
        async with stack() as h:
            index = h.app.gateway.index
            real_load = index.load_snapshot
            failures = []

            def failing_load(*args, **kwargs):
                if not failures:
                    failures.append(1)
                    raise MemoryError("simulated out-of-memory while loading a snapshot")
                return real_load(*args, **kwargs)

            index.load_snapshot = failing_load
            before = metric("twotower_gateway_follower_errors_total", {"type": "MemoryError"})
            items = corpus(np.random.default_rng(1), 12, first_post=500)
            h.cand.reset(items, version=7)
            await h.at_version(7)  # a follower that died on the MemoryError would never get here
            assert failures == [1]
            res = await h.retrieve(5)
            assert ids(res) == brute(items, h.user.vectors[USER], 5)
            after = metric("twotower_gateway_follower_errors_total", {"type": "MemoryError"})
            assert after == before + 1
            status = await h.status()
            stream = next(t for t in status.background_tasks if t.name == "corpus-stream")
            assert stream.failures == 1 and "MemoryError" in stream.last_error
            assert status.candidate_service_connected

    run(main())


def test_a_shape_whose_product_wraps_around_int64_is_refused_and_the_follower_resyncs():
    async def main():
        async with stack() as h:
            # 3 * 6148914691236517205 = 2**64 + 1: an int64 product wraps to 1, so 4 bytes would
            # "match" a float32 tensor of that shape and the reshape would fail later.
            bad = candidate_tower_pb2.SnapshotChunk(
                version=40, fingerprint=h.cand.fingerprint, chunk_index=0, num_chunks=1, total_items=3,
                post_ids=common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, shape=[3],
                                           data=np.arange(1, 4, dtype="<i8").tobytes()),
                author_ids=common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, shape=[3],
                                             data=np.zeros(3, "<i8").tobytes()),
                embeddings=common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[3, 6148914691236517205],
                                             data=b"\x00" * 4),
                attributes=[candidate_tower_pb2.ItemAttributes() for _ in range(3)],
            )  # fmt: skip
            h.cand.publish(candidate_tower_pb2.CorpusEvent(snapshot_chunk=bad))
            h.cand.reset(corpus(np.random.default_rng(2), 9, first_post=900), version=41)
            await h.at_version(41)  # reached only if the follower survived the bad chunk
            status = await h.status()
            assert status.corpus_size == 9 and status.candidate_service_connected

    run(main())


def test_status_reports_the_supervised_background_tasks():
    async def main():
        async with stack() as h:
            status = await h.status()
            names = {t.name: t for t in status.background_tasks}
            assert {"corpus-follower", "readiness", "corpus-stream"} <= set(names)
            assert names["corpus-follower"].running and names["corpus-follower"].failures == 0

    run(main())


def test_a_history_event_with_too_many_actions_is_refused_before_user_service():
    async def main():
        async with stack() as h:
            h.user.users_per_call.clear()
            event = common_pb2.Engagement(post_id=5, action_ids=[2] * 100_000)
            request = retrieval_gateway_pb2.RetrieveRequest(
                user=common_pb2.UserContext(user_id=USER, history=[event]), k=3
            )
            try:
                await h.stub.Retrieve(request, timeout=5)
                raise AssertionError("accepted")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert (
                    "user.history[0] has 100000 action_names + action_ids; the limit is 64" in exc.details()
                )
            assert h.user.users_per_call == []

    run(main())


def test_the_gateway_sends_user_service_the_parsed_columns_not_the_messages():
    async def main():
        async with stack() as h:
            h.user.columnar.clear()
            res = await h.retrieve(3, history=(4, 5, 6))
            assert ids(res) == brute(h.cand.items, h.user.vectors[USER], 3)
            assert h.user.columnar == [True]

    run(main())


FP_B = "b2" * 8


def test_a_request_in_flight_when_the_corpus_changes_model_starts_over_with_the_new_model():
    async def main():
        async with stack(max_user_calls_in_flight=1) as h:
            fp_a = h.cand.fingerprint
            h.user.held = {fp_a, FP_B}  # user_service holds both models, as during a rollout
            h.user.gate = asyncio.Event()
            h.user.asked.clear()
            before = metric("twotower_gateway_model_switch_retries_total")
            pending = asyncio.ensure_future(h.retrieve(4, timeout=20))
            await wait_until(lambda: _true(len(h.user.asked) == 1), what="the encode call for model A")
            items_b = corpus(np.random.default_rng(3), 15, first_post=300)
            h.cand.fingerprint = FP_B
            h.cand.reset(items_b, version=50)  # the rollout's switch: a snapshot of model B
            await h.at_version(50)
            h.user.gate.set()  # model A's embedding arrives after the switch
            res = await pending
            assert res.model_fingerprint == FP_B and res.corpus_version == 50
            assert ids(res) == brute(items_b, h.user.vectors[USER], 4)
            assert h.user.asked == [fp_a, FP_B]
            assert metric("twotower_gateway_model_switch_retries_total") == before + 1
            # and a model user_service does not hold is FAILED_PRECONDITION, not a mixed answer
            h.user.held = {fp_a}
            try:
                await h.retrieve(4, timeout=5)
                raise AssertionError("answered without model B")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION

    run(main())
