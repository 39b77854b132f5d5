"""user_service model control (rollouts): two models held at once, requests name the model they need,
the default and the loaded set survive a restart through the state file, failures change nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json

import grpc
import pytest
import torch

from shared import codec
from shared.errors import CheckpointError
from shared.model.checkpoint import random_model, save_checkpoint
from shared.model.config import TowerConfig
from shared.server.bootstrap import ServerOptions
from tests.conftest import TINY
from twotower.v1 import common_pb2, user_tower_pb2, user_tower_pb2_grpc
from user_service.config import UserServiceConfig
from user_service.server import create_server, default_encoder_factory

T = 60


@pytest.fixture
def two_checkpoints(tmp_path):
    paths = []
    for seed in (1, 2):
        path = tmp_path / f"model-{seed}"
        save_checkpoint(random_model(TowerConfig(**TINY), seed=seed), path)
        paths.append(path)
    return paths


@contextlib.asynccontextmanager
async def serving(checkpoint, **overrides):
    options = dict(checkpoint=checkpoint, server=ServerOptions(grace_seconds=0)) | overrides
    _server, port, app = create_server(UserServiceConfig(**options))
    await app.start()
    try:
        await app.load()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield user_tower_pb2_grpc.UserTowerStub(channel)
    finally:
        await app.stop(0)


def _request(fingerprint: str = "") -> user_tower_pb2.EncodeUsersRequest:
    user = common_pb2.UserContext(user_id=3, history=[common_pb2.Engagement(post_id=9, action_ids=[0])])
    return user_tower_pb2.EncodeUsersRequest(users=[user], model_fingerprint=fingerprint)


async def _encode(stub, fingerprint: str = "") -> tuple[str, torch.Tensor]:
    response = await stub.EncodeUsers(_request(fingerprint), timeout=10)
    return response.model.fingerprint, codec.decode_torch(response.embeddings)


async def _code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _fingerprint(path) -> str:
    return json.loads((path / "config.json").read_text())["fingerprint"]


def test_two_models_are_served_side_by_side_and_the_rollout_survives_a_restart(two_checkpoints, tmp_path):
    a, b = two_checkpoints
    fa, fb = _fingerprint(a), _fingerprint(b)
    state = tmp_path / "state" / "user_models.json"

    async def rollout():
        async with serving(a, state_file=state) as stub:
            assert (await _encode(stub))[0] == fa
            status = await stub.LoadModel(user_tower_pb2.LoadModelRequest(checkpoint=str(b)), timeout=30)
            assert [m.fingerprint for m in status.models] == [fa, fb] and status.default_fingerprint == fa
            got_a, got_b, got_default = await asyncio.gather(
                _encode(stub, fa), _encode(stub, fb), _encode(stub)
            )
            assert (got_a[0], got_b[0], got_default[0]) == (fa, fb, fa)
            assert not torch.allclose(got_a[1], got_b[1])  # really two models
            unknown = await _code(stub.EncodeUsers(_request("ff" * 8), timeout=5))
            assert unknown == grpc.StatusCode.FAILED_PRECONDITION
            # the default cannot go; after the switch the old one can
            busy = await _code(stub.UnloadModel(user_tower_pb2.ModelRef(fingerprint=fa), timeout=5))
            assert busy == grpc.StatusCode.FAILED_PRECONDITION
            await stub.SetDefaultModel(user_tower_pb2.ModelRef(fingerprint=fb), timeout=5)
            status = await stub.UnloadModel(user_tower_pb2.ModelRef(fingerprint=fa), timeout=5)
            assert [m.fingerprint for m in status.models] == [fb]
            gone = await _code(stub.EncodeUsers(_request(fa), timeout=5))
            assert gone == grpc.StatusCode.FAILED_PRECONDITION
            return got_b[1]

    async def restart(checkpoint):
        async with serving(checkpoint, state_file=state) as stub:
            fingerprint, embedding = await _encode(stub)
            status = await stub.GetModels(user_tower_pb2.GetModelsRequest(), timeout=5)
            return fingerprint, embedding, [m.fingerprint for m in status.models]

    embedding_b = asyncio.run(asyncio.wait_for(rollout(), T))
    # restarted with the same flags: back on B (the record), not on --checkpoint A
    fingerprint, embedding, held = asyncio.run(asyncio.wait_for(restart(a), T))
    assert fingerprint == fb and held == [fb]
    torch.testing.assert_close(embedding, embedding_b)
    # a new --checkpoint is a new instruction from the operator: it replaces the record
    fingerprint, _, held = asyncio.run(asyncio.wait_for(restart(b), T))
    assert fingerprint == fb and held == [fb]
    assert json.loads(state.read_text())["started_with"] == str(b)


def test_model_control_failures_change_nothing(two_checkpoints, tmp_path):
    a, b = two_checkpoints
    wide = tmp_path / "wide"
    save_checkpoint(random_model(TowerConfig(**(TINY | {"emb_dim": 32})), seed=3), wide)
    state = tmp_path / "user_models.json"

    async def main():
        async with serving(a, state_file=state) as stub:
            before = state.read_text()
            for checkpoint in (tmp_path / "missing", wide):
                request = user_tower_pb2.LoadModelRequest(checkpoint=str(checkpoint))
                assert await _code(stub.LoadModel(request, timeout=30)) == grpc.StatusCode.FAILED_PRECONDITION
            assert await _code(stub.LoadModel(user_tower_pb2.LoadModelRequest(), timeout=5)) == (
                grpc.StatusCode.INVALID_ARGUMENT
            )
            status = await stub.GetModels(user_tower_pb2.GetModelsRequest(), timeout=5)
            assert [m.fingerprint for m in status.models] == [_fingerprint(a)]
            assert state.read_text() == before
        async with serving(a) as stub:  # no --state-file: model control is refused, serving is not
            request = user_tower_pb2.LoadModelRequest(checkpoint=str(b))
            assert await _code(stub.LoadModel(request, timeout=30)) == grpc.StatusCode.FAILED_PRECONDITION
            assert (await _encode(stub))[0] == _fingerprint(a)

    asyncio.run(asyncio.wait_for(main(), T))


def test_a_failed_state_write_fails_the_call_and_keeps_the_old_state(two_checkpoints, tmp_path, monkeypatch):
    a, b = two_checkpoints
    state = tmp_path / "user_models.json"

    async def main():
        async with serving(a, state_file=state) as stub:
            before = state.read_text()

            def disk_full(*_args, **_kwargs):
                raise OSError(28, "No space left on device")

            monkeypatch.setattr("user_service.models.atomic_write_text", disk_full)
            request = user_tower_pb2.LoadModelRequest(checkpoint=str(b))
            assert await _code(stub.LoadModel(request, timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            status = await stub.GetModels(user_tower_pb2.GetModelsRequest(), timeout=5)
            assert [m.fingerprint for m in status.models] == [_fingerprint(a)]
            assert state.read_text() == before
            monkeypatch.undo()  # space is back: the same call now works
            status = await stub.LoadModel(request, timeout=30)
            assert len(status.models) == 2

    asyncio.run(asyncio.wait_for(main(), T))


def test_an_unreadable_state_file_stops_the_start_with_a_clear_message(tiny_checkpoint, tmp_path):
    state = tmp_path / "user_models.json"
    state.write_text("{not json")

    async def main():
        _server, _port, app = create_server(UserServiceConfig(checkpoint=tiny_checkpoint, state_file=state))
        await app.start()
        try:
            await app.load()
        finally:
            await app.stop(0)

    with pytest.raises(CheckpointError, match=r"state file .* is unreadable"):
        asyncio.run(asyncio.wait_for(main(), T))
    assert state.read_text() == "{not json"  # never replaced


def test_a_model_past_the_limit_is_refused_before_loading_and_a_held_one_is_not_reloaded(
    two_checkpoints, tmp_path
):
    a, b = two_checkpoints
    loads: list[str] = []

    def counting_loader(config: UserServiceConfig):
        loads.append(str(config.checkpoint))
        return default_encoder_factory(config)

    async def main():
        config = UserServiceConfig(checkpoint=a, state_file=tmp_path / "s.json", max_models=1,
                                   server=ServerOptions(grace_seconds=0))  # fmt: skip
        _server, port, app = create_server(config, counting_loader)
        await app.start()
        try:
            await app.load()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = user_tower_pb2_grpc.UserTowerStub(channel)
                again = await stub.LoadModel(user_tower_pb2.LoadModelRequest(checkpoint=str(a)), timeout=30)
                assert again.loaded.fingerprint == _fingerprint(a)
                full = await _code(
                    stub.LoadModel(user_tower_pb2.LoadModelRequest(checkpoint=str(b)), timeout=30)
                )
                assert full == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            await app.stop(0)

    asyncio.run(asyncio.wait_for(main(), T))
    assert loads == [str(a)]  # the start-up load only: neither call loaded a checkpoint
