"""user_service over real gRPC, in-process on 127.0.0.1 port 0, with a tiny checkpoint.

A `RecordingEncoder` (the real encoder plus a gate) lets tests hold the forward pass deterministically:
coalescing, queue-full and deadline behaviour are checked by what was queued and computed, not timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from shared import codec
from shared.convert import user_batch_to_proto, user_context_from_proto
from shared.model.checkpoint import load_checkpoint
from shared.model.features import featurize_users
from shared.server.bootstrap import ServerOptions
from twotower.v1 import common_pb2, user_tower_pb2, user_tower_pb2_grpc
from user_service.config import UserServiceConfig
from user_service.encoder import TORCH_DTYPES, UserEncoder
from user_service.server import create_server

T = 60  # seconds per test, as an upper bound


class RecordingEncoder(UserEncoder):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[list[int]] = []

    def encode(self, contexts):
        self.batches.append([c.user_id for c in contexts])
        assert self.gate.wait(10), "test gate never opened"
        return super().encode(contexts)


def _factory(holder: list):
    def load(config: UserServiceConfig) -> RecordingEncoder:
        loaded = load_checkpoint(config.checkpoint)
        encoder = RecordingEncoder(loaded.model, loaded.fingerprint, torch.device("cpu"),
                                   TORCH_DTYPES[config.dtype], config.max_history_events)  # fmt: skip
        holder.append(encoder)
        return encoder

    return load


@contextlib.asynccontextmanager
async def serving(checkpoint, **overrides):
    """A ready server; yields (app, stub, encoder) with the warm-up's batches already forgotten."""
    options = dict(checkpoint=checkpoint, max_wait_ms=0.0, server=ServerOptions(grace_seconds=0)) | overrides
    holder: list[RecordingEncoder] = []
    _server, port, app = create_server(UserServiceConfig(**options), _factory(holder))
    await app.start()
    try:
        await app.load()
        holder[0].batches.clear()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield app, user_tower_pb2_grpc.UserTowerStub(channel), holder[0]
    finally:
        for encoder in holder:
            encoder.gate.set()
        await app.stop(0)


def _user(uid: int, n: int = 3, **event) -> common_pb2.UserContext:
    msg = common_pb2.UserContext(user_id=uid)
    for i in range(n):
        msg.history.add(post_id=uid * 100 + i + 1, author_id=i, action_names=["favorite"],
                        action_ids=[i % 19], product_surface=i % 16, **event)  # fmt: skip
    return msg


def _request(*users) -> user_tower_pb2.EncodeUsersRequest:
    return user_tower_pb2.EncodeUsersRequest(users=list(users))


def _batch(*users: common_pb2.UserContext) -> user_tower_pb2.UserBatch:
    return user_batch_to_proto([user_context_from_proto(u, 19) for u in users])


def _batch_request(*users: common_pb2.UserContext, **columns) -> user_tower_pb2.EncodeUsersRequest:
    """A columnar request, with some columns replaced (to break it)."""
    batch = _batch(*users)
    for name, values in columns.items():
        getattr(batch, name).CopyFrom(codec.encode(np.asarray(values, np.int64)))
    return user_tower_pb2.EncodeUsersRequest(batch=batch)


def _reference(model, *users) -> torch.Tensor:
    contexts = [user_context_from_proto(u, model.config.num_actions) for u in users]
    with torch.inference_mode():
        return model.encode_users(featurize_users(contexts, model.config))


def _rows(response) -> torch.Tensor:
    return codec.decode_torch(response.embeddings, "embeddings")


async def _until(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached in time")


def test_served_embeddings_equal_the_in_process_model(tiny_checkpoint, tiny_model):
    async def main():
        async with serving(tiny_checkpoint) as (_app, stub, _encoder):
            single = await stub.EncodeUsers(_request(_user(7)), timeout=10)
            users = [_user(7), _user(8, n=0), _user(9, n=5)]
            batched = await stub.EncodeUsers(_request(*users), timeout=10)
        fingerprint = load_checkpoint(tiny_checkpoint).fingerprint
        for response, sent in ((single, [_user(7)]), (batched, users)):
            assert response.model.fingerprint == fingerprint
            assert response.model.embedding_dim == tiny_model.config.emb_dim
            assert response.embeddings.dtype == common_pb2.DTYPE_FLOAT32
            assert list(response.embeddings.shape) == [len(sent), tiny_model.config.emb_dim]
            torch.testing.assert_close(_rows(response), _reference(tiny_model, *sent), atol=1e-5, rtol=1e-5)

    asyncio.run(asyncio.wait_for(main(), T))


def test_a_columnar_batch_encodes_exactly_like_the_same_users_as_messages(tiny_checkpoint, tiny_model):
    users = [
        _user(7),
        _user(8, n=0),
        _user(9, n=5),
        common_pb2.UserContext(
            user_id=4,
            history=[
                common_pb2.Engagement(
                    post_id=3, action_names=["favorite", "reply", "report"], action_ids=[18]
                )
            ],
        ),
    ]

    async def main():
        async with serving(tiny_checkpoint) as (_app, stub, _encoder):
            as_messages = await stub.EncodeUsers(_request(*users), timeout=10)
            as_columns = await stub.EncodeUsers(_batch_request(*users), timeout=10)
        return as_messages, as_columns

    as_messages, as_columns = asyncio.run(asyncio.wait_for(main(), T))
    torch.testing.assert_close(_rows(as_columns), _rows(as_messages), atol=0, rtol=0)
    torch.testing.assert_close(_rows(as_columns), _reference(tiny_model, *users), atol=1e-5, rtol=1e-5)


def test_history_longer_than_s_is_truncated_to_the_last_s(tiny_checkpoint, tiny_model):
    s = tiny_model.config.history_len

    async def main():
        async with serving(tiny_checkpoint) as (_app, stub, _encoder):
            long = _user(5, n=s + 7)
            tail = common_pb2.UserContext(user_id=5, history=long.history[-s:])
            got = await stub.EncodeUsers(_request(long, tail), timeout=10)
        rows = _rows(got)
        torch.testing.assert_close(rows[0], rows[1], atol=1e-6, rtol=1e-6)

    asyncio.run(asyncio.wait_for(main(), T))


def test_bf16_server_answers_bfloat16_close_to_fp32(tiny_checkpoint, tiny_model):
    async def main():
        async with serving(tiny_checkpoint, dtype="bf16") as (_app, stub, _encoder):
            return await stub.EncodeUsers(_request(_user(3), _user(4)), timeout=10)

    response = asyncio.run(asyncio.wait_for(main(), T))
    assert response.embeddings.dtype == common_pb2.DTYPE_BFLOAT16
    got = codec.decode_numpy(response.embeddings, "embeddings")
    want = _reference(tiny_model, _user(3), _user(4)).numpy()
    assert abs(got - want).max() < 3e-2


def test_concurrent_calls_are_coalesced_and_each_caller_gets_its_row(tiny_checkpoint, tiny_model):
    before = REGISTRY.get_sample_value("twotower_user_batch_size_count") or 0.0

    async def main():
        async with serving(tiny_checkpoint) as (app, stub, encoder):
            encoder.gate.clear()
            first = asyncio.ensure_future(stub.EncodeUsers(_request(_user(1)), timeout=20))
            await _until(lambda: encoder.batches == [[1]])  # the worker holds user 1 at the gate
            uids = (2, 3, 4, 5, 6, 7)
            calls = [asyncio.ensure_future(stub.EncodeUsers(_request(_user(u)), timeout=20)) for u in uids]
            await _until(lambda: app.service.queued == len(uids))
            encoder.gate.set()
            responses = await asyncio.gather(first, *calls)
            return responses, list(encoder.batches), app.service.stats.sizes

    responses, batches, sizes = asyncio.run(asyncio.wait_for(main(), T))
    # one forward pass for six calls (concurrent calls may reach the server in any order)
    assert [sorted(b) for b in batches] == [[1], [2, 3, 4, 5, 6, 7]] and sizes[-2:] == [1, 6]
    for uid, response in zip((1, 2, 3, 4, 5, 6, 7), responses, strict=True):
        torch.testing.assert_close(_rows(response), _reference(tiny_model, _user(uid)), atol=1e-5, rtol=1e-5)
    after = REGISTRY.get_sample_value("twotower_user_batch_size_count")
    assert after - before == 2 and REGISTRY.get_sample_value("twotower_user_compute_seconds_count") > 0


def test_a_bad_call_fails_alone_and_never_reaches_the_batch(tiny_checkpoint, tiny_model):
    async def main():
        async with serving(tiny_checkpoint) as (app, stub, encoder):
            encoder.gate.clear()
            first = asyncio.ensure_future(stub.EncodeUsers(_request(_user(1)), timeout=20))
            await _until(lambda: encoder.batches == [[1]])
            good = [asyncio.ensure_future(stub.EncodeUsers(_request(_user(u)), timeout=20)) for u in (2, 3)]
            await _until(lambda: app.service.queued == 2)
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.EncodeUsers(_request(_user(4), _user(0)), timeout=20)
            encoder.gate.set()
            responses = await asyncio.gather(first, *good)
            return bad.value, responses, list(encoder.batches)

    bad, responses, batches = asyncio.run(asyncio.wait_for(main(), T))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "users[1].user_id" in bad.details()
    assert [sorted(b) for b in batches] == [[1], [2, 3]]  # user 4 of the bad call was never queued
    for uid, response in zip((1, 2, 3), responses, strict=True):
        torch.testing.assert_close(_rows(response), _reference(tiny_model, _user(uid)), atol=1e-5, rtol=1e-5)


def _engagement(**fields) -> common_pb2.UserContext:
    return common_pb2.UserContext(user_id=1, history=[common_pb2.Engagement(post_id=1, **fields)])


def _timed(*timestamps_ms: int) -> common_pb2.UserContext:
    events = [common_pb2.Engagement(post_id=i + 1, timestamp_ms=t) for i, t in enumerate(timestamps_ms)]
    return common_pb2.UserContext(user_id=1, history=events)


BAD_INPUTS = {
    "empty request": (_request(), "users is empty"),
    "too many users": (_request(*[_user(u) for u in range(1, 6)]), "5 users in one call; the limit is 4"),
    "zero user id": (_request(_user(0)), "users[0].user_id must be > 0, got 0"),
    "negative user id": (_request(_user(-3)), "users[0].user_id must be > 0, got -3"),
    "unknown action name": (_request(_engagement(action_names=["like"])), "unknown action 'like'"),
    "action id too big": (_request(_engagement(action_ids=[19])), "19 out of range [0, 19)"),
    "negative action id": (_request(_engagement(action_ids=[-1])), "-1 out of range [0, 19)"),
    "surface too big": (_request(_engagement(product_surface=16)), "product_surface 16 out of range [0, 16)"),
    "negative surface": (_request(_engagement(product_surface=-1)), "product_surface -1 out of range"),
    "zero post id": (_request(common_pb2.UserContext(user_id=1, history=[common_pb2.Engagement()])),
                     "history[0].post_id must be >= 1, got 0"),
    "negative author id": (_request(_engagement(author_id=-2)), "history[0].author_id must be >= 0"),
    "absurd history": (_request(_user(2, n=51)), "users[0].history has 51 events; the limit is 50"),
    "time going backwards": (
        _request(_timed(2000, 1000)),
        "history[1].timestamp_ms goes back in time"),
    "unknown user features": (_request(common_pb2.UserContext(user_id=1, user_features=[3])),
                              "user_features has 1 values; the model takes at most 0"),
    "second user bad": (_request(_user(1), _engagement(action_names=["nope"])),
                        "users[1].history[0].action_names: unknown action 'nope'"),
    "millions of actions": (_request(_engagement(action_ids=[3] * 2_000_000)),
                            "history[0] has 2000000 action_names + action_ids; the limit is 64"),
    "users and batch": (user_tower_pb2.EncodeUsersRequest(users=[_user(1)], batch=_batch(_user(2))),
                        "either users or batch"),
    "batch action bits": (_batch_request(_user(3), action_bits=[1 << 19, 1, 1]),
                          "batch.action_bits[0] has bits outside the 19 actions"),
    "batch lengths": (_batch_request(_user(3), history_lengths=[4]), "batch.post_ids"),
    "batch history": (_batch_request(_user(3), history_lengths=[51]),
                      "batch.history_lengths[0] = 51; must be in [0, 50]"),
    "batch surface": (_batch_request(_user(3), product_surfaces=[0, 16, 0]),
                      "users[0].history[1].product_surface 16 out of range"),
    "batch feature counts wrap": (_batch_request(_user(3), _user(4), user_feature_counts=[2**62, -(2**62)]),
                                  "batch.user_feature_counts[0] = 4611686018427387904; must be in [0, 0]"),
    "batch too many users": (_batch_request(*[_user(u) for u in range(1, 6)]),
                             "5 users in one call; the limit is 4"),
}  # fmt: skip


def test_every_bad_input_is_invalid_argument_with_a_clear_message(tiny_checkpoint):
    async def main():
        async with serving(tiny_checkpoint, max_users_per_call=4, max_history_events=50) as (_a, stub, enc):
            outcomes = {}
            for name, (request, _message) in BAD_INPUTS.items():
                try:
                    await stub.EncodeUsers(request, timeout=10)
                    outcomes[name] = None
                except grpc.aio.AioRpcError as exc:
                    outcomes[name] = (exc.code(), exc.details())
            ok = await stub.EncodeUsers(_request(_user(2, n=50)), timeout=10)  # at the limit: fine
            return outcomes, list(enc.batches), ok

    outcomes, batches, ok = asyncio.run(asyncio.wait_for(main(), T))
    for name, (_request_msg, message) in BAD_INPUTS.items():
        assert outcomes[name] is not None, f"{name}: accepted"
        code, details = outcomes[name]
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {code} {details}"
        assert message in details, f"{name}: {details!r}"
    assert batches == [[2]] and list(ok.embeddings.shape) == [1, 16]  # no bad call cost a forward pass


def test_full_queue_is_resource_exhausted_at_once(tiny_checkpoint):
    async def main():
        async with serving(tiny_checkpoint, max_batch_size=1, max_queue=2, max_users_per_call=2) as (
            app, stub, encoder,
        ):  # fmt: skip
            encoder.gate.clear()
            held = asyncio.ensure_future(stub.EncodeUsers(_request(_user(1)), timeout=20))
            await _until(lambda: encoder.batches == [[1]])
            queued = [asyncio.ensure_future(stub.EncodeUsers(_request(_user(u)), timeout=20)) for u in (2, 3)]
            await _until(lambda: app.service.queued == 2)
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await stub.EncodeUsers(_request(_user(4)), timeout=20)
            encoder.gate.set()
            await asyncio.gather(held, *queued)
            return full.value, list(encoder.batches)

    full, batches = asyncio.run(asyncio.wait_for(main(), T))
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in full.details()
    assert batches[0] == [1] and sorted(batches[1:]) == [[2], [3]]  # queued calls arrive in any order


def test_a_request_whose_deadline_passed_is_not_computed(tiny_checkpoint):
    async def main():
        async with serving(tiny_checkpoint, max_batch_size=1) as (_app, stub, encoder):
            encoder.gate.clear()
            held = asyncio.ensure_future(stub.EncodeUsers(_request(_user(1)), timeout=20))
            await _until(lambda: encoder.batches == [[1]])
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await stub.EncodeUsers(_request(_user(2), _user(3)), timeout=0.3)
            encoder.gate.set()
            await held
            await stub.EncodeUsers(_request(_user(4)), timeout=20)
            return late.value, list(encoder.batches)

    late, batches = asyncio.run(asyncio.wait_for(main(), T))
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert batches == [[1], [4]]  # users 2 and 3 never cost a forward pass


def test_not_serving_and_unavailable_until_loaded_and_warmed_up(tiny_checkpoint):
    release = threading.Event()
    holder: list[RecordingEncoder] = []

    def slow_load(config):
        assert release.wait(20), "test never released the load"
        return _factory(holder)(config)

    async def main():
        config = UserServiceConfig(checkpoint=tiny_checkpoint, server=ServerOptions(grace_seconds=0))
        _server, port, app = create_server(config, slow_load)
        await app.start()
        loading = asyncio.ensure_future(app.load())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                stub = user_tower_pb2_grpc.UserTowerStub(channel)
                statuses = []
                for service in ("", "twotower.v1.UserTower"):
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                    statuses.append(reply.status)
                with pytest.raises(grpc.aio.AioRpcError) as early:
                    await stub.EncodeUsers(_request(_user(1)), timeout=5)
                release.set()
                await loading
                ready = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                assert (await stub.EncodeUsers(_request(_user(1)), timeout=5)).model.fingerprint
                return statuses, early.value, ready.status, holder[0].batches
        finally:
            release.set()
            await app.stop(0)

    statuses, early, ready, batches = asyncio.run(asyncio.wait_for(main(), T))
    assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2
    assert early.code() == grpc.StatusCode.UNAVAILABLE and "loading" in early.details()
    assert ready == health_pb2.HealthCheckResponse.SERVING
    assert [len(b) for b in batches[:2]] == [1, 64]  # warm-up ran before SERVING


def test_graceful_stop_lets_an_in_flight_call_finish(tiny_checkpoint, tiny_model):
    async def main():
        async with serving(tiny_checkpoint) as (app, stub, encoder):
            encoder.gate.clear()
            call = asyncio.ensure_future(stub.EncodeUsers(_request(_user(1)), timeout=20))
            await _until(lambda: encoder.batches == [[1]])
            stopping = asyncio.ensure_future(app.stop(10))
            await _until(lambda: not app.health.serving)
            encoder.gate.set()
            response = await call
            await stopping
            return response

    response = asyncio.run(asyncio.wait_for(main(), T))
    torch.testing.assert_close(_rows(response), _reference(tiny_model, _user(1)), atol=1e-5, rtol=1e-5)
