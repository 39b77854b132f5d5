"""candidate_service model rollout through a real grpc.aio server on port 0 (in-process): A -> B with
writes while B encodes, watchers switched on their own stream, B recorded durably (a restart serves
it), and every way a rollout can fail leaving A serving with the reason in its status."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
from dataclasses import replace

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from candidate_service.config import CandidateConfig
from candidate_service.corpus import CandidateCore
from candidate_service.embedding_cache import cache_file, read_cache
from candidate_service.encoder import EncodingStopped
from candidate_service.item_store import SqliteItemStore
from candidate_service.server import create_server
from shared import codec
from shared.errors import CheckpointError
from shared.model.checkpoint import load_checkpoint, random_model, save_checkpoint
from shared.model.config import TowerConfig
from shared.model.features import featurize_items
from shared.server.bootstrap import ServerOptions
from tests.candidate_faults import StoreFaults
from tests.conftest import TINY
from twotower.v1 import candidate_tower_pb2 as pb
from twotower.v1 import candidate_tower_pb2_grpc as pb_grpc
from twotower.v1 import common_pb2

N = 300
MAX_MESSAGE = 16 * 1024  # several snapshot chunks per corpus
State = pb.RolloutStatus


@pytest.fixture
def config(tmp_path, tiny_checkpoint):
    items = tmp_path / "items.jsonl"
    rows = [{"post_id": i, "author_id": i % 11, "attributes": {"title": f"t{i}"}} for i in range(1, N + 1)]
    items.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return CandidateConfig(
        checkpoint=tiny_checkpoint, items=items, cache_dir=tmp_path / "cache", max_batch_items=64,
        server=ServerOptions(max_message_bytes=MAX_MESSAGE),
    )  # fmt: skip


@pytest.fixture
def checkpoint_b(tmp_path, tiny_config):
    path = tmp_path / "ckpt-b"
    save_checkpoint(random_model(tiny_config, seed=1), path)
    return path


def with_server(config: CandidateConfig, body, timeout: float = 90, open_store=None):
    async def main():
        _server, port, app = create_server(config, *([open_store] if open_store else []))
        await app.start()
        try:
            await app.load()
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=config.server.channel_options()
            ) as ch:
                await body(app, pb_grpc.CandidateTowerStub(ch))
        finally:
            await app.stop(0)

    asyncio.run(asyncio.wait_for(main(), timeout))


class Gate:
    """Makes the rollout's corpus encode (the call that reports progress) wait until opened, or fail;
    like the real encoder it gives up when asked to stop. Catch-up encodes pass straight through."""

    def __init__(self, core: CandidateCore, fail: BaseException | None = None) -> None:
        self.core, self.fail = core, fail
        self.opened, self.entered = threading.Event(), threading.Event()
        core.rollouts.load_encoder = self.load

    def load(self, checkpoint: str):
        encoder = self.core.load_encoder(checkpoint)
        real = encoder.encode

        def encode(post_ids, author_ids, label="", stop=None, progress=None):
            if progress is not None:
                self.entered.set()
                if self.fail is not None:
                    raise self.fail
                for _ in range(600):  # bounded: 30 s
                    if self.opened.wait(0.05):
                        break
                    if stop is not None and stop.is_set():
                        raise EncodingStopped("stopped at the gate")
            return real(post_ids, author_ids, label=label, stop=stop, progress=progress)

        encoder.encode = encode
        return encoder

    async def wait_entered(self) -> None:
        for _ in range(600):
            if self.entered.is_set():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the rollout never started encoding")


def items(*ids: int, author: int = 1, **attrs: str) -> list:
    return [common_pb2.Item(post_id=i, author_id=author, attributes=attrs) for i in ids]


def encoded_by(checkpoint, post_ids, author_ids) -> np.ndarray:
    loaded = load_checkpoint(checkpoint)
    features = featurize_items(np.asarray(post_ids), np.asarray(author_ids), loaded.config)
    return loaded.model.encode_items(features).detach().numpy()


async def status_until(stub, done, what: str) -> pb.RolloutStatus:
    for _ in range(600):  # bounded: 60 s
        status = await stub.GetRolloutStatus(pb.GetRolloutStatusRequest(), timeout=5)
        if done(status):
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"rollout never {what}: {status}")


async def read_snapshot(stream) -> tuple[list[pb.CorpusDelta], dict, pb.SnapshotChunk]:
    """Deltas until a snapshot starts, then the whole snapshot: {post_id: (author, embedding, attrs)}."""
    deltas, rows, expected = [], {}, 0
    while (event := await asyncio.wait_for(stream.read(), 30)) is not grpc.aio.EOF:
        if event.WhichOneof("event") == "delta":
            assert expected == 0, "a delta inside a snapshot"
            deltas.append(event.delta)
            continue
        chunk = event.snapshot_chunk
        assert chunk.chunk_index == expected and chunk.ByteSize() < MAX_MESSAGE
        emb = codec.decode_numpy(chunk.embeddings)
        post_ids, authors = codec.decode_numpy(chunk.post_ids), codec.decode_numpy(chunk.author_ids)
        for p, a, e, attrs in zip(post_ids, authors, emb, chunk.attributes, strict=True):
            rows[int(p)] = (int(a), e, dict(attrs.attributes))
        expected += 1
        if expected == chunk.num_chunks:
            assert len(rows) == chunk.total_items
            return deltas, rows, chunk
    raise AssertionError("stream ended before a snapshot")


def records(rows: dict) -> dict[int, tuple[int, dict]]:
    return {p: (a, attrs) for p, (a, _e, attrs) in rows.items()}


def metric(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_rollout_carries_every_change_made_while_encoding_and_watchers_switch_on_their_stream(
    config, checkpoint_b
):
    fp_a, fp_b = load_checkpoint(config.checkpoint).fingerprint, load_checkpoint(checkpoint_b).fingerprint
    switched = {}

    async def body(app, stub):
        gate = Gate(app.core)
        watch = stub.WatchCorpus(pb.WatchCorpusRequest())
        _, before, head = await read_snapshot(watch)
        assert head.fingerprint == fp_a and len(before) == N
        expected = records(before)

        started = await stub.StartRollout(pb.StartRolloutRequest(checkpoint=str(checkpoint_b)), timeout=30)
        assert started.state == State.ENCODING and started.target.fingerprint == fp_b
        assert started.active.fingerprint == fp_a and started.target.embedding_dim == 16
        await gate.wait_entered()
        assert metric("candidate_model_info", fingerprint=fp_b, role="rollout_target") == 1
        assert metric("candidate_rollout_state", state="ENCODING") == 1
        with pytest.raises(grpc.aio.AioRpcError) as busy:  # one rollout at a time
            await stub.StartRollout(pb.StartRolloutRequest(checkpoint=str(checkpoint_b)), timeout=30)
        assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "in progress" in busy.value.details()

        # While B encodes, A serves and every write is acknowledged: new items, replaced ones (another
        # author), new attributes only, deletes (one unknown id).
        up1 = await stub.UpsertItems(
            pb.UpsertItemsRequest(items=items(1, 5000, author=7, title="new")), timeout=10
        )
        up2 = await stub.UpsertItems(
            pb.UpsertItemsRequest(items=items(4, author=4 % 11, title="renamed")), timeout=10
        )
        gone = await stub.DeleteItems(pb.DeleteItemsRequest(post_ids=[2, 3, 99999]), timeout=10)
        assert gone.deleted == 2 and list(gone.unknown_post_ids) == [99999]
        assert gone.version == up2.version + 1 == up1.version + 2
        expected.update({1: (7, {"title": "new"}), 5000: (7, {"title": "new"}), 4: (4, {"title": "renamed"})})
        del expected[2], expected[3]
        encoded = await stub.EncodeItems(pb.EncodeItemsRequest(items=items(1)), timeout=10)
        assert encoded.model.fingerprint == fp_a  # A still serves
        status = await stub.GetRolloutStatus(pb.GetRolloutStatusRequest(), timeout=5)
        assert status.state == State.ENCODING and status.items_total >= N

        gate.opened.set()
        done = await status_until(stub, lambda s: s.state != State.ENCODING, "ended")
        assert done.state == State.DONE, done.error
        assert done.active.fingerprint == fp_b and done.switched_at_version == gone.version + 1
        switched["version"] = done.switched_at_version
        assert set(done.step_seconds) == {"load", "encode", "catch_up", "switch"}
        assert done.items_encoded == done.items_total >= N

        # The open stream: A's deltas of those writes, then B's snapshot holding every one of them.
        deltas, after, head = await read_snapshot(watch)
        assert [d.version for d in deltas] == [up1.version, up2.version, gone.version]
        assert all(d.fingerprint == fp_a for d in deltas)
        assert head.fingerprint == fp_b and head.version == done.switched_at_version
        assert records(after) == expected
        ids = sorted(after)
        got = np.stack([after[p][1] for p in ids])
        want = encoded_by(checkpoint_b, ids, [after[p][0] for p in ids])
        assert np.allclose(got, want, atol=1e-6)

        # Then B's deltas, on the same stream.
        later = await stub.UpsertItems(pb.UpsertItemsRequest(items=items(6000, author=3)), timeout=10)
        assert later.version == done.switched_at_version + 1
        event = await asyncio.wait_for(watch.read(), 10)
        assert event.delta.version == later.version and event.delta.fingerprint == fp_b
        emb = codec.decode_numpy(event.delta.upsert_embeddings)
        assert np.allclose(emb, encoded_by(checkpoint_b, [6000], [3]), atol=1e-6)
        watch.cancel()
        info = await stub.GetCorpusInfo(pb.GetCorpusInfoRequest(), timeout=5)
        assert (info.fingerprint, info.num_items, info.version) == (fp_b, len(expected) + 1, later.version)
        encoded = await stub.EncodeItems(pb.EncodeItemsRequest(items=items(1)), timeout=10)
        assert encoded.model.fingerprint == fp_b
        assert metric("candidate_model_info", fingerprint=fp_b, role="active") == 1
        assert metric("candidate_model_info", fingerprint=fp_a, role="active") is None
        assert metric("candidate_rollout_state", state="DONE") == 1

        # A watcher that knew A's corpus gets B's snapshot, not A's deltas.
        resumed = stub.WatchCorpus(pb.WatchCorpusRequest(known_version=gone.version, known_fingerprint=fp_a))
        deltas, rows, head = await read_snapshot(resumed)
        assert deltas == [] and head.fingerprint == fp_b and len(rows) == len(expected) + 1
        resumed.cancel()

        # Rolling out the active model again is done at once (the rollout command run twice).
        again = await stub.StartRollout(pb.StartRolloutRequest(checkpoint=str(checkpoint_b)), timeout=30)
        assert again.state == State.DONE and again.switched_at_version == done.switched_at_version

    with_server(config, body)

    # B's cache file was written after the switch, and a restart with the same flags serves B.
    b_cache = read_cache(cache_file(config.cache_dir, fp_b), fp_b, 16)
    assert b_cache.version == switched["version"] and len(b_cache) == N - 1  # +5000 -2 -3

    async def restarted(app, stub):
        info = await stub.GetCorpusInfo(pb.GetCorpusInfoRequest(), timeout=5)
        assert info.fingerprint == fp_b and info.num_items == N  # +5000 -2 -3 +6000
        status = await stub.GetRolloutStatus(pb.GetRolloutStatusRequest(), timeout=5)
        assert status.state == State.IDLE and status.active.fingerprint == fp_b

    with_server(config, restarted)


def test_rollback_is_a_rollout_of_the_previous_checkpoint(config, checkpoint_b):
    fp_a = load_checkpoint(config.checkpoint).fingerprint

    async def body(app, stub):
        for checkpoint in (checkpoint_b, config.checkpoint):
            await stub.StartRollout(pb.StartRolloutRequest(checkpoint=str(checkpoint)), timeout=30)
            done = await status_until(stub, lambda s: s.state != State.ENCODING, "ended")
            assert done.state == State.DONE, done.error
        info = await stub.GetCorpusInfo(pb.GetCorpusInfoRequest(), timeout=5)
        assert info.fingerprint == fp_a and info.num_items == N

    with_server(config, body)


def other_width_checkpoint(tmp_path):
    path = tmp_path / "ckpt-d8"
    save_checkpoint(random_model(TowerConfig(**{**TINY, "emb_dim": 8}), seed=2), path)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "cannot be loaded"),
        ("other_width", "D=8 embeddings"),
        ("corrupt", "cannot be loaded"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_refused_and_a_serves_on(config, tmp_path, case, message):
    fp_a = load_checkpoint(config.checkpoint).fingerprint
    if case == "missing":
        checkpoint = tmp_path / "nowhere"
    elif case == "other_width":
        checkpoint = other_width_checkpoint(tmp_path)
    else:
        checkpoint = tmp_path / "corrupt"
        shutil.copytree(config.checkpoint, checkpoint)
        (checkpoint / "model.safetensors").write_bytes(b"\0" * 64)

    async def body(app, stub):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.StartRollout(pb.StartRolloutRequest(checkpoint=str(checkpoint)), timeout=30)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert message in info.value.details() and str(checkpoint) in info.value.details()
        status = await stub.GetRolloutStatus(pb.GetRolloutStatusRequest(), timeout=5)
        assert status.state == State.FAILED and message in status.error and status.active.fingerprint == fp_a
        assert (await stub.GetCorpusInfo(pb.GetCorpusInfoRequest(), timeout=5)).fingerprint == fp_a
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await stub.StartRollout(pb.StartRolloutRequest(), timeout=30)
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with_server(config, body)


def test_out_of_memory_while_encoding_fails_the_rollout_and_a_serves_on(config, checkpoint_b):
    fp_a = load_checkpoint(config.checkpoint).fingerprint

    async def body(app, stub):
        Gate(app.core, fail=MemoryError("cannot allocate 2 GiB for the corpus embeddings"))
        watch = stub.WatchCorpus(pb.WatchCorpusRequest())
        await read_snapshot(watch)
        failures = metric("candidate_rollouts_total", outcome="failed") or 0
        await stub.StartRollout(pb.StartRolloutRequest(checkpoint=str(checkpoint_b)), timeout=30)
        status = await status_until(stub, lambda s: s.state != State.ENCODING, "ended")
        assert status.state == State.FAILED and status.active.fingerprint == fp_a
        assert "MemoryError: cannot allocate 2 GiB" in status.error and f"{fp_a} still serves" in status.error
        assert metric("candidate_rollouts_total", outcome="failed") == failures + 1
        assert metric("candidate_model_info", fingerprint=fp_a, role="active") == 1
        # A goes on: writes commit and reach the watcher as A's deltas
        up = await stub.UpsertItems(pb.UpsertItemsRequest(items=items(7000)), timeout=10)
        event = await asyncio.wait_for(watch.read(), 10)
        assert event.delta.version == up.version and event.delta.fingerprint == fp_a
        watch.cancel()

    with_server(config, body)


def test_abort_stops_the_encoding_and_a_later_rollout_succeeds(config, checkpoint_b):
    fp_a, fp_b = load_checkpoint(config.checkpoint).fingerprint, load_checkpoint(checkpoint_b).fingerprint

    async def body(app, stub):
        gate = Gate(app.core)
        with pytest.raises(grpc.aio.AioRpcError) as idle:
            await stub.AbortRollout(pb.AbortRolloutRequest(), timeout=10)
        assert (
            idle.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            and "nothing to abort" in idle.value.details()
        )
        await stub.StartRollout(pb.StartRolloutRequest(checkpoint=str(checkpoint_b)), timeout=30)
        await gate.wait_entered()
        await stub.UpsertItems(pb.UpsertItemsRequest(items=items(7001)), timeout=10)
        aborted = await stub.AbortRollout(pb.AbortRolloutRequest(), timeout=30)
        assert aborted.state == State.ABORTED and "AbortRollout" in aborted.error
        info = await stub.GetCorpusInfo(pb.GetCorpusInfoRequest(), timeout=5)
        assert info.fingerprint == fp_a and info.num_items == N + 1

        gate.opened.set()
        await stub.StartRollout(pb.StartRolloutRequest(checkpoint=str(checkpoint_b)), timeout=30)
        done = await status_until(stub, lambda s: s.state != State.ENCODING, "ended")
        assert done.state == State.DONE and done.active.fingerprint == fp_b

    with_server(config, body)


def test_a_start_whose_caller_gives_up_while_the_checkpoint_loads_is_not_left_running(config, checkpoint_b):
    async def body(app, stub):
        loading, entered = threading.Event(), threading.Event()
        real = app.core.rollouts.load_encoder

        def slow_load(checkpoint):
            entered.set()
            loading.wait(30)
            return real(checkpoint)

        app.core.rollouts.load_encoder = slow_load
        # The caller gives up once the load has begun (a deadline could fire before the handler starts
        # the rollout on a slow machine, and then there would be nothing to abort).
        call = stub.StartRollout(pb.StartRolloutRequest(checkpoint=str(checkpoint_b)), timeout=30)
        assert await asyncio.to_thread(entered.wait, 30), "the rollout never began loading"
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        status = await status_until(stub, lambda s: s.state != State.ENCODING, "ended")
        assert status.state == State.ABORTED and "cancelled" in status.error
        loading.set()
        app.core.rollouts.load_encoder = real
        await stub.StartRollout(pb.StartRolloutRequest(checkpoint=str(checkpoint_b)), timeout=30)
        done = await status_until(stub, lambda s: s.state != State.ENCODING, "ended")
        assert done.state == State.DONE, done.error

    with_server(config, body)


def test_a_failed_write_at_the_switch_leaves_a_serving_and_recorded(config, checkpoint_b):
    fp_a = load_checkpoint(config.checkpoint).fingerprint
    faults = StoreFaults()

    async def body(app, stub):
        gate = Gate(app.core)
        await stub.StartRollout(pb.StartRolloutRequest(checkpoint=str(checkpoint_b)), timeout=30)
        await gate.wait_entered()
        faults.fail_next_commits("SQLITE_FULL")  # the switch's commit is the next one
        gate.opened.set()
        status = await status_until(stub, lambda s: s.state != State.ENCODING, "ended")
        assert (
            status.state == State.FAILED and "full" in status.error and f"{fp_a} still serves" in status.error
        )
        info = await stub.GetCorpusInfo(pb.GetCorpusInfoRequest(), timeout=5)
        assert info.fingerprint == fp_a
        up = await stub.UpsertItems(pb.UpsertItemsRequest(items=items(7002)), timeout=10)
        assert up.version == info.version + 1  # the failed switch published no version

    with_server(config, body, open_store=faults.open)

    async def restarted(app, stub):
        assert (await stub.GetCorpusInfo(pb.GetCorpusInfoRequest(), timeout=5)).fingerprint == fp_a

    with_server(config, restarted)


# ---- the active model across restarts (the core, no grpc) ------------------------------------------


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def loaded_core(config: CandidateConfig) -> CandidateCore:
    core = CandidateCore(config)
    core.load_model()
    core.load_corpus()
    return core


async def roll_out(core: CandidateCore, checkpoint) -> None:
    await core.start_rollout(str(checkpoint))
    await core.rollouts.wait()
    status = core.rollout_status()
    assert status.state.value == "DONE", status.error


def test_a_changed_checkpoint_flag_replaces_the_recorded_model(config, checkpoint_b, tmp_path, caplog):
    fp_a, fp_b = load_checkpoint(config.checkpoint).fingerprint, load_checkpoint(checkpoint_b).fingerprint

    async def rollout_then_close():
        core = loaded_core(config)
        await roll_out(core, checkpoint_b)
        await core.aclose()

    run(rollout_then_close())
    core = loaded_core(config)  # same --checkpoint: the rolled-out model
    assert core.info().fingerprint == fp_b
    run(core.aclose())
    copy_of_a = tmp_path / "ckpt-a-again"
    shutil.copytree(config.checkpoint, copy_of_a)
    with caplog.at_level(logging.WARNING):
        core = loaded_core(replace(config, checkpoint=copy_of_a))  # a new instruction from the operator
    assert core.info().fingerprint == fp_a and "--checkpoint changed since the last start" in caplog.text
    run(core.aclose())
    core = loaded_core(replace(config, checkpoint=copy_of_a))
    assert core.info().fingerprint == fp_a and core.info().num_items == N
    run(core.aclose())


def test_a_recorded_model_that_no_longer_loads_stops_the_start_with_the_reason(config, checkpoint_b):
    async def rollout_then_close():
        core = loaded_core(config)
        await roll_out(core, checkpoint_b)
        await core.aclose()

    run(rollout_then_close())
    shutil.rmtree(checkpoint_b)
    core = CandidateCore(config)
    with pytest.raises(CheckpointError, match=r"active model recorded in the item store .* does not load"):
        core.load_model()
    store = SqliteItemStore.open(config.item_store_path)  # released, and left as it was
    assert store.meta("active_checkpoint") == str(checkpoint_b)
    store.close()


def test_a_restart_mid_rollout_comes_back_on_the_previous_model(config, checkpoint_b):
    fp_a = load_checkpoint(config.checkpoint).fingerprint

    async def stop_while_encoding():
        core = loaded_core(config)
        gate = Gate(core)
        await core.start_rollout(str(checkpoint_b))
        await gate.wait_entered()
        up = await core.upsert(np.asarray([8000]), np.asarray([1]), [None])
        core.request_stop()  # shutdown: the rollout gives up at once
        await core.aclose()
        assert core.rollout_status().state.value == "ABORTED"
        return up.version

    version = run(stop_while_encoding())
    core = loaded_core(config)
    assert core.info().fingerprint == fp_a and core.info().version == version and 8000 in core.corpus
    run(core.aclose())
