"""candidate_service as a real process: restarts (clean and SIGKILL) keep every acknowledged change,
SIGTERM stops cleanly with a watcher connected, and a bad items file stops the start with the line named."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import grpc
import pytest

from shared import codec
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
        assert corpus(second.address) == (info, rows)
        assert "loaded from cache" in second.log() and "(6 deltas replayed)" in second.log()
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
