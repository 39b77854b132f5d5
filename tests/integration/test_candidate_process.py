"""candidate_service as a real process: restarts (clean and SIGKILL, another model) keep every
acknowledged change, a corrupt embeddings cache is rebuilt with every item, a real file size limit
(EFBIG, as a full disk) fails one write and loses nothing acknowledged, a corrupt item store stops the
start, SIGTERM stops cleanly with a watcher connected, and a bad items file stops the start with the
line named."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest

from shared import codec
from shared.model.checkpoint import random_model, save_checkpoint
from tests.support import REPO_ROOT, ServiceProcess
from twotower.v1 import candidate_tower_pb2 as pb
from twotower.v1 import candidate_tower_pb2_grpc as pb_grpc
from twotower.v1 import common_pb2

N = 40


@pytest.fixture
def args(tmp_path, tiny_checkpoint):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"post_id": i, "author_id": 1}) + "\n" for i in range(1, N + 1)))
    cache = str(tmp_path / "cache")
    return ["--checkpoint", str(tiny_checkpoint), "--items", str(items), "--cache-dir", cache,
            "--grace-seconds", "10"]  # fmt: skip


def corpus(address: str) -> tuple[pb.CorpusInfo, dict[int, tuple[int, bytes, dict]]]:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CandidateTowerStub(channel)
        info = stub.GetCorpusInfo(pb.GetCorpusInfoRequest(), timeout=10)
        rows = {}
        for event in stub.WatchCorpus(pb.WatchCorpusRequest(), timeout=10):
            chunk = event.snapshot_chunk
            post_ids, authors = codec.decode_numpy(chunk.post_ids), codec.decode_numpy(chunk.author_ids)
            emb = codec.decode_numpy(chunk.embeddings)
            for p, a, e, attrs in zip(post_ids, authors, emb, chunk.attributes, strict=True):
                rows[int(p)] = (int(a), e.tobytes(), dict(attrs.attributes))
            if chunk.chunk_index == chunk.num_chunks - 1:
                return info, rows
    raise AssertionError("no complete snapshot")


def change(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CandidateTowerStub(channel)
        for i in range(5):
            stub.UpsertItems(pb.UpsertItemsRequest(items=[
                common_pb2.Item(post_id=1000 + i, author_id=3, attributes={"n": str(i)}),
                common_pb2.Item(post_id=1 + i, author_id=9),
            ]), timeout=10)  # fmt: skip
        return stub.DeleteItems(pb.DeleteItemsRequest(post_ids=[20, 21, 1002]), timeout=10).version


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
def test_restart_keeps_every_upsert_and_delete(tmp_path, args, stop_signal):
    first = ServiceProcess("candidate_service", args, tmp_path, name="first")
    try:
        first.wait_serving()
        version = change(first.address)
        info, rows = corpus(first.address)
        assert info.version == version and info.num_items == N + 5 - 3 and rows[1004][2] == {"n": "4"}
        first.signal(stop_signal)
        first.proc.wait(15)
    finally:
        first.stop()
    second = ServiceProcess("candidate_service", args, tmp_path, name="second")
    try:
        second.wait_serving()
        assert same_corpus(corpus(second.address), (info, rows))
        # the cache predates the changes: only the new items and those with a new author are encoded
        assert "33 from the cache, 9 encoded" in second.log()
    finally:
        assert second.stop() == 0


def test_sigterm_with_a_watcher_connected_stops_cleanly(tmp_path, args):
    # a grace period longer than the wait below: the stream must end by itself, not be cut at the end
    service = ServiceProcess("candidate_service", [*args, "--grace-seconds", "120"], tmp_path)
    try:
        service.wait_serving()
        with grpc.insecure_channel(service.address) as channel:
            stream = pb_grpc.CandidateTowerStub(channel).WatchCorpus(pb.WatchCorpusRequest(), timeout=30)
            next(stream)  # the snapshot has started; the stream stays open for deltas
            service.signal(signal.SIGTERM)
            assert service.proc.wait(30) == 0
            assert "candidate_service stopped" in service.log()
    finally:
        service.stop()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            '{"post_id": 1}\n{"post_id": 2, "author_id": "x"}\n',
            "items.jsonl:2: 'author_id' must be an integer",
        ),
        ('{"post_id": 1}\n\n{"post_id": 1}\n', "items.jsonl:3: duplicate post_id 1 (first on line 1)"),
        (None, "items file not found"),
    ],
)
def test_bad_items_file_refuses_to_start(tmp_path, args, content, expected):
    items = tmp_path / "items.jsonl"
    if content is None:
        items.unlink()
    else:
        items.write_text(content)
    done = subprocess.run(
        [sys.executable, "-m", "candidate_service", "--port", "0", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and expected in done.stderr, done.stderr


def same_corpus(a: tuple, b: tuple) -> bool:
    """Same info, authors and attributes; embeddings equal up to float rounding (a row re-encoded in
    another batch may differ in the last bit)."""
    (info_a, rows_a), (info_b, rows_b) = a, b
    if info_a != info_b or records(rows_a) != records(rows_b):
        return False
    return all(
        np.allclose(
            np.frombuffer(rows_a[p][1], np.float32), np.frombuffer(rows_b[p][1], np.float32), atol=1e-6
        )
        for p in rows_a
    )


def records(rows: dict[int, tuple[int, bytes, dict]]) -> dict[int, tuple[int, dict]]:
    """What the item store keeps whatever the model: author and attributes per post id."""
    return {p: (a, attrs) for p, (a, _e, attrs) in rows.items()}


def run_to_failure(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "candidate_service", "--port", "0", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_another_model_keeps_every_change_and_a_corrupt_cache_is_rebuilt(tmp_path, args, tiny_config):
    other = tmp_path / "ckpt-b"
    save_checkpoint(random_model(tiny_config, seed=1), other)
    first = ServiceProcess("candidate_service", args, tmp_path, name="model-a")
    try:
        first.wait_serving()
        version = change(first.address)
        info_a, rows_a = corpus(first.address)
    finally:
        assert first.stop() == 0
    for path in (tmp_path / "cache" / "embeddings").iterdir():  # model A's cache, corrupted
        path.write_bytes(path.read_bytes()[:-100])
    with_b = [*args, "--checkpoint", str(other)]  # the last --checkpoint wins
    second = ServiceProcess("candidate_service", with_b, tmp_path, name="model-b")
    try:
        second.wait_serving()
        info_b, rows_b = corpus(second.address)
        assert records(rows_b) == records(rows_a) and info_b.version == version == info_a.version
        assert info_b.fingerprint != info_a.fingerprint and rows_b[1][1] != rows_a[1][1]
    finally:
        assert second.stop() == 0
    third = ServiceProcess("candidate_service", args, tmp_path, name="model-a-again")
    try:
        third.wait_serving()
        assert corpus(third.address)[0] == info_a and records(corpus(third.address)[1]) == records(rows_a)
        assert (
            "embeddings cache is unusable" in third.log()
            and f"0 from the cache, {N + 2} encoded" in third.log()
        )
    finally:
        assert third.stop() == 0


def test_a_real_file_size_limit_fails_one_write_and_loses_nothing_acknowledged(tmp_path, args):
    # The scenario with a real write error: RLIMIT_FSIZE (set on the running service with
    # prlimit) makes the kernel refuse its writes with EFBIG, as a full disk refuses them with ENOSPC.
    service = ServiceProcess("candidate_service", args, tmp_path, name="limited")
    try:
        service.wait_serving()
        with grpc.insecure_channel(service.address) as channel:
            stub = pb_grpc.CandidateTowerStub(channel)

            def upsert(post_id: int) -> pb.UpsertItemsResponse:
                item = common_pb2.Item(post_id=post_id, author_id=3, attributes={"n": str(post_id)})
                return stub.UpsertItems(pb.UpsertItemsRequest(items=[item]), timeout=10)

            first = upsert(100)
            resource.prlimit(service.pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
            try:
                with pytest.raises(grpc.RpcError) as info:
                    upsert(101)
            finally:
                resource.prlimit(service.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "is full" in info.value.details() and "RLIMIT_FSIZE" in info.value.details()
            assert upsert(102).version == first.version + 1  # space is back: writes work again
            gone = stub.DeleteItems(pb.DeleteItemsRequest(post_ids=[1]), timeout=10)
            assert gone.version == first.version + 2 and gone.deleted == 1
        acknowledged = corpus(service.address)
        assert set(acknowledged[1]) == set(range(2, N + 1)) | {100, 102}
        service.kill()  # a crash: nothing is flushed on the way out
    finally:
        service.stop()
    again = ServiceProcess("candidate_service", args, tmp_path, name="after-limit")
    try:
        again.wait_serving()
        info, rows = corpus(again.address)
        assert info.version == acknowledged[0].version and records(rows) == records(acknowledged[1])
    finally:
        assert again.stop() == 0


def test_corrupt_item_store_refuses_to_start_and_is_left_as_it_is(tmp_path, args):
    service = ServiceProcess("candidate_service", args, tmp_path, name="before-damage")
    try:
        service.wait_serving()
        change(service.address)
    finally:
        assert service.stop() == 0
    store = tmp_path / "cache" / "items.sqlite3"
    damaged = b"garbage!" * 16 + store.read_bytes()[128:]
    store.write_bytes(damaged)
    done = run_to_failure(args)
    assert done.returncode == 1, done.stderr
    assert f"the item store {store} cannot be read (file is not a database)" in done.stderr
    assert "never replaced or rebuilt" in done.stderr
    assert store.read_bytes() == damaged
