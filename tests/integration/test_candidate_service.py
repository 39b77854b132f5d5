"""candidate_service through a real grpc.aio server on port 0 (in-process)."""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from candidate_service.config import CandidateConfig
from candidate_service.server import create_server
from shared import codec
from shared.model.checkpoint import load_checkpoint
from shared.model.features import featurize_items
from shared.server.bootstrap import ServerOptions
from tests.candidate_faults import StoreFaults
from twotower.v1 import candidate_tower_pb2 as pb
from twotower.v1 import candidate_tower_pb2_grpc as pb_grpc
from twotower.v1 import common_pb2

N = 300
PERSISTENT_FAULTS = {
    "SQLITE_FULL": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "SQLITE_IOERR_FSYNC": grpc.StatusCode.UNAVAILABLE,
}


@pytest.fixture
def config(tmp_path, tiny_checkpoint):
    items = tmp_path / "items.jsonl"
    rows = [{"post_id": i, "author_id": i % 11} for i in range(1, N + 1)]
    for row in rows:
        if row["post_id"] % 3:
            row["attributes"] = {"title": f"t{row['post_id']}"}
    items.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # a small message limit so that the snapshot needs several chunks
    return CandidateConfig(
        checkpoint=tiny_checkpoint, items=items, cache_dir=tmp_path / "cache", max_batch_items=64,
        server=ServerOptions(max_message_bytes=16 * 1024),
    )  # fmt: skip


def with_server(config: CandidateConfig, body, timeout: float = 60, open_store=None):
    async def main():
        _server, port, app = (
            create_server(config) if open_store is None else create_server(config, open_store)
        )
        await app.start()
        try:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=config.server.channel_options()
            ) as ch:
                await body(app, pb_grpc.CandidateTowerStub(ch), ch)
        finally:
            await app.stop(0)

    asyncio.run(asyncio.wait_for(main(), timeout))


def items(*ids: int, author: int = 1, **attrs: str) -> list:
    return [common_pb2.Item(post_id=i, author_id=author, attributes=attrs) for i in ids]


async def collect_snapshot(stream) -> tuple[dict, int]:
    """Read one complete snapshot: {post_id: (author_id, embedding, attributes)} and its version."""
    rows, expected = {}, 0
    while (event := await stream.read()) is not grpc.aio.EOF:
        chunk = event.snapshot_chunk
        assert event.WhichOneof("event") == "snapshot_chunk" and chunk.chunk_index == expected
        assert chunk.ByteSize() < 16 * 1024
        post_ids = codec.decode_numpy(chunk.post_ids)
        authors = codec.decode_numpy(chunk.author_ids)
        emb = codec.decode_numpy(chunk.embeddings)
        assert len(chunk.attributes) == len(post_ids) == len(emb)
        for p, a, e, attrs in zip(post_ids, authors, emb, chunk.attributes, strict=True):
            rows[int(p)] = (int(a), e.tobytes(), dict(attrs.attributes))
        expected += 1
        if expected == chunk.num_chunks:
            assert len(rows) == chunk.total_items
            return rows, chunk.version
    raise AssertionError("stream ended inside a snapshot")


def test_health_is_not_serving_until_loaded_then_encode_matches_the_model(config):
    async def body(app, stub, channel):
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetCorpusInfo(pb.GetCorpusInfoRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        await app.load()
        status = await health.Check(
            health_pb2.HealthCheckRequest(service="twotower.v1.CandidateTower"), timeout=5
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING

        request = pb.EncodeItemsRequest(items=items(5, 77, 123456789012, author=0) + items(6, author=42))
        response = await stub.EncodeItems(request, timeout=10)
        loaded = load_checkpoint(config.checkpoint)
        post_ids, author_ids = np.asarray([5, 77, 123456789012, 6]), np.asarray([0, 0, 0, 42])
        expected = loaded.model.encode_items(featurize_items(post_ids, author_ids, loaded.config))
        got = codec.decode_numpy(response.embeddings, shape=[4, loaded.config.emb_dim])
        assert np.allclose(got, expected.detach().numpy(), atol=1e-6)
        assert response.model.fingerprint == loaded.fingerprint
        info = await stub.GetCorpusInfo(pb.GetCorpusInfoRequest(), timeout=5)
        assert (info.num_items, info.embedding_dim, info.fingerprint) == (N, 16, loaded.fingerprint)
        assert REGISTRY.get_sample_value("candidate_corpus_items") == N
        assert REGISTRY.get_sample_value("candidate_corpus_version") == info.version
        assert REGISTRY.get_sample_value("candidate_encoded_items_total") >= N + 4

    with_server(config, body)


def test_upsert_then_watch_sees_new_rows_and_two_watchers_agree(config):
    async def body(app, stub, _channel):
        await app.load()
        up = await stub.UpsertItems(pb.UpsertItemsRequest(items=items(1, 5000, title="fresh")), timeout=10)
        assert (up.inserted, up.updated) == (1, 1)
        streams = [stub.WatchCorpus(pb.WatchCorpusRequest()) for _ in range(2)]
        snapshots = [await collect_snapshot(s) for s in streams]
        assert snapshots[0] == snapshots[1]
        assert REGISTRY.get_sample_value("candidate_watchers") == 2
        rows, version = snapshots[0]
        assert version == up.version and len(rows) == N + 1
        assert rows[5000][0] == 1 and rows[5000][2] == {"title": "fresh"} and rows[1][2] == {"title": "fresh"}
        assert rows[3][2] == {}  # no attributes: an empty map, still row-aligned

        up2 = await stub.UpsertItems(pb.UpsertItemsRequest(items=items(6000)), timeout=10)
        gone = await stub.DeleteItems(pb.DeleteItemsRequest(post_ids=[2, 999999]), timeout=10)
        assert (
            gone.deleted == 1 and list(gone.unknown_post_ids) == [999999] and gone.version == up2.version + 1
        )
        seen = []
        for s in streams:
            events = [await s.read(), await s.read()]
            seen.append([e.SerializeToString() for e in events])
            first, second = (e.delta for e in events)
            assert first.version == up.version + 1 and codec.decode_numpy(first.upsert_post_ids).tolist() == [
                6000
            ]
            assert codec.decode_numpy(first.upsert_embeddings).shape == (1, 16)
            assert second.version == gone.version and codec.decode_numpy(
                second.deleted_post_ids
            ).tolist() == [2]
            s.cancel()
        assert seen[0] == seen[1]

        # resume from a known version: deltas only
        fingerprint = (await stub.GetCorpusInfo(pb.GetCorpusInfoRequest(), timeout=5)).fingerprint
        resumed = stub.WatchCorpus(
            pb.WatchCorpusRequest(known_version=up.version, known_fingerprint=fingerprint)
        )
        event = await resumed.read()
        assert event.WhichOneof("event") == "delta" and event.delta.version == up.version + 1
        resumed.cancel()

    with_server(config, body)


@pytest.mark.parametrize(
    ("method", "request_", "message"),
    [
        ("EncodeItems", pb.EncodeItemsRequest(), "no items"),
        ("UpsertItems", pb.UpsertItemsRequest(), "no items"),
        ("UpsertItems", pb.UpsertItemsRequest(items=items(3, 3)), "duplicate id 3"),
        ("UpsertItems", pb.UpsertItemsRequest(items=items(0)), "post_id must be > 0"),
        ("EncodeItems", pb.EncodeItemsRequest(items=items(-5)), "post_id must be > 0"),
        ("UpsertItems", pb.UpsertItemsRequest(items=items(4, author=-1)), "author_id must be >= 0"),
        ("UpsertItems", pb.UpsertItemsRequest(items=items(*range(1, 66))), "limit is 64"),
        ("UpsertItems", pb.UpsertItemsRequest(items=items(7, title="x" * 1025)), "over 1024 bytes"),
        # fits a request, but the delta (with its embeddings) would not fit 3/4 of a message
        ("UpsertItems", pb.UpsertItemsRequest(items=items(*range(100, 122), title="y" * 500)), "exceeds"),
        ("DeleteItems", pb.DeleteItemsRequest(), "no post ids"),
        ("DeleteItems", pb.DeleteItemsRequest(post_ids=[0]), "must be > 0"),
        ("DeleteItems", pb.DeleteItemsRequest(post_ids=[8, 8]), "duplicate id 8"),
        ("DeleteItems", pb.DeleteItemsRequest(post_ids=list(range(1, 66))), "limit is 64"),
    ],
)
def test_bad_input_is_invalid_argument_and_changes_nothing(config, method, request_, message):
    async def body(app, stub, _channel):
        await app.load()
        before = await stub.GetCorpusInfo(pb.GetCorpusInfoRequest(), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await getattr(stub, method)(request_, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()
        after = await stub.GetCorpusInfo(pb.GetCorpusInfoRequest(), timeout=5)
        assert after == before

    with_server(config, body)


def test_watchers_past_the_limit_are_resource_exhausted(config):
    from dataclasses import replace

    async def body(app, stub, _channel):
        await app.load()
        open_streams = [stub.WatchCorpus(pb.WatchCorpusRequest()) for _ in range(2)]
        for stream in open_streams:
            await collect_snapshot(stream)
        refused = stub.WatchCorpus(pb.WatchCorpusRequest())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await refused.read()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (
            "2 WatchCorpus streams are open" in info.value.details()
            and "--max-watchers 2" in info.value.details()
        )
        assert REGISTRY.get_sample_value("candidate_watchers") == 2
        assert (await stub.GetCorpusInfo(pb.GetCorpusInfoRequest(), timeout=5)).num_items == N  # others go on
        open_streams[0].cancel()
        for _ in range(200):  # the server notices the cancellation; bounded wait
            if REGISTRY.get_sample_value("candidate_watchers") == 1:
                break
            await asyncio.sleep(0.05)
        again = stub.WatchCorpus(pb.WatchCorpusRequest())
        rows, _version = await collect_snapshot(again)
        assert len(rows) == N
        again.cancel()
        open_streams[1].cancel()

    with_server(replace(config, max_watchers=2), body)


@pytest.mark.parametrize("fault", list(PERSISTENT_FAULTS))
def test_failed_commit_is_a_clear_status_and_the_service_goes_on(config, fault):
    faults = StoreFaults()

    async def body(app, stub, _channel):
        await app.load()
        before = await stub.GetCorpusInfo(pb.GetCorpusInfoRequest(), timeout=5)
        ok = await stub.UpsertItems(pb.UpsertItemsRequest(items=items(5100)), timeout=10)
        faults.fail_next_commits(fault, fault)
        for call in (
            stub.UpsertItems(pb.UpsertItemsRequest(items=items(5101)), timeout=10),
            stub.DeleteItems(pb.DeleteItemsRequest(post_ids=[1]), timeout=10),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == PERSISTENT_FAULTS[fault], info.value.details()
            assert fault in info.value.details() and "item store" in info.value.details()
        info_after = await stub.GetCorpusInfo(pb.GetCorpusInfoRequest(), timeout=5)
        assert info_after.version == ok.version and info_after.num_items == before.num_items + 1
        rows, version = await collect_snapshot(stub.WatchCorpus(pb.WatchCorpusRequest()))  # reads go on
        assert version == ok.version and 5101 not in rows and 1 in rows
        later = await stub.UpsertItems(pb.UpsertItemsRequest(items=items(5102)), timeout=10)
        assert later.version == ok.version + 1  # the failed change's version was never published
        assert (
            REGISTRY.get_sample_value(
                "candidate_store_write_failures_total",
                {"error": "StorageFull" if fault == "SQLITE_FULL" else "StorageUnavailable"},
            )
            >= 2
        )

    with_server(config, body, open_store=faults.open)
